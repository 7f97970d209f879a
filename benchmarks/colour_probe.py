"""Which MobileNetV2 layer names colours across shades: a linear probe on frozen features (issue 34, part 5).

Logistic regression (L-BFGS, L2 1e-3, standardised features) on 800 easy-VQA training images whose answers
name one colour, each with 2 views recoloured to a shade drawn inside its name's region
(``colour_names.draw_shade``) under the default recipe's geometry, then evaluated on the colour questions of
easy-VQA's test split, of an out-of-distribution shade set (a tuning set) and of the OOD set. Per layer, the
features are pooled over the whole image, over the shape's pixels (those far from the border colour), or
over the 7x7 tokens the shape covers (what attention over the model's tokens can reach). Run from the
repository root after generating the sets:

    python benchmarks/ood_vqa.py --out data/ood_vqa_shades2 --style shades --seed 4
    python benchmarks/ood_vqa.py --out data/ood_vqa
    python benchmarks/colour_probe.py   # ~10 min on 2 cores
"""

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.config import AugmentConfig, VisionConfig
from adaptkit.data.augment import augment_image, border_colour, recolour_shape
from adaptkit.data.colour_names import draw_shade, image_colours
from adaptkit.data.formats import load_easyvqa

NAMES = ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"]
LAYERS = [-1, 0, 1, 2, 3, 6, 18]  # -1: the pixels themselves
POOLS = ("image", "shape", "tokens")
VIEWS = AugmentConfig(  # the default recipe's geometry and light
    views=4, scale_min=0.3, scale_max=1.1, rotate=180.0, translate=0.2, flip=True,
    brightness=0.1, contrast=0.2, gradient=0.15, background=0.7,
)  # fmt: skip


def shape_mask(img: Image.Image) -> torch.Tensor:
    big = img.resize((224, 224))
    pixels = torch.tensor(list(big.get_flattened_data()), dtype=torch.float32).T.reshape(3, 224, 224)
    border = torch.tensor(border_colour(big), dtype=torch.float32)[:, None, None]
    return ((pixels - border).abs().sum(0) > 60).float()


def pools(x: torch.Tensor, masks: torch.Tensor, tokens: torch.Tensor) -> dict:
    """One layer's map ``x`` pooled three ways: over the image, over the shape's pixels (``masks``), and over
    the 7x7 grid cells the model's tokens are (the layer average-pooled to the last grid, as
    ``vision.extra_layers`` pools it) that the shape covers (``tokens``: those cells, as a 0/1 weight)."""
    m = F.adaptive_avg_pool2d(masks, x.shape[-2:])
    cells = F.adaptive_avg_pool2d(x, (7, 7)).flatten(2)
    return {
        "image": x.mean((2, 3)),
        "shape": (x * m).sum((2, 3)) / (m.sum((2, 3)) + 1e-3),
        "tokens": (cells * tokens).sum(2) / tokens.sum(2),
    }


def encode(vision, images: list) -> dict:
    """Per layer (-1: the image's pixels) and pooling, the features of ``images``."""
    out = {(layer, pool): [] for layer in LAYERS for pool in POOLS}
    with torch.no_grad():
        for i in range(0, len(images), 64):
            chunk = images[i : i + 64]
            pixels = vision.preprocess(chunk)
            masks = torch.stack([shape_mask(img) for img in chunk])[:, None]
            cover = F.adaptive_avg_pool2d(masks, (7, 7)).flatten(1)
            # the cells at least half shape, or the most covered one (a small shape)
            tokens = ((cover >= 0.5) | (cover >= cover.max(1, keepdim=True).values)).float()[:, None]
            maps = [(-1, pixels)]
            x = (pixels - vision.mean) / vision.std
            for j, block in enumerate(vision.trunk):
                x = block(x)
                maps.append((j, x))
            for j, x in maps:
                if j in LAYERS:
                    for pool, value in pools(x, masks, tokens).items():
                        out[(j, pool)].append(value)
    return {key: torch.cat(parts) for key, parts in out.items()}


def easyvqa_colours(split: str, n: int) -> list:
    items = sorted(image_colours(load_easyvqa(split).samples).items())
    random.Random(0).shuffle(items)
    return items[:n]


def ood_colours(folder: str) -> list:
    items = {}
    with open(Path(folder) / "colour.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            items[str(Path(folder) / row["image"])] = row["answer"]
    return sorted(items.items())


def fit(x: torch.Tensor, y: torch.Tensor, steps: int = 200):
    mu, sd = x.mean(0), x.std(0) + 1e-4
    w = torch.zeros(x.shape[1], len(NAMES), requires_grad=True)
    b = torch.zeros(len(NAMES), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    xn = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xn @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((z - mu) / sd @ w + b).argmax(1)


def main() -> None:
    torch.manual_seed(0)
    start = time.time()
    vision = build_vision_backbone(VisionConfig(extra_layers=[2, 6, 13])).eval()
    train = easyvqa_colours("train", 800)
    images = [Image.open(path).convert("RGB") for path, _ in train]
    labels = [NAMES.index(name) for _, name in train]
    rng = random.Random(1)
    views, view_labels = [], []
    for img, (_, name), label in zip(images, train, labels):
        for _ in range(2):
            gen = torch.Generator().manual_seed(rng.randrange(2**31))
            shade = draw_shade(name, rng.random, lambda: rng.gauss(0, 1))
            views.append(augment_image(recolour_shape(img, list(border_colour(img)), shade), VIEWS, gen))
            view_labels.append(label)
    plain, shaded = encode(vision, images), encode(vision, views)
    sets = {
        "easy-VQA test": easyvqa_colours("test", 300),
        "OOD-shades2": ood_colours("data/ood_vqa_shades2"),
        "OOD": ood_colours("data/ood_vqa"),
    }
    tests = {
        name: (
            encode(vision, [Image.open(path).convert("RGB") for path, _ in items]),
            torch.tensor([NAMES.index(answer) for _, answer in items]),
        )
        for name, items in sets.items()
    }
    print(f"encoded in {time.time() - start:.0f} s", flush=True)
    y = torch.tensor(labels + view_labels)
    for key in plain:
        predict = fit(torch.cat([plain[key], shaded[key]]), y)
        scores = {
            name: f"{100 * float((predict(z[key]) == t).float().mean()):.1f}%"
            for name, (z, t) in tests.items()
        }
        print(f"layer {key[0]:>2}, pooled over the {key[1]}:", scores, flush=True)


if __name__ == "__main__":
    main()
