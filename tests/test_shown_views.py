"""Augmented views encoded as the run needs them: a training run encodes the images themselves, then only
the views its schedule of steps looks up (``shown_views``), exactly those, on every batching path."""

from __future__ import annotations

import pytest
import torch

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.cli import main
from adaptkit.config import VisionConfig
from adaptkit.data.augment import view_choice
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.features import FeatureBank
from tests.conftest import draw_sample
from tests.test_augment import CFG, RECIPE, _augmented


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "triangle")]):
        draw_sample(tmp_path / f"img{i}.png", color, shape)
        paths.append(str(tmp_path / f"img{i}.png"))
    return paths


@pytest.mark.parametrize("cached", [False, True])
def test_a_deferred_bank_encodes_the_views_it_is_given(tiny_mobilenet_pth, images, tmp_path, cached):
    backbone = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    cpu = torch.device("cpu")

    def bank(folder, **kwargs):
        cache = FeatureCache.for_backbone(tmp_path / folder, backbone, "cpu") if cached else None
        return FeatureBank.compute(backbone, images, {}, cpu, cache=cache, augment=CFG, seed=5, **kwargs)

    full = bank("full")
    lazy = bank("lazy", defer_views=True)
    assert (lazy.slots[0] >= 0).all() and (lazy.slots[1:] < 0).all() and lazy.all().shape[0] == 3
    rows = torch.arange(3)
    assert torch.equal(lazy.lookup(rows), full.lookup(rows))  # evaluation: the images themselves
    assert torch.equal(lazy.stats()[0], full.stats()[0])
    step = next(s for s in range(100) if view_choice(5, s, 3, rows).sum() > 0)
    with pytest.raises(RuntimeError, match=rf"\(step {step}\) was never encoded"):
        lazy.lookup(rows, step=step)  # a schedule that missed a view is a loud bug, never a silent view 0
    shown = torch.zeros(4, 3, dtype=torch.bool)
    shown[view_choice(5, step, 3, rows), rows] = True
    assert lazy.add_views(shown) == int(shown[1:].sum()) > 0
    assert lazy.add_views(shown) == 0  # nothing twice
    torch.testing.assert_close(
        lazy.lookup(rows, step=step), full.lookup(rows, step=step), rtol=1e-5, atol=1e-6
    )
    assert int((lazy.slots >= 0).sum()) == 3 + int(shown[1:].sum())
    lazy.add_views()  # None: all of them
    torch.testing.assert_close(lazy.all()[3:].sum(), full.all()[3:].sum())
    if cached:  # a later run reads them all back from the store, in the bank's own layout
        again = bank("lazy", defer_views=True)
        assert again.add_views() == 9 and torch.equal(
            again.lookup(rows, step=step), lazy.lookup(rows, step=step)
        )


@pytest.mark.parametrize("batching", ["packed", "plain"])
def test_training_encodes_exactly_the_views_its_steps_look_up(
    tiny_overrides, tmp_path, monkeypatch, batching
):
    """24 questions in batches of 4 and 4 micro-batches per step: 6 micro-batches an epoch, so Accelerate's
    step at each epoch's end (after 2 micro-batches) must be replayed, or steps 2.. would show other views."""
    looked_up: set[tuple[int, int]] = set()
    banks: list[FeatureBank] = []
    real = FeatureBank.lookup

    def spy(self, rows, step=None):
        if step is not None:
            banks.append(self)
            rows = rows.to(torch.int64).cpu()
            looked_up.update(zip(view_choice(self.seed, step, self.views, rows).tolist(), rows.tolist()))
        return real(self, rows, step)

    monkeypatch.setattr(FeatureBank, "lookup", spy)
    extra = ["max_steps=5", "grad_accum_steps=4", "checkpoint_every=0"]
    if batching == "plain":  # a plain shuffle: its order is the DataLoader's, so every view is encoded
        extra += ["pack_questions=1", "length_grouping=1"]
    assert main(["train", RECIPE, *_augmented(tiny_overrides, tmp_path / "run"), *extra]) == 0
    bank = banks[0]
    encoded = {(v, r) for v, r in (bank.slots >= 0).nonzero().tolist() if v > 0}
    if batching == "plain":
        assert len(encoded) == 18
    else:
        assert encoded == {(v, r) for v, r in looked_up if v > 0} and len(encoded) < 18


def test_views_apply_only_to_the_data_they_were_chosen_for():
    from adaptkit.recipes import load_recipe

    def augment(*overrides):
        return load_recipe(RECIPE, list(overrides)).data.train_augment()

    assert augment() is not None and augment().rotate == 180  # the default's own data: easy-VQA
    assert augment("data.train=photos/train.jsonl") is None  # a user's photos: no 180-degree turns
    assert augment("data.train=fashionmnist:train") is None
    assert augment("data.train=photos/train.jsonl", "data.augment.only_for=") is not None  # asked for
    assert augment("data.train=mine.jsonl", "data.augment.only_for=easyvqa:,mine") is not None
    assert augment("data.augment.views=0") is None


def test_a_run_on_other_data_says_its_views_are_off(tiny_overrides, tmp_path):
    overrides = [o for o in _augmented(tiny_overrides, tmp_path / "run") if "only_for" not in o]
    assert main(["train", RECIPE, *overrides, "max_steps=2"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "data.augment: views off: data.augment.only_for='easyvqa:' does not cover data.train=" in log
    assert "augmented views" not in log  # nothing encoded beyond the images themselves


def test_a_failed_compile_is_not_tried_again_for_the_views(tiny_mobilenet_pth, images, monkeypatch, caplog):
    from adaptkit.data import encoding

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)

        def graph(pixels):
            raise RuntimeError("InductorError: no C++ compiler found")

        return graph

    backbone = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    monkeypatch.setattr(encoding, "COMPILE_MIN_IMAGES", 0)
    monkeypatch.setattr(torch, "compile", broken)
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="adaptkit.data.encoding"):
        bank = FeatureBank.compute(backbone, images, {}, cpu, augment=CFG, compile=True, defer_views=True)
        assert bank.add_views() == 9  # the second pass, eager like the first
    assert len(calls) == 1 and caplog.text.count("compiling the vision backbone failed") == 1
