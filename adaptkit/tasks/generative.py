"""What every task whose output the LM generates shares (VQA today; captioning follows the same shape).

A sample becomes a prompt (token ids the LM reads after the soft tokens) and a target (the ids it is
trained to continue with, ending in EOS); training batches are right-padded ``prompt + target`` rows
with labels on the target only, or packed rows of one image's samples; evaluation generates greedily
from left-padded prompts, sharded over processes.
"""

from __future__ import annotations

import functools
import time

import torch
from torch.utils.data import Subset

from adaptkit.data.collate import collate_packed, collate_train
from adaptkit.evaluation import generate_texts, on_shards
from adaptkit.model.batch import Batch
from adaptkit.objectives import Objectives
from adaptkit.tasks.base import Task


class GenerativeTask(Task):
    """Base of tasks trained with the LM loss on a target text and evaluated by generating it."""

    def collate(self, pad_id: int, pack: int = 1):
        if pack > 1:
            cap = self.recipe.pack_max_tokens
            return functools.partial(collate_packed, pad_id=pad_id, pack=pack, max_tokens=cap)
        return functools.partial(collate_train, pad_id=pad_id)

    def setup_objectives(self, model, dataset) -> str:
        model.objectives = Objectives({"lm": self.recipe.objectives.lm})
        return f"objectives: {self.recipe.objectives.lm:.3g} x LM loss on the target tokens"

    def loss(self, model, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(Batch.of(features, batch)).loss

    def generate(
        self, model, dataset, features, batch_size: int | None = None, progress: bool = True, accelerator=None
    ) -> tuple[list[str], list[float], float]:
        """Greedy texts and their probabilities for every sample of ``dataset`` (in order, gathered over
        the processes of ``accelerator``) and the seconds it took."""
        start = time.perf_counter()
        size = batch_size or self.recipe.eval_batch_size

        def run(indices):
            part = dataset if len(indices) == len(dataset) else Subset(dataset, indices)
            return generate_texts(model, part, features, size, self.recipe.max_new_tokens, progress)

        texts, scores = on_shards(run, len(dataset), accelerator)
        return texts, scores, round(time.perf_counter() - start, 2)
