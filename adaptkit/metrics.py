"""Task metrics as HF ``evaluate`` metrics, defined in-package.

``evaluate.load("exact_match")`` fetches its script from the hub, which an offline machine cannot
reach; the metrics here are the same kind of ``evaluate.Metric``, so they work offline and keep
``evaluate``'s batching and distributed gathering. Importing this module imports ``evaluate`` (seconds):
tasks import it when they evaluate, not before.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import datasets
import evaluate

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
YES_NO = {"yes", "no"}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class VQAExactMatch(evaluate.Metric):
    """Exact match after :func:`normalize_answer`; also reports yes/no and other-answer accuracy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="VQA exact-match accuracy after lower-casing and stripping punctuation.",
            citation="",
            inputs_description="predictions: list of answer strings; references: list of answer strings.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict:
        preds = [normalize_answer(p) for p in predictions]
        refs = [normalize_answer(r) for r in references]
        hits = [p == r for p, r in zip(preds, refs)]
        yes_no = [h for h, r in zip(hits, refs) if r in YES_NO]
        other = [h for h, r in zip(hits, refs) if r not in YES_NO]
        return {
            "accuracy": sum(hits) / max(1, len(hits)),
            "n": len(hits),
            "accuracy_yes_no": sum(yes_no) / len(yes_no) if yes_no else None,
            "accuracy_other": sum(other) / len(other) if other else None,
        }


class RetrievalRecall(evaluate.Metric):
    """Recall@K and rank statistics of a retrieval direction, from each query's rank of its first correct
    candidate (0: the best-scored candidate is correct)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Recall@1/5/10, mean and median rank (1-based) of the first correct candidate.",
            citation="",
            inputs_description="ranks: per query, the 0-based rank of its best-ranked correct candidate.",
            features=datasets.Features({"ranks": datasets.Value("int64")}),
        )

    def _compute(self, ranks: Sequence[int]) -> dict:
        n = max(1, len(ranks))
        ordered = sorted(ranks)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return {
            "r1": sum(r < 1 for r in ranks) / n,
            "r5": sum(r < 5 for r in ranks) / n,
            "r10": sum(r < 10 for r in ranks) / n,
            "mean_rank": sum(r + 1 for r in ranks) / n,
            "median_rank": (median + 1) if ranks else None,
            "n": len(ranks),
        }


class ClassAccuracy(evaluate.Metric):
    """Accuracy of predicted class indices against reference class indices."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predicted classes equal to the reference class.",
            citation="",
            inputs_description="predictions, references: class indices.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict:
        hits = [p == r for p, r in zip(predictions, references)]
        return {"accuracy": sum(hits) / max(1, len(hits)), "n": len(hits)}


def caption_tokens(text: str) -> str:
    """A caption as the COCO scorers expect it: lower-cased words without punctuation, space-separated
    (what the Java PTB tokenizer of the COCO toolkit does for plain captions; no Java needed)."""
    return normalize_answer(text)


class LabelMentioned(evaluate.Metric):
    """The share of generated captions that name their image's label: every word of the label appears
    among the caption's words (:func:`caption_tokens`; "a circle that is red" names "red circle")."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of captions containing every word of the image's label.",
            citation="",
            inputs_description="predictions: generated captions; references: each image's label.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict:
        hits = [
            set(caption_tokens(label).split()) <= set(caption_tokens(caption).split())
            for caption, label in zip(predictions, references)
        ]
        return {"label_mentioned": sum(hits) / max(1, len(hits)), "n": len(hits)}


class CaptionScores(evaluate.Metric):
    """BLEU-4, CIDEr-D and ROUGE-L of generated captions against their references, computed with the
    COCO caption toolkit's scorers (``pycocoevalcap``: ``Bleu``, ``Cider``, ``Rouge``) on
    :func:`caption_tokens`. CIDEr's document frequencies come from the references passed in."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="COCO caption metrics: BLEU-1..4, CIDEr-D, ROUGE-L.",
            citation="Chen et al., Microsoft COCO Captions: Data Collection and Evaluation Server, 2015.",
            inputs_description="predictions: one caption per image; references: its reference captions.",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
        try:
            from pycocoevalcap.bleu.bleu import Bleu
            from pycocoevalcap.cider.cider import Cider
            from pycocoevalcap.rouge.rouge import Rouge
        except ImportError:
            raise ImportError(
                "caption metrics need pycocoevalcap: pip install --no-deps -r requirements/no-deps.txt "
                "(bash scripts/setup.sh does)"
            ) from None

        res = {i: [caption_tokens(p) or "<empty>"] for i, p in enumerate(predictions)}
        gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        return {
            "bleu1": float(bleu[0]),
            "bleu4": float(bleu[3]),
            "cider": float(cider),
            "rouge_l": float(rouge),
            "n": len(predictions),
        }


# The official VQA evaluation's answer normalization (VQA v2 toolkit, vqaEval.py): punctuation, number words
# to digits, articles dropped, common contractions restored.
_VQA_PUNCT = list(';/[]"{}()=+\\_-><@`,?!')
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
_VQA_NUMBERS["none"] = "0"
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}  # fmt: skip


def vqa_normalize(text: str) -> str:
    """An answer as the official VQA evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _VQA_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


class VQAAccuracy(evaluate.Metric):
    """The official VQA accuracy: an answer scores min(1, #annotators who gave it / 3), averaged over the
    10 leave-one-annotator-out subsets of the (10) reference answers, then over questions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="VQA v2 accuracy against several annotators' answers.",
            citation="Antol et al., VQA: Visual Question Answering, ICCV 2015.",
            inputs_description="predictions: answer strings; references: each question's annotator answers.",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
        scores = []
        for pred, refs in zip(predictions, references):
            p, gts = vqa_normalize(pred), [vqa_normalize(r) for r in refs]
            subsets = [gts[:k] + gts[k + 1 :] for k in range(len(gts))] if len(gts) > 1 else [gts]
            scores.append(sum(min(1.0, sum(g == p for g in s) / 3) for s in subsets) / len(subsets))
        return {"vqa_accuracy": sum(scores) / max(1, len(scores)), "n": len(scores)}
