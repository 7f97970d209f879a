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
