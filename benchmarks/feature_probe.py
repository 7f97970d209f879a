"""Linear probe: how well do a frozen backbone's features separate easy-VQA colours and shapes?

Labels per image come from the dataset's own questions ("what color is the shape?" -> red, ...).
Features are pooled (mean and max over tokens), standardised with training statistics, and a linear
classifier is trained with Adam. Prints one line per configuration and a JSON object last.

    python benchmarks/feature_probe.py                       # MobileNetV2 last layer, layers 13 and 6
    python benchmarks/feature_probe.py --config 128:-1 --config 224:-1 --train-images 1500
"""

from __future__ import annotations

import argparse
import json

import torch

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.config import VisionConfig
from adaptkit.data.encoding import encode_images
from adaptkit.data.formats import load_easyvqa
from adaptkit.data.images import open_image

COLORS = {"red", "green", "blue", "black", "gray", "teal", "yellow", "brown"}
SHAPES = {"circle", "rectangle", "triangle"}


def image_labels(split: str) -> tuple[dict[str, str], dict[str, str]]:
    colour, shape = {}, {}
    for sample in load_easyvqa(split).samples:
        if sample.answer in COLORS:
            colour[sample.image] = sample.answer
        if sample.answer in SHAPES:
            shape[sample.image] = sample.answer
    return colour, shape


def pooled(backbone, paths: list[str]) -> torch.Tensor:
    chunks = []
    for i in range(0, len(paths), 128):
        feats = encode_images(backbone, [open_image(p) for p in paths[i : i + 128]], torch.device("cpu"))
        chunks.append(torch.cat([feats.mean(1), feats.amax(1)], dim=-1))
    return torch.cat(chunks)


def probe(backbone, train: dict[str, str], test: dict[str, str], n_train: int, n_test: int) -> float:
    train_paths, test_paths = list(train)[:n_train], list(test)[:n_test]
    classes = sorted(set(train.values()))
    x_train, x_test = pooled(backbone, train_paths), pooled(backbone, test_paths)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.tensor([classes.index(train[p]) for p in train_paths])
    y_test = torch.tensor([classes.index(test[p]) for p in test_paths])
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], len(classes))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(x_test).argmax(-1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="IMAGE_SIZE:FEATURE_LAYER (repeatable)")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--test-images", type=int, default=500)
    args = parser.parse_args()
    configs = args.config or ["128:-1", "128:13", "128:6"]
    train_colour, train_shape = image_labels("train")
    test_colour, test_shape = image_labels("test")
    results = []
    for item in configs:
        size, layer = (int(v) for v in item.split(":"))
        backbone = build_vision_backbone(VisionConfig(image_size=size, feature_layer=layer))
        row = {
            "image_size": size,
            "feature_layer": layer,
            "dim": backbone.feature_dim,
            "tokens": backbone.num_tokens,
            "colour_acc": round(
                probe(backbone, train_colour, test_colour, args.train_images, args.test_images), 4
            ),
            "shape_acc": round(
                probe(backbone, train_shape, test_shape, args.train_images, args.test_images), 4
            ),
        }
        results.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(json.dumps({"probe": results}))


if __name__ == "__main__":
    main()
