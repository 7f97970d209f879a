"""Batch order: a seeded shuffle per epoch, optionally grouped by length so padding costs little.

Right-padded batches pay for every pad token in every LM layer. ``LengthGroupedBatches`` shuffles
the samples, cuts the order into windows of ``group`` batches, sorts each window by length and cuts
it into batches, then shuffles the batches: each batch holds samples of similar length while the
data order stays random at the scale of a few batches. ``group=1`` is a plain shuffle.

The order depends only on ``(seed, epoch)``, so it can be replayed exactly (resume, several ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of sample indices, reshuffled per epoch (``set_epoch``), incomplete batch dropped."""

    def __init__(self, lengths: Sequence[int], batch_size: int, group: int = 1, seed: int = 0) -> None:
        if batch_size <= 0 or group <= 0:
            raise ValueError("batch_size and group must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = group
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        usable = len(self) * self.batch_size
        order = order[:usable]
        batches: list[list[int]] = []
        window = self.batch_size * self.group
        for start in range(0, usable, window):
            chunk = order[start : start + window]
            if self.group > 1:
                chunk = sorted(chunk, key=lambda i: self.lengths[i])  # stable: ties keep shuffled order
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.group > 1:
            perm = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)


def padding_fraction(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Share of a right-padded layout's token slots that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / slots if slots else 0.0
