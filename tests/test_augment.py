"""Cached augmented views: deterministic pixels, their own cache keys, a per-step choice independent of
batching and processes, label-preserving transforms, and training that resumes bit-exactly with them."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.cli import main
from adaptkit.config import AugmentConfig, RecipeError, VisionConfig
from adaptkit.data.augment import augment_image, border_colour, make_view, view_choice, view_key
from adaptkit.data.encoding import encode_images
from adaptkit.data.feature_cache import FeatureCache, file_key
from adaptkit.data.features import FeatureBank
from adaptkit.data.images import open_image
from adaptkit.data.pixels import OnTheFlyFeatures
from adaptkit.recipes import load_recipe
from tests.conftest import draw_sample, train_crashing_at_save

CFG = AugmentConfig(
    views=3,
    scale_min=0.5,
    scale_max=1.1,
    rotate=30,
    translate=0.15,
    flip=True,
    brightness=0.15,
    contrast=0.2,
    channel_gain=0.1,
    gradient=0.15,
    blur=0.01,
    noise=0.01,
    background=0.5,
)
RECIPE = "recipes/easyvqa_qformer_lora.yaml"


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "circle")]):
        path = tmp_path / f"img{i}.png"
        draw_sample(path, color, shape)
        paths.append(str(path))
    return paths


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.size[1], img.size[0], 3)


def test_a_view_is_a_function_of_image_settings_and_index(images):
    img, key = open_image(images[0]), file_key(images[0])
    assert make_view(img, key, CFG, 0) is img
    first = _pixels(make_view(img, key, CFG, 1))
    assert torch.equal(first, _pixels(make_view(open_image(images[0]), key, CFG, 1)))
    assert not torch.equal(first, _pixels(make_view(img, key, CFG, 2)))
    assert not torch.equal(first, _pixels(make_view(img, key, replace(CFG, rotate=10), 1)))
    assert not torch.equal(first, _pixels(img))


def test_view_keys():
    assert view_key("abc", CFG, 0) == "abc"  # the image itself shares the unaugmented cache entry
    keys = {view_key("abc", CFG, v) for v in range(1, 4)} | {view_key("abd", CFG, 1)}
    assert len(keys) == 4
    # More views reuse the cached ones; other settings are other views.
    assert view_key("abc", replace(CFG, views=8), 2) == view_key("abc", CFG, 2)
    assert view_key("abc", replace(CFG, brightness=0.3), 2) != view_key("abc", CFG, 2)


def test_transforms_keep_the_label_and_fill_with_the_background():
    img = Image.new("RGB", (64, 64), (235, 240, 245))
    ImageDraw.Draw(img).rectangle((20, 20, 44, 44), fill=(255, 0, 0))
    assert border_colour(img) == (235, 240, 245)
    geometric = AugmentConfig(views=1, rotate=45, scale_min=0.6, scale_max=0.6)
    for seed in range(5):
        out = _pixels(augment_image(img, geometric, torch.Generator().manual_seed(seed))).int()
        # The corners uncovered by rotating and shrinking take the border's colour, not black.
        assert out[0, 0].tolist() == [235, 240, 245] and out[-1, -1].tolist() == [235, 240, 245]
        strong = out[(out - torch.tensor([235, 240, 245])).abs().sum(-1) > 400]  # inside, not edges
        assert len(strong) > 50  # the square is still there, smaller
        assert (strong[:, 0] > 200).all() and (strong[:, 1:] < 60).all()  # and still red
    photometric = replace(CFG, rotate=0, scale_min=1.0, scale_max=1.0, translate=0.0, flip=False)
    for seed in range(5):
        out = _pixels(augment_image(img, photometric, torch.Generator().manual_seed(seed))).int()
        square = out[26:38, 26:38].reshape(-1, 3).float().mean(0)
        assert square[0] > 170 and square[1] < 50 and square[2] < 50  # red stays red
        background = out[:6, :6].reshape(-1, 3).float().mean(0)
        assert (background > 150).all()  # a light background stays light


def test_new_background_keeps_the_shape():
    img = Image.new("RGB", (64, 64), (235, 240, 245))
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(0, 0, 255))
    cfg = AugmentConfig(views=1, background=1.0, rotate=30)
    corners = set()
    for seed in range(6):
        out = _pixels(augment_image(img, cfg, torch.Generator().manual_seed(seed))).int()
        corners.add(tuple(out[0, 0].tolist()))
        assert out[0, 0].tolist() != [235, 240, 245]  # the background (and the rotated-in fill) is recoloured
        assert ((out[2:-2, 2:-2] - torch.tensor([235, 240, 245])).abs().sum(-1) < 12).sum() < 40
        centre = out[28:36, 28:36].reshape(-1, 3)
        assert (centre[:, 2] > 240).all() and (centre[:, :2] < 15).all()  # the blue circle is untouched
        assert (out[:4, :4] > 150).all()  # a soft, light background
    assert len(corners) == 6


def test_view_choice_depends_on_seed_step_and_row_only():
    rows = torch.arange(1000)
    step3 = view_choice(0, 3, 4, rows)
    assert step3.min() == 0 and step3.max() == 4
    assert torch.bincount(step3, minlength=5).min() > 150  # about uniform over the 5 views
    # A row shows the same view whatever batch (or process slice) it arrives in.
    assert torch.equal(view_choice(0, 3, 4, torch.tensor([7, 500])), step3[[7, 500]])
    assert torch.equal(view_choice(0, 3, 4, torch.tensor([500])), step3[[500]])
    assert (view_choice(0, 4, 4, rows) != step3).float().mean() > 0.6
    assert (view_choice(1, 3, 4, rows) != step3).float().mean() > 0.6
    assert torch.equal(view_choice(0, 3, 0, rows), torch.zeros_like(rows))


def test_bank_holds_each_view_encoded_once_and_cached(tiny_mobilenet_pth, images, tmp_path):
    backbone = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    cpu = torch.device("cpu")
    cache = FeatureCache.for_backbone(tmp_path / "cache", backbone, "cpu")
    bank = FeatureBank.compute(backbone, images, {}, cpu, cache=cache, augment=CFG, seed=5)
    memory = FeatureBank.compute(backbone, images, {}, cpu, augment=CFG, seed=5)
    assert bank.all().shape[0] == 4 * len(images) and bank.views == 3
    torch.testing.assert_close(memory.all(), bank.all(), rtol=1e-5, atol=1e-6)
    for path in images:
        row = bank.rows[path]
        for view in range(4):
            img = make_view(open_image(path), file_key(path), CFG, view)
            expected = encode_images(backbone, [img], cpu)[0]
            got = bank.all()[view * len(images) + row]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Reading again encodes nothing; the unaugmented bank reads view 0 from the same cache.
    shards = sorted(cache.dir.glob("shard-*"))
    again = FeatureBank.compute(backbone, images, {}, cpu, cache=cache, augment=CFG, seed=5)
    plain = FeatureBank.compute(backbone, images, {}, cpu, cache=cache)
    assert sorted(cache.dir.glob("shard-*")) == shards
    assert torch.equal(again.all(), bank.all())
    assert torch.equal(plain.all(), bank.all()[: len(images)])
    # Lookups: no step means the images themselves (evaluation); a step picks each row's view.
    rows = torch.tensor([2, 0, 1])
    assert torch.equal(bank.lookup(rows), plain.lookup(rows))
    views = view_choice(5, 9, 3, rows)
    assert torch.equal(bank.lookup(rows, step=9), bank.all()[rows + views * len(images)])
    assert torch.equal(bank.stats()[0], plain.stats()[0])
    # The per-step encoder (cache_features=false) shows the same views.
    on_the_fly = OnTheFlyFeatures(backbone, images, cpu, augment=CFG, seed=5)
    for step in range(4):
        torch.testing.assert_close(
            on_the_fly.lookup(rows, step=step), bank.lookup(rows, step=step), rtol=1e-5, atol=1e-5
        )


def test_bad_settings_name_the_key():
    for override, key in [
        ("data.augment.views=-1", "data.augment.views"),
        ("data.augment.scale_min=1.5", "data.augment.scale_min"),
        ("data.augment.rotate=200", "data.augment.rotate"),
        ("data.augment.noise=1.0", "data.augment.noise"),
        ("data.augment.background=1.5", "data.augment.background"),
    ]:
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe(RECIPE, [override])


def _augmented(tiny_overrides, out):
    views = [f"data.augment.{k}={v}" for k, v in vars(CFG).items()]
    views = [v.replace("True", "true") for v in views]
    return [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        f"output_dir={out}",
        *views,
        "max_steps=8",
        "checkpoint_every=4",
        "log_samples=true",
    ]


def test_training_with_views_resumes_bit_exactly(tiny_overrides, tmp_path):
    from adaptkit import checkpoint as ckpt

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(["train", RECIPE, *_augmented(tiny_overrides, ref)]) == 0
    # 6 training images encoded once into the disk cache, then of their 3 views each the ones the 8 steps
    # look up ...
    log = (ref / "train.log").read_text()
    assert "images: 0 read, 6 encoded and added" in log
    shown = int(re.search(r"the run's 8 steps look up (\d+) of the 18 views", log)[1])
    assert 0 < shown < 18 and f"augmented views: 0 read, {shown} encoded and added" in log
    # Die during the second checkpoint save (step 8), then resume from step 4's: same views, losses, weights.
    train_crashing_at_save([RECIPE, *_augmented(tiny_overrides, cut)], save=2)
    assert ckpt.latest_checkpoint(cut).name == "checkpoint-000004"
    log = (cut / "train.log").read_text()  # ... once
    assert "images: 6 read, 0 encoded" in log and f"augmented views: {shown} read, 0 encoded" in log
    assert main(["train", RECIPE, *_augmented(tiny_overrides, cut), "resume=auto"]) == 0

    def samples(run):
        return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]

    assert samples(ref) == samples(cut) and len(samples(ref)) > 4
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The same run without views draws the same batches. (Its losses are not compared: the tiny random
    # backbone maps a view within ~1e-7 of its image, so they can coincide; that steps look views up, and
    # read the right ones, is tests/test_shown_views.py's.)
    plain = tmp_path / "plain"
    assert main(["train", RECIPE, *_augmented(tiny_overrides, plain), "data.augment.views=0"]) == 0
    assert [r["indices"] for r in samples(plain)] == [r["indices"] for r in samples(ref)]


def test_cache_command_fills_the_training_views(tiny_overrides, tmp_path, capsys):
    overrides = _augmented(tiny_overrides, tmp_path / "run")
    assert main(["cache", RECIPE, *overrides]) == 0
    assert "images cached (+ 3 augmented views each)" in capsys.readouterr().out
    assert main(["train", RECIPE, *overrides]) == 0
    # Every image and view the run needs was already in the disk cache.
    log = (tmp_path / "run" / "train.log").read_text()
    shown = int(re.search(r"the run's 8 steps look up (\d+) of the 18 views", log)[1])
    assert (
        shown > 0
        and "images: 6 read, 0 encoded" in log
        and f"augmented views: {shown} read, 0 encoded" in log
    )
