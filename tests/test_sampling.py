"""Batch order: every sample once per epoch, replayable from (seed, epoch), less padding when grouped."""

from __future__ import annotations

import random

import pytest

from adaptkit.data.sampling import (
    ImagePackedBatches,
    LengthGroupedBatches,
    ProcessSplitBatches,
    padding_fraction,
)


@pytest.fixture
def lengths():
    rng = random.Random(0)
    return [rng.randint(5, 15) for _ in range(1000)]


@pytest.mark.parametrize("group", [1, 4])
def test_epoch_covers_each_sample_once(lengths, group):
    sampler = LengthGroupedBatches(lengths, batch_size=32, group=group, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 1000 // 32
    assert all(len(b) == 32 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) == 31 * 32


def test_order_depends_only_on_seed_and_epoch(lengths):
    a = LengthGroupedBatches(lengths, 32, 4, seed=3)
    b = LengthGroupedBatches(lengths, 32, 4, seed=3)
    assert a.batches(0) == b.batches(0)
    b.set_epoch(1)
    assert list(b) == a.batches(1) != a.batches(0)
    assert LengthGroupedBatches(lengths, 32, 4, seed=4).batches(0) != a.batches(0)


def test_grouping_cuts_padding_and_keeps_batches_mixed(lengths):
    plain = LengthGroupedBatches(lengths, 32, 1).batches(0)
    grouped = LengthGroupedBatches(lengths, 32, 4).batches(0)
    assert padding_fraction(lengths, grouped) < 0.5 * padding_fraction(lengths, plain)
    # Batches come in random order, not sorted by length across the epoch.
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima)


def test_padding_fraction_by_hand():
    assert padding_fraction([2, 4, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(1 - 12 / 14)


@pytest.mark.parametrize("kind", ["grouped", "packed"])
def test_processes_share_one_process_global_batches(lengths, kind):
    """Accelerate hands process p every N-th batch from p: N processes with batch 16 train on the global
    batches of one process with batch 16 x N, for grouped and packed batches alike."""
    rows = [i // 9 for i in range(len(lengths))]  # 9 questions per image

    def global_batches(size):
        if kind == "packed":
            return ImagePackedBatches(rows, size, 4, seed=5, lengths=lengths, group=8)
        return LengthGroupedBatches(lengths, size, 8, seed=5)

    for procs in (1, 2, 4):
        one = global_batches(16 * procs)
        split = ProcessSplitBatches(global_batches(16 * procs), procs)
        assert split.batch_size == 16 and len(split) == len(one) * procs
        split.set_epoch(2)
        drawn = list(split)
        shards = [drawn[p::procs] for p in range(procs)]  # what each process receives
        assert all(len(b) == 16 for b in drawn)
        assert [sum((shard[k] for shard in shards), []) for k in range(len(one))] == one.batches(2)
    # Cutting per process instead (each drawing its own batches of 16) would not give those batches.
    cut = global_batches(16).batches(2)
    assert [cut[2 * k] + cut[2 * k + 1] for k in range(4)] != global_batches(32).batches(2)[:4]
    with pytest.raises(ValueError, match="split evenly"):
        ProcessSplitBatches(global_batches(30), 4)
