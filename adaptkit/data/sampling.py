"""Batch order: a seeded shuffle per epoch, optionally grouped by length so padding costs little.

Right-padded batches pay for every pad token in every LM layer. ``LengthGroupedBatches`` shuffles
the samples, cuts the order into windows of ``group`` batches, sorts each window by length and cuts
it into batches, then shuffles the batches: each batch holds samples of similar length while the
data order stays random at the scale of a few batches. ``group=1`` is a plain shuffle.

The order depends only on ``(seed, epoch)``, so it can be replayed exactly (resume, several ranks);
``ProcessSplitBatches`` cuts each global batch over the processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from adaptkit.data.augment import view_choice
from adaptkit.data.collate import pack_runs


class _EpochBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` of ``n`` sample indices, a function of ``(seed, epoch)`` alone
    (``batches``), reshuffled per epoch (``set_epoch``); the incomplete last batch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)


class LengthGroupedBatches(_EpochBatches):
    """Batches of sample indices, reshuffled per epoch (``set_epoch``), incomplete batch dropped."""

    def __init__(self, lengths: Sequence[int], batch_size: int, group: int = 1, seed: int = 0) -> None:
        if group <= 0:
            raise ValueError("batch_size and group must be positive")
        super().__init__(len(lengths), batch_size, seed)
        self.lengths = list(lengths)
        self.group = group

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


def padding_fraction(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Share of a right-padded layout's token slots that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / slots if slots else 0.0


class ImagePackedBatches(_EpochBatches):
    """Batches of ``batch_size`` sample indices in which questions about one image sit next to each
    other, in runs of at most ``pack``, for ``collate_packed`` to put into one LM sequence each.

    Per epoch: each image's questions are shuffled and cut into near-equal chunks of at most ``pack``;
    the chunks are shuffled and laid end to end (with ``group`` > 1 and ``lengths``, sorted by token
    length within windows of ``group`` batches, so a batch's rows pad little, and the batches then
    shuffled); the result is cut into batches (a chunk cut by a batch boundary becomes two shorter
    rows). Every sample appears once per epoch except the last incomplete batch, which is dropped. The
    order depends only on ``(seed, epoch)``.
    """

    def __init__(
        self,
        image_rows: Sequence[int],
        batch_size: int,
        pack: int,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        group: int = 1,
        max_tokens: int = 0,
    ) -> None:
        if pack <= 0 or group <= 0:
            raise ValueError("batch_size, pack and group must be positive")
        super().__init__(len(image_rows), batch_size, seed)
        self.image_rows = list(image_rows)
        self.pack = pack
        self.lengths = list(lengths) if lengths is not None else None
        self.group = group
        self.max_tokens = max_tokens

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        by_image: dict[int, list[int]] = {}
        for i in torch.randperm(len(self.image_rows), generator=generator).tolist():
            by_image.setdefault(self.image_rows[i], []).append(i)
        chunks: list[list[int]] = []
        for questions in by_image.values():
            n = -(-len(questions) // self.pack)  # chunks of near-equal size, none over pack
            for k in range(n):
                chunks += self._capped(questions[k::n])
        chunks = [chunks[k] for k in torch.randperm(len(chunks), generator=generator).tolist()]
        sort = self.group > 1 and self.lengths is not None
        if sort:
            lengths = self.lengths
            window, sorted_chunks, size = [], [], 0
            for chunk in chunks:
                window.append(chunk)
                size += len(chunk)
                if size >= self.group * self.batch_size or chunk is chunks[-1]:
                    sorted_chunks += sorted(window, key=lambda c: sum(lengths[i] for i in c))
                    window, size = [], 0
            chunks = sorted_chunks
        order = [i for chunk in chunks for i in chunk]
        batches = [
            order[s : s + self.batch_size] for s in range(0, len(self) * self.batch_size, self.batch_size)
        ]
        if sort:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _capped(self, chunk: list[int]) -> list[list[int]]:
        """``chunk`` cut where its text would pass ``max_tokens`` (``collate_packed``'s rule)."""
        if not self.max_tokens or self.lengths is None:
            return [chunk]
        runs = pack_runs([0] * len(chunk), self.pack, [self.lengths[i] for i in chunk], self.max_tokens)
        return [[chunk[k] for k in run] for run in runs]


class ProcessSplitBatches(Sampler[list[int]]):
    """The batches of ``global_batches`` (a sampler built with the global batch size: per-process batch
    size x ``processes``), each cut into ``processes`` consecutive slices yielded one after another.

    Accelerate's batch sharding hands process p every ``processes``-th batch starting at p, so process p
    trains on slice p of every global batch: N processes with batch B draw exactly the global batches of
    one process with batch N x B, also when those batches are grouped by length or packed by image (where
    cutting per process would otherwise sort and pack other windows). With ``processes=1`` the batches
    are the wrapped sampler's own.
    """

    def __init__(self, global_batches: _EpochBatches, processes: int) -> None:
        size = global_batches.batch_size
        if processes <= 0 or size % processes:
            raise ValueError(f"the global batch size {size} must split evenly over {processes} processes")
        self.inner, self.processes = global_batches, processes
        self.batch_size = size // processes

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner) * self.processes

    def batches(self, epoch: int) -> list[list[int]]:
        size, parts = self.batch_size, range(self.processes)
        return [b[k * size : (k + 1) * size] for b in self.inner.batches(epoch) for k in parts]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.inner.epoch)


def epoch_batches(recipe, image_rows: Sequence[int], lengths: Sequence[int], global_batch: int):
    """The global batches ``adaptkit train`` draws for ``recipe`` (``pack_questions``, ``length_grouping``,
    ``pack_max_tokens``, ``seed``): packed by image, or grouped by length; None for a plain shuffle."""
    if recipe.pack_questions > 1:
        return ImagePackedBatches(
            image_rows,
            global_batch,
            recipe.pack_questions,
            recipe.seed,
            lengths,
            recipe.length_grouping,
            recipe.pack_max_tokens,
        )
    if recipe.length_grouping > 1:
        return LengthGroupedBatches(lengths, global_batch, recipe.length_grouping, recipe.seed)
    return None


def shown_views(
    global_batches: _EpochBatches,
    image_rows: Sequence[int],
    n_images: int,
    views: int,
    seed: int,
    max_steps: int,
    accumulate: int = 1,
) -> torch.Tensor:
    """Which augmented views of which images a run's steps look up: ``(views + 1, n_images)`` bool.

    Replays the run's global batches from step 0 (their order is a function of ``(seed, epoch)``) with
    Accelerate's accumulation rule: an optimizer step after every ``accumulate`` micro-batches and at the
    end of each epoch. Each image row of a step's batches shows :func:`view_choice`'s view for that
    step, so this is exactly the set ``FeatureBank.lookup`` will ask for."""
    shown = torch.zeros(views + 1, n_images, dtype=torch.bool)
    rows_of = torch.as_tensor(list(image_rows), dtype=torch.int64)
    step, epoch = 0, 0
    while step < max_steps:
        batches = global_batches.batches(epoch)
        if not batches:
            break
        for i, batch in enumerate(batches):
            rows = rows_of[batch].unique()
            shown[view_choice(seed, step, views, rows), rows] = True
            if (i + 1) % accumulate == 0 or i == len(batches) - 1:
                step += 1
                if step >= max_steps:
                    break
        epoch += 1
    return shown
