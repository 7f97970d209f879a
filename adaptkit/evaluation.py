"""VQA evaluation: greedy answers, normalization, exact-match accuracy through HF ``evaluate``.

``evaluate.load("exact_match")`` fetches its script from the hub, which an offline machine cannot
reach; :class:`VQAExactMatch` is the same kind of ``evaluate.Metric`` defined in-package, so it works
offline and keeps ``evaluate``'s batching and distributed gathering.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Sequence

import datasets
import evaluate
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from adaptkit.data.collate import VQADataset, collate_prompts

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


@torch.no_grad()
def predict(
    model,
    dataset: VQADataset,
    features,
    batch_size: int = 64,
    max_new_tokens: int = 5,
    progress: bool = True,
    desc: str = "evaluating",
) -> tuple[list[str], list[float]]:
    """Greedy answers (and their probabilities) for every sample of ``dataset``, in order.

    Batches are made of prompts of similar length (the samples sorted by prompt length, the answers put
    back in dataset order), so left padding costs little.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["prompt"]))
    loader = DataLoader(
        Subset(dataset, order),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda items: collate_prompts(items, model.tokenizer.pad_token_id),
    )
    device = model.base_lm.get_input_embeddings().weight.device
    answers: list[str] = [""] * len(dataset)
    scores: list[float] = [0.0] * len(dataset)
    done = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        feats = features.lookup(batch["image"])
        got, probs = model.generate(
            feats, batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens
        )
        for i, answer, prob in zip(order[done : done + len(got)], got, probs):
            answers[i], scores[i] = answer, prob
        done += len(got)
    model.train(was_training)
    return answers, scores


def evaluate_vqa(
    model,
    dataset: VQADataset,
    features,
    batch_size: int = 64,
    max_new_tokens: int = 5,
    progress: bool = True,
    accelerator=None,
) -> tuple[dict, list[dict]]:
    """Score greedy answers on ``dataset``; returns ``(metrics, per-sample records)``.

    With an ``accelerator`` of several processes, each process answers every N-th sample and the answers
    are gathered (in dataset order) before scoring, so every process returns the same metrics.
    """
    start = time.perf_counter()
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rank, world = accelerator.process_index, accelerator.num_processes
        shard = list(range(rank, len(dataset), world))
        got = predict(model, Subset(dataset, shard), features, batch_size, max_new_tokens, progress)
        gathered = gather_object([list(zip(shard, *got))])
        ordered = sorted((row for part in gathered for row in part), key=lambda row: row[0])
        answers, scores = [a for _, a, _ in ordered], [s for _, _, s in ordered]
    else:
        answers, scores = predict(model, dataset, features, batch_size, max_new_tokens, progress)
    refs = [s.answer for s in dataset.samples]
    metrics = VQAExactMatch().compute(predictions=answers, references=refs)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    records = [
        {
            "origin": s.origin,
            "question": s.question,
            "answer": s.answer,
            "prediction": a,
            "score": round(p, 5),
        }
        for s, a, p in zip(dataset.samples, answers, scores)
    ]
    return metrics, records
