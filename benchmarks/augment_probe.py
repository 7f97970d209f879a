"""Linear probe of augmentation settings: do the recipe's frozen features, trained on with its augmented
views, still name colours and shapes on images from another renderer? Minutes, not a training run.

Per-image labels come from the datasets' own questions ("what color is the shape?" -> red, ...). Features
of the recipe's vision backbone (``vision.*``) are pooled (mean and max over tokens), standardised with
training statistics; a linear classifier (Adam, 200 full-batch steps) is trained on ``--train-images``
easy-VQA training images plus ``data.augment.views`` augmented views of each (``data.augment.*``, as
training makes them) and scored on easy-VQA test images and on every ``--ood`` set. A screening tool for
settings before a training run; the figures that count are ``adaptkit eval`` on trained runs.

    python benchmarks/augment_probe.py --ood data/ood_vqa/questions.jsonl data.augment.views=0
    python benchmarks/augment_probe.py --ood data/ood_vqa/questions.jsonl vision.image_size=224 \\
        data.augment.views=4 data.augment.background=0.7
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.data.augment import make_view
from adaptkit.data.encoding import encode_images
from adaptkit.data.feature_cache import file_key
from adaptkit.data.formats import load_easyvqa, load_jsonl
from adaptkit.data.images import open_image
from adaptkit.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red", "green", "blue", "black", "gray", "teal", "yellow", "brown"}
SHAPES = {"circle", "rectangle", "triangle"}


def labels(samples) -> dict[str, tuple[str, str]]:
    """image -> (colour, shape), for images whose questions give both."""
    colour, shape = {}, {}
    for s in samples:
        if s.answer in COLORS:
            colour[s.image] = s.answer
        if s.answer in SHAPES:
            shape[s.image] = s.answer
    return {img: (colour[img], shape[img]) for img in colour if img in shape}


def pooled(backbone, images) -> torch.Tensor:
    chunks = []
    for i in range(0, len(images), 64):
        feats = encode_images(backbone, images[i : i + 64], torch.device("cpu"))
        chunks.append(torch.cat([feats.mean(1), feats.amax(1)], dim=-1))
    return torch.cat(chunks)


def fit_and_score(x_train, y_train, tests: dict) -> dict:
    classes = sorted(set(y_train))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    target = torch.tensor([classes.index(c) for c in y_train])
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], len(classes))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear((x_train - mean) / std), target).backward()
        optimizer.step()
    out = {}
    for name, (x, y) in tests.items():
        with torch.no_grad():
            pred = linear((x - mean) / std).argmax(-1).tolist()
        wrong = Counter(f"{a}->{classes[p]}" for a, p in zip(y, pred) if a != classes[p])
        out[name] = {
            "accuracy": round(sum(a == classes[p] for a, p in zip(y, pred)) / len(y), 4),
            "top_errors": wrong.most_common(4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "easyvqa_qformer_lora.yaml"))
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--ood", action="append", default=[], help="a VQA JSONL in easy-VQA's answer space")
    parser.add_argument("overrides", nargs="*", help="recipe key=value (vision.*, data.augment.*)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    aug = recipe.data.augment
    backbone = build_vision_backbone(recipe.vision)
    train = list(labels(load_easyvqa("train").samples).items())[: args.train_images]
    start = time.perf_counter()
    images, y_colour, y_shape = [], [], []
    for path, (colour, shape) in train:
        img, key = open_image(path), file_key(path)
        for view in range(aug.views + 1):
            images.append(make_view(img, key, aug, view))
            y_colour.append(colour)
            y_shape.append(shape)
    x_train = pooled(backbone, images)
    seconds = time.perf_counter() - start
    sets = {"easyvqa_test": list(labels(load_easyvqa("test").samples).items())[: args.test_images]}
    for spec in args.ood:
        sets[spec] = list(labels(load_jsonl(spec).samples).items())
    tests = {
        name: (pooled(backbone, [open_image(p) for p, _ in items]), items) for name, items in sets.items()
    }
    result = {
        "vision": f"{recipe.vision.name} {recipe.vision.image_size}px layers {recipe.vision.extra_layers}+"
        f"{recipe.vision.feature_layer}",
        "augment": vars(aug),
        "train_images": len(train),
        "train_views_encoded": len(images),
        "encode_images_per_s": round(len(images) / seconds, 1),
    }
    for task, ys, index in (("colour", y_colour, 0), ("shape", y_shape, 1)):
        scored = {name: (x, [lab[index] for _, lab in items]) for name, (x, items) in tests.items()}
        result[task] = fit_and_score(x_train, ys, scored)
        print(task, json.dumps(result[task]), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
