"""The floor any image model must clear: multinomial logistic regression on raw pixels.

Trains on the images of a Fashion-MNIST split (``--train``, e.g. ``train:20000``: the same photos a recipe
trains on) and reports its accuracy on ``--test``: the 10-way "what kind of item is this?" question, which
adaptkit's VQA runs report as ``accuracy_other``. Pixels in [0, 1], one weight per pixel and class plus a
bias, an L2 penalty chosen on the last 10% of the training images (held out), then refit on all of them;
full-batch L-BFGS. The last stdout line is one JSON object.

    python benchmarks/pixel_baseline.py --train train:20000 --test test
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from adaptkit.data.fashion import read_split

    grid, labels = read_split(split)
    return grid.flatten(1).float() / 255, torch.tensor(labels)


def fit(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> torch.nn.Linear:
    model = torch.nn.Linear(x.shape[1], 10)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def accuracy(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default="train:20000")
    parser.add_argument("--test", default="test")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y = _pixels(args.train)
    x_test, y_test = _pixels(args.test)
    cut = int(0.9 * len(x))
    held = {}
    for l2 in (1e-5, 1e-4, 1e-3, 1e-2):
        held[l2] = accuracy(fit(x[:cut], y[:cut], l2), x[cut:], y[cut:])
        print(f"l2={l2:g}: held-out accuracy {held[l2]:.4f}", flush=True)
    best = max(held, key=held.get)
    model = fit(x, y, best)
    result = {
        "train": args.train,
        "test": args.test,
        "train_images": len(x),
        "l2": best,
        "train_accuracy": round(accuracy(model, x, y), 4),
        "test_accuracy": round(accuracy(model, x_test, y_test), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
