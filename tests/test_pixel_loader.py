"""Training without a feature cache (``cache_features=false``): DataLoader workers decode, augment and
preprocess each micro-batch's images for the step it is trained at; the run shows the views a feature
bank's lookups would show, resumes exactly, and decodes nothing for the micro-batches a resume drops."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from adaptkit import checkpoint as ckpt
from adaptkit.cli import main
from adaptkit.data.augment import view_choice
from adaptkit.data.features import FeatureBank
from adaptkit.data.pixels import OnTheFlyFeatures, StepTaggedBatches
from tests.conftest import train_crashing_at_save
from tests.test_augment import RECIPE, _augmented

# 24 questions in micro-batches of 4, 4 per optimizer step: 6 micro-batches an epoch, so Accelerate also
# steps at each epoch's end (after 2), which the workers' tags must foresee.
ACCUMULATE = ["grad_accum_steps=4", "max_steps=5", "checkpoint_every=0"]


def _spy_loads(monkeypatch, log, source=OnTheFlyFeatures):
    """Record (step, row, view) of every ``load`` of ``source`` in a file: workers are other processes."""
    real = source.load

    def spy(self, rows, step=None):
        if step is not None:
            views = view_choice(self.seed, step, self.views, rows)
            with open(log, "a") as out:
                out.write(json.dumps([step, rows.tolist(), views.tolist()]) + "\n")
        return real(self, rows, step)

    monkeypatch.setattr(source, "load", spy)


def _shown(log) -> dict[int, list[tuple[int, int]]]:
    """(row, view) pairs per step, of every batch prepared (none past the run's last step)."""
    per_step = defaultdict(list)
    for line in log.read_text().splitlines():
        step, rows, views = json.loads(line)
        per_step[step] += zip(rows, views)
    return {step: sorted(pairs) for step, pairs in per_step.items()}


def _samples(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("batching", ["packed", "plain"])
def test_workers_prepare_the_views_the_step_looks_up(tiny_overrides, tmp_path, monkeypatch, batching):
    """Against the training process's own lookups (image_workers=0): workers decoding images
    (cache_features=false) and workers reading the store make the same (image, view) pairs per step."""
    extra = [*ACCUMULATE] + (["pack_questions=1", "length_grouping=1"] if batching == "plain" else [])
    bank_log: dict[int, list[tuple[int, int]]] = defaultdict(list)
    real = FeatureBank.lookup

    def lookups(self, rows, step=None):
        if step is not None:
            views = view_choice(self.seed, step, self.views, rows.to(torch.int64).cpu())
            bank_log[step] += zip(rows.tolist(), views.tolist())
        return real(self, rows, step)

    monkeypatch.setattr(FeatureBank, "lookup", lookups)
    alone = tmp_path / "alone"
    assert main(["train", RECIPE, *_augmented(tiny_overrides, alone), *extra, "image_workers=0"]) == 0
    expected = {step: sorted(pairs) for step, pairs in bank_log.items()}
    assert sorted(expected) == [0, 1, 2, 3, 4]
    assert any(v > 0 for pairs in expected.values() for _, v in pairs)  # augmented views, not only images
    from adaptkit.data import pixels
    from adaptkit.train import setup

    # A GPU run reads the store in its workers (on CPU the step reads it): the same path, here on CPU.
    monkeypatch.setattr(setup, "reads_ahead", lambda features, workers, device: workers > 0)
    runs = {}
    for what, source, flag in [("decoded", OnTheFlyFeatures, "false"), ("read", FeatureBank, "true")]:
        log, out = tmp_path / f"{what}.jsonl", tmp_path / what
        _spy_loads(monkeypatch, log, source)
        overrides = [*_augmented(tiny_overrides, out), *extra, f"cache_features={flag}", "image_workers=2"]
        assert main(["train", RECIPE, *overrides]) == 0
        assert "for each step in 2 worker processes" in (out / "train.log").read_text()
        assert _shown(log) == expected, what
        assert [r["indices"] for r in _samples(out)] == [r["indices"] for r in _samples(alone)]
        runs[what] = out
    assert _samples(runs["read"]) == _samples(alone)  # the same features: the same losses, bit for bit
    cpu = torch.device("cpu")
    assert not pixels.reads_ahead(None, 2, cpu) and not pixels.reads_ahead(None, 0, torch.device("cuda"))


def test_workers_or_not_the_run_is_the_same_and_resumes_exactly(tiny_overrides, tmp_path, monkeypatch):
    def overrides(out, workers):
        return [*_augmented(tiny_overrides, out), "cache_features=false", f"image_workers={workers}"]

    ref = tmp_path / "ref"
    assert main(["train", RECIPE, *overrides(ref, 0)]) == 0
    cut = tmp_path / "cut"
    train_crashing_at_save([RECIPE, *overrides(cut, 2)], save=2)
    assert ckpt.latest_checkpoint(cut).name == "checkpoint-000004"
    log = tmp_path / "loads.jsonl"
    _spy_loads(monkeypatch, log)
    assert main(["train", RECIPE, *overrides(cut, 2), "resume=auto"]) == 0
    assert sorted(_shown(log)) == [4, 5, 6, 7]  # the 4 steps the checkpoint had done: dropped undecoded
    assert _samples(ref) == _samples(cut) and len(_samples(ref)) == 8
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_loader_out_of_step_with_the_loop_fails_loudly(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(StepTaggedBatches, "steps_per_epoch", lambda self: 3)  # the loop takes 2 an epoch
    overrides = [*_augmented(tiny_overrides, tmp_path / "run"), *ACCUMULATE, "cache_features=false"]
    with pytest.raises(RuntimeError, match=r"made step 3's views for step 2: .* out of step"):
        main(["train", RECIPE, *overrides, "image_workers=0"])


def test_two_processes_prepare_their_halves_for_the_right_steps(tiny_overrides, tmp_path):
    """Two gloo processes without a store, a worker each, 2 micro-batches a step (3 steps an epoch, so
    step 3 starts epoch 1): each process's tags name the loop's steps (else the run stops), the replicas
    stay identical at every step, and the global batches are one process's with the same global batch."""
    from tests.test_distributed import _common, _train_two_processes

    one, two = tmp_path / "one", tmp_path / "two"
    common = [*_common(tiny_overrides), "cache_features=false", "image_workers=1", "grad_accum_steps=2"]
    assert main(["train", RECIPE, *common, "batch_size=4", f"output_dir={one}"]) == 0
    _train_two_processes(common, two)
    assert "for each step in 1 worker processes" in (two / "train.log").read_text()
    halves = [sorted(r["indices"]) for r in _samples(two)]
    assert len(halves) == 10 and halves == [sorted(r["indices"]) for r in _samples(one)]
