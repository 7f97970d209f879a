"""What colour names the default recipe's training views teach (issue 34, part 5): a nearest-neighbour vote.

Each training view's shape colour (the median of the shape's interior pixels after all of the view's
augmentation) is a point in CIELAB labelled with the colour name the image's answers give. For each held-out
survey shade (the ones ``benchmarks/ood_vqa.py --style shades`` draws) and for easy-VQA's CSS colours
jittered by +-10 (the OOD set's), the 25 nearest training views vote on its name: what a learner that
read the shape's colour perfectly would answer, given these views. A held-out shade voted wrong is one
the training data itself teaches the wrong name for, whatever the model.

    python benchmarks/colour_cloud.py --images 1500

It also counts the views whose shape colour, after their light (brightness, contrast, ramp), lies outside
its name's region. (Light halved, then dropped, where it would rename the shape: tried at a3e03a1 and not
adopted while shade views kept the old colour in their edges; the default since 30ab976, after that fix:
docs/experiments.md. Run it at d0cb9ed for the views before.)

~30 s for 1,500 images (6,400 views) on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import torch
from colour_diagnosis import unlit_view  # the script's folder is on sys.path
from ood_vqa import COLORS as CSS  # easy-VQA's colours (the script's folder is on sys.path)
from PIL import Image

import adaptkit.data.augment as augment
from adaptkit.data.colour_names import _distance, image_colours, in_region, lab, shades
from adaptkit.data.feature_cache import file_key
from adaptkit.data.formats import load_easyvqa
from adaptkit.data.splits import with_palette
from adaptkit.recipes import load_recipe

NAMES = ("red", "brown", "green", "teal", "blue", "gray", "yellow", "black")


def shape_colour(view: Image.Image, twin: Image.Image) -> tuple[int, int, int] | None:
    """The median colour of the shape's interior in ``view``, the shape found in ``twin`` (the same view
    without light: its flat fill, eroded by one pixel so anti-aliased edges stay out)."""
    pixels = augment.TF.pil_to_tensor(twin)
    fill = augment.main_colour(twin, list(augment.border_colour(twin)))
    if fill is None:
        return None
    near = (pixels.float() - torch.tensor(fill, dtype=torch.float32)[:, None, None]).abs().sum(0) < 12
    inside = torch.nn.functional.max_pool2d((~near).float()[None, None], 3, 1, 1)[0, 0] == 0
    if int(inside.sum()) < 4:
        return None
    values = augment.TF.pil_to_tensor(view)[:, inside].float().median(dim=1).values
    return tuple(int(v) for v in values)


def training_points(images: int, seed: int) -> tuple[list, Counter]:
    """(CIELAB colour, name) of every view of ``images`` training images with one colour name, and per name
    how many views' light carries the shape out of its name's region."""
    recipe = load_recipe("recipes/easyvqa_qformer_lora.yaml")
    cfg = recipe.data.augment
    colours = with_palette(image_colours(load_easyvqa("train").samples), {})
    chosen = sorted(colours)
    random.Random(seed).shuffle(chosen)
    points, renamed = [], Counter()
    for path in chosen[:images]:
        img, colour = Image.open(path).convert("RGB"), colours[path]
        key = file_key(path)  # the image's content key: the views' draws are training's own
        for view in range(cfg.views + 1):
            if view == 0:
                found = shape_colour(img, img)
            else:
                lit = augment.make_view(img, key, cfg, view, colour)
                found = shape_colour(lit, unlit_view(img, key, cfg, view, colour))
            if found is not None:
                renamed[colour.name] += not in_region(lab(found), colour)
                points.append((lab(found), colour.name))
    return points, renamed


def vote(points: list, rgb: tuple[int, int, int], k: int = 25) -> list[tuple[str, int]]:
    colour = lab(rgb)
    nearest = sorted(points, key=lambda p: _distance(colour, p[0]))[:k]
    return Counter(name for _, name in nearest).most_common()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    points, renamed = training_points(args.images, args.seed)
    print(f"{len(points)} views of {args.images} images in {time.perf_counter() - started:.0f} s; "
          f"{renamed.total()} of them with a shape colour outside its name's region")  # fmt: skip
    views = Counter(name for _, name in points)
    print("  per name:", ", ".join(f"{n} {renamed[n]} of {views[n]}" for n in NAMES))
    right = 0
    for name in NAMES:
        for rgb in shades(name, "held_out"):
            votes = vote(points, rgb)
            right += votes[0][0] == name
            print(f"held-out {name:6s} {rgb}: {votes}{'' if votes[0][0] == name else '  <- wrong'}")
    total = sum(len(shades(name, "held_out")) for name in NAMES)
    print(f"held-out shades the training views name right: {right} of {total}")
    rng = random.Random(args.seed)
    for name, base in CSS.items():
        jittered = [tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in base) for _ in range(20)]
        print(f"CSS {name} jittered +-10: {sum(vote(points, rgb)[0][0] == name for rgb in jittered)} of 20")


if __name__ == "__main__":
    main()
