"""Where the default's colour answers on unseen shades are lost (issue 34, part 5): three colour-question sets
on easy-VQA's own renderer, beside ``benchmarks/ood_vqa.py``'s sets on ours.

- ``train_views``: training images' shade views exactly as training encodes them (``data.augment.shades``
  drew a shade for them; the recipe's geometry and light): does the model fit its own shade views?
- ``test_region``: easy-VQA test images, the shape moved to a shade drawn afresh inside its name's region
  from the survey's training half (``colour_names.draw_shade``), nothing else changed.
- ``test_held``: the same test images, the shape moved to one of its name's held-out survey shades (those
  ``ood_vqa.py --style shades`` draws): do held-out shades cost more than shades like the training ones?

Each set holds the colour questions ("what color is the shape?", ...) of its images, as adaptkit VQA JSONL:

    python benchmarks/colour_diagnosis.py --out data/colour_diag
    adaptkit eval RUN --data data/colour_diag/test_held/questions.jsonl --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

from PIL import Image

from adaptkit.data.augment import (
    _generator,
    augment_image,
    border_colour,
    main_colour,
    make_view,
    recolour_shape,
)
from adaptkit.data.colour_names import draw_shade, image_colours, shades
from adaptkit.data.feature_cache import file_key
from adaptkit.data.formats import load_easyvqa
from adaptkit.data.splits import with_palette
from adaptkit.recipes import load_recipe

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def _colour_questions(samples) -> tuple[dict, dict]:
    """image → its one colour name (:class:`Colour`, with the split's palette), image → [(question, answer)]
    of the questions whose answer is that colour."""
    colours = with_palette(image_colours(samples), {})
    asked: dict[str, list] = {}
    for s in samples:
        if s.image in colours and s.answer == colours[s.image].name:
            asked.setdefault(s.image, []).append((s.question, s.answer))
    return colours, asked


def unlit_view(img: Image.Image, key: str, cfg, view: int, colour) -> Image.Image:
    """View ``view`` (>= 1) of ``img`` (content ``key``) with training's own draws but without its light
    (brightness, contrast, gain, ramp): the same geometry, background and shade, the shape one flat fill."""
    dark = dataclasses.replace(cfg, brightness=0.0, contrast=0.0, channel_gain=0.0, gradient=0.0)
    return augment_image(img, dark, _generator(key, cfg, view, colour), colour)


def _shade_views(img: Image.Image, path: str, colour, cfg) -> list[tuple[int, Image.Image]]:
    """The views of ``img`` that training shows with a drawn shade (found by drawing each view again without
    its light and comparing the shape's colour with the image's own)."""
    key, border = file_key(path), list(border_colour(img))
    own, out = main_colour(img, border), []
    for view in range(1, cfg.views + 1):
        unlit = unlit_view(img, key, cfg, view, colour)
        if main_colour(unlit, border) not in (None, own):
            out.append((view, make_view(img, key, cfg, view, colour)))
    return out


def generate(out: Path, images: int = 300, seed: int = 0) -> dict[str, int]:
    """Write the three sets under ``out``; returns each one's number of questions."""
    cfg = load_recipe(RECIPE).data.augment
    rng = random.Random(seed)
    counts = {}
    for name, split in (("train_views", "train"), ("test_region", "test"), ("test_held", "test")):
        colours, asked = _colour_questions(load_easyvqa(split).samples)
        chosen = sorted(asked)
        random.Random(seed).shuffle(chosen)
        (out / name / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i, path in enumerate(chosen[:images]):
            img, colour = Image.open(path).convert("RGB"), colours[path]
            if name == "train_views":
                made = _shade_views(img, path, colour, cfg)
            elif name == "test_region":
                shade = draw_shade(colour, rng.random, lambda: rng.gauss(0.0, 1.0))
                made = [(0, recolour_shape(img, list(border_colour(img)), shade))]
            else:
                shade = rng.choice(shades(colour.name, "held_out"))
                made = [(0, recolour_shape(img, list(border_colour(img)), shade))]
            for view, picture in made:
                file = f"images/{i:04d}_{view}.png"
                picture.save(out / name / file)
                lines += [{"image": file, "question": q, "answer": a} for q, a in asked[path]]
        (out / name / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        counts[name] = len(lines)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/colour_diag"))
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, n in generate(args.out, args.images, args.seed).items():
        print(f"{name}: {n} colour questions in {args.out / name / 'questions.jsonl'}")


if __name__ == "__main__":
    main()
