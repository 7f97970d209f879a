"""Colour names across shades: regions from the xkcd colour survey, and the ``data.augment.shades`` views that
move an image's colour within the region of the name its answers give it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image, ImageDraw

from adaptkit.config import AugmentConfig
from adaptkit.data.augment import make_view, recolour_shape, settings, view_key
from adaptkit.data.colour_names import image_colours, lab, regions, shades
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.features import FeatureBank
from adaptkit.data.pixels import OnTheFlyFeatures


def test_regions_come_from_the_survey_with_tone_only_modifiers():
    found = regions()
    names = {word: {name for name, _ in found[word]} for word in ("red", "brown", "blue", "gray", "teal")}
    assert {"red", "dark red", "bright red"} <= names["red"] and "brownish red" not in names["red"]
    assert {"brown", "dark brown", "light brown"} <= names["brown"] and "reddish brown" not in names["brown"]
    assert "teal blue" not in names["blue"] and "olive green" not in {n for n, _ in found["green"]}
    assert {"grey", "dark grey"} <= names["gray"] and "pale grey" not in names["gray"]  # too near white
    assert dict(found["brown"])["brown"] == (101, 55, 0)  # the survey's brown, not CSS's dark red
    assert max(abs(a - b) for a, b in zip(lab((255, 255, 255)), (100.0, 0.0, 0.0))) < 0.1


@pytest.mark.parametrize("name", ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black"])
def test_train_and_held_out_halves_split_every_region(name):
    train, held_out = shades(name), shades(name, "held_out")
    assert train and held_out and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(rgb for _, rgb in regions()[name])
    assert train[0] == regions()[name][0][1]  # the plain name's own shade trains
    others = [rgb for _, rgb in regions()[name][1:]]  # by lightness
    if len(others) >= 3:  # both ends train, so the held-out shades lie between seen ones
        assert others[0] in train and others[-1] in train
        lightness = [lab(rgb)[0] for rgb in held_out]
        assert lab(others[0])[0] <= min(lightness) and max(lightness) <= lab(others[-1])[0]
    assert shades("grey") == shades("gray") and shades("no-such-colour") == []


@dataclass
class Sample:
    image: str
    answer: str


def test_an_image_gets_the_one_colour_name_its_answers_give():
    samples = [
        Sample("a.png", "Brown"),
        Sample("a.png", "circle"),
        Sample("a.png", "yes"),
        Sample("b.png", "grey"),
        Sample("c.png", "red"),
        Sample("c.png", "blue"),  # two colours: left alone
        Sample("d.png", "triangle"),
    ]
    assert image_colours(samples) == {"a.png": "brown", "b.png": "gray"}


def _shape(fill, background=(240, 238, 236), size=64) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill=fill)
    return img


def test_recolour_moves_the_shape_and_leaves_the_background():
    img = _shape((165, 42, 42))
    out = recolour_shape(img, [240, 238, 236], (101, 55, 0))
    assert out.getpixel((32, 32)) == (101, 55, 0) and out.getpixel((2, 2)) == (240, 238, 236)
    plain = Image.new("RGB", (16, 16), (240, 238, 236))
    assert recolour_shape(plain, [240, 238, 236], (0, 0, 0)) is plain


def test_shade_views_take_shades_of_the_answer_and_have_their_own_keys():
    cfg = AugmentConfig(views=4, shades=1.0)
    img = _shape((0, 255, 0))
    seen = {make_view(img, "key", cfg, v, "green").getpixel((32, 32)) for v in range(1, 5)}
    assert seen <= set(shades("green")) and len(seen) > 1
    assert make_view(img, "key", cfg, 1, None).getpixel((32, 32)) == (0, 255, 0)  # no colour name: no move
    assert view_key("k", cfg, 1, "green") != view_key("k", cfg, 1, "blue") != view_key("k", cfg, 1)
    # Off (the default), the settings and so every earlier view's key are what they were.
    assert "shades" not in settings(AugmentConfig(views=2))


def test_banked_and_on_the_fly_shade_views_agree(tmp_path, tiny_mobilenet_pth):
    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.config import VisionConfig

    paths = []
    for i, fill in enumerate([(255, 0, 0), (0, 0, 255)]):
        path = tmp_path / f"{i}.png"
        _shape(fill).save(path)
        paths.append(str(path))
    colours = {paths[0]: "red", paths[1]: "blue"}
    backbone = build_vision_backbone(
        VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64, extra_layers=[])
    ).eval()
    cfg, cpu = AugmentConfig(views=2, shades=1.0), torch.device("cpu")
    cache = FeatureCache.for_backbone(tmp_path / "cache", backbone, cpu)
    bank = FeatureBank.compute(backbone, paths, {}, cpu, cache=cache, augment=cfg, colours=colours)
    fly = OnTheFlyFeatures(backbone, paths, cpu, augment=cfg, colours=colours)
    plain = FeatureBank.compute(backbone, paths, {}, cpu, cache=cache, augment=cfg)
    rows = torch.tensor([0, 1])
    for step in range(4):
        torch.testing.assert_close(bank.lookup(rows, step), fly.lookup(rows, step), atol=1e-5, rtol=1e-5)
    # Without colour names the views are other pixels, under other keys.
    assert not torch.equal(bank.source.read(torch.tensor([2])), plain.source.read(torch.tensor([2])))
