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
