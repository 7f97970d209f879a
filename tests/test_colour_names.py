"""Colour names across shades: regions from the xkcd colour survey, and the ``data.augment.shades`` views that
move an image's colour within the region of the name its answers give it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from PIL import Image, ImageDraw

from adaptkit.config import AugmentConfig
from adaptkit.data.augment import augment_image, make_view, recolour_shape, settings, view_key
from adaptkit.data.colour_names import (
    BASIC,
    Colour,
    _distance,
    data_palette,
    draw_shade,
    image_colours,
    lab,
    named,
    regions,
    shades,
    srgb,
)
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


def test_srgb_inverts_lab_and_refuses_colours_outside_the_gamut():
    for rgb in [(0, 0, 0), (255, 255, 255), (101, 55, 0), (3, 67, 223), (130, 203, 178)]:
        assert srgb(lab(rgb)) == rgb
    assert srgb((50.0, 0.0, -150.0)) is None


def test_every_held_out_shade_lies_in_its_own_names_region():
    # The regions are the survey's training half, nearest-shade among the basic colour terms; a shade
    # people gave a name, held out of training, must fall in that name's region, or drawing inside the
    # regions could not teach it.
    for name in ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"):
        assert shades(name, "held_out")
        assert all(named(lab(rgb)) == name for rgb in shades(name, "held_out")), name
    assert named(lab((230, 110, 10))) == "orange" and "orange" in BASIC


def test_drawn_shades_stay_in_their_region_and_spread_beyond_the_training_shades():
    rng = random.Random(0)
    for name in ("blue", "brown", "red", "teal"):
        drawn = [draw_shade(name, rng.random, lambda: rng.gauss(0, 1)) for _ in range(200)]
        assert all(named(lab(rgb)) == name for rgb in drawn), name
        assert len(set(drawn) - set(shades(name))) > 150  # not only the survey's own shades
    assert draw_shade("no-such-colour", rng.random, rng.random) is None
    # A name beyond the basic terms takes its region from them.
    lime = [draw_shade("lime", rng.random, lambda: rng.gauss(0, 1)) for _ in range(50)]
    assert None not in lime and len(set(lime) - set(shades("lime"))) > 25


def test_the_datas_own_palette_takes_part_in_the_regions():
    # easy-VQA's "brown" is CSS 165,42,42, among the survey's reds: red draws keep clear of it once the
    # data's palette is given, and without it some land closer to it than to any red.
    css_brown = lab((165, 42, 42))
    palette = (("brown", (165, 42, 42)), ("red", (255, 0, 0)))
    rng = random.Random(0)
    bare = [draw_shade("red", rng.random, lambda: rng.gauss(0, 1)) for _ in range(300)]
    kept = [draw_shade(Colour("red", palette), rng.random, lambda: rng.gauss(0, 1)) for _ in range(300)]
    assert any(named(lab(rgb), palette) == "brown" for rgb in bare)
    assert all(named(lab(rgb), palette) == "red" for rgb in kept)
    assert min(_distance(lab(rgb), css_brown) for rgb in kept) > 5
    # Each name's main colours that at least 2% of its images have.
    mains = {f"{i}.png": (165, 42, 42) for i in range(60)} | {"odd.png": (10, 10, 10), "x.png": (0, 0, 255)}
    names = {image: "brown" for image in mains} | {"x.png": "blue"}
    assert data_palette(mains, names) == (("blue", (0, 0, 255)), ("brown", (165, 42, 42)))


def _shape(fill, background=(240, 238, 236), size=64) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill=fill)
    return img


def test_the_palette_comes_from_the_training_images_and_skips_unreadable_ones(tmp_path):
    from adaptkit.data.splits import with_palette

    names = {}
    drawn = [((165, 42, 42), "brown"), ((255, 0, 0), "red"), ((165, 42, 42), "brown")]
    for i, (fill, name) in enumerate(drawn):
        path = tmp_path / f"{i}.png"
        _shape(fill).save(path)
        names[str(path)] = name
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    names[str(broken)] = "red"  # left to the images' own check; its name still gets the palette
    palette = (("brown", (165, 42, 42)), ("red", (255, 0, 0)))
    assert with_palette(names, {}) == {path: Colour(name, palette) for path, name in names.items()}


def test_recolour_moves_the_shape_and_leaves_the_background():
    img = _shape((165, 42, 42))
    out = recolour_shape(img, [240, 238, 236], (101, 55, 0))
    assert out.getpixel((32, 32)) == (101, 55, 0) and out.getpixel((2, 2)) == (240, 238, 236)
    plain = Image.new("RGB", (16, 16), (240, 238, 236))
    assert recolour_shape(plain, [240, 238, 236], (0, 0, 0)) is plain


def test_recolour_moves_an_anti_aliased_edge_with_the_shape():
    # A lime disc drawn at 4x and downsampled, as easy-VQA draws: its edge pixels blend lime into the
    # background. Recoloured to a pale green, no pixel may keep lime's hue (a ring that names the old colour).
    back, lime, pale = (241, 252, 241), (0, 255, 0), (190, 249, 172)
    big = Image.new("RGB", (256, 256), back)
    ImageDraw.Draw(big).ellipse((40, 40, 200, 200), fill=lime)
    img = big.resize((64, 64), Image.Resampling.BOX)  # area-averaged: edges lie on the blend
    edges = [px for px in img.getdata() if px not in (back, lime)]
    assert len(edges) > 40  # the disc has an anti-aliased edge to move
    out = recolour_shape(img, list(back), pale)
    assert out.getpixel((32, 32)) == pale and out.getpixel((1, 1)) == back
    target = torch.tensor(pale, dtype=torch.float32) - torch.tensor(back, dtype=torch.float32)
    for px in out.getdata():  # every pixel on the blend from the background to the new shade
        offset = torch.tensor(px, dtype=torch.float32) - torch.tensor(back, dtype=torch.float32)
        share = float((offset @ target) / (target @ target))
        assert (offset - max(0.0, min(1.0, share)) * target).abs().sum() <= 12, px


def test_shade_views_take_shades_of_the_answer_and_have_their_own_keys():
    cfg = AugmentConfig(views=4, shades=1.0)
    img = _shape((0, 255, 0))
    seen = {make_view(img, "key", cfg, v, "green").getpixel((32, 32)) for v in range(1, 5)}
    assert {named(lab(rgb)) for rgb in seen} == {"green"} and len(seen) > 1
    assert make_view(img, "key", cfg, 1, None).getpixel((32, 32)) == (0, 255, 0)  # no colour name: no move
    assert view_key("k", cfg, 1, "green") != view_key("k", cfg, 1, "blue") != view_key("k", cfg, 1)
    # Off (the default), the settings and so every earlier view's key are what they were.
    assert "shades" not in settings(AugmentConfig(views=2))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fill_name(view: Image.Image, flat: Image.Image, fill, palette) -> str:
    """The name of ``view``'s shape colour: its median over the pixels ``flat`` (the same view unlit) has
    the flat fill in."""
    mask = (torch.tensor(list(flat.getdata())) - torch.tensor(fill)).abs().sum(1) <= 6
    median = torch.tensor(list(view.getdata()))[mask].median(0).values
    return named(lab(tuple(int(v) for v in median)), palette)


def test_light_changes_keep_the_colour_inside_its_names_region():
    # Brightness, contrast and an illumination ramp move a shape's colour: a brighter, flatter CSS brown
    # (easy-VQA's, a dark red) lands among the reds, a black among the grays. With a colour name, a view's
    # light is halved, then dropped, until the colour is its name's again; without one it stays as drawn.
    palette = (("black", (0, 0, 0)), ("brown", (165, 42, 42)), ("red", (255, 0, 0)))
    lit = AugmentConfig(views=40, brightness=0.3, contrast=0.4, gradient=0.3)
    unlit = AugmentConfig(views=40)
    for fill, name in [((165, 42, 42), "brown"), ((0, 0, 0), "black")]:
        img, colour = _shape(fill), Colour(name, palette)
        names = {"kept": [], "free": []}
        for seed in range(40):  # the same draws, lit or not
            flat = augment_image(img, unlit, _gen(seed), colour)
            names["kept"].append(_fill_name(augment_image(img, lit, _gen(seed), colour), flat, fill, palette))
            names["free"].append(_fill_name(augment_image(img, lit, _gen(seed), None), flat, fill, palette))
        assert set(names["kept"]) == {name}
        assert names["free"].count(name) < 36  # the check is needed: light alone renames some views
    # Views whose light keeps the colour are the ones drawn without the check, pixel for pixel.
    red = _shape((255, 0, 0))
    assert augment_image(red, lit, _gen(3), Colour("red", palette)).tobytes() == (
        augment_image(red, lit, _gen(3), None).tobytes()
    )


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
