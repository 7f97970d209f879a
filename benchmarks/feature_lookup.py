"""What a training batch's feature lookup costs: rows read from the on-disk store against the same features
held in memory (what ``FeatureBank`` did before the store stayed on disk).

Uses the recipe's training images from the feature cache (filled first if needed), with its augmented views;
each lookup takes ``--images`` random rows at a step, as a training batch does. The last stdout line is one
JSON object.

    python benchmarks/feature_lookup.py                       # the default recipe, its feature_dtype
    python benchmarks/feature_lookup.py feature_dtype=float16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_ms(bank, rows_per_batch: int, batches: int) -> float:
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(batches):
        rows = torch.randint(0, len(bank.rows), (rows_per_batch,), generator=generator)
        start = time.perf_counter()
        bank.lookup(rows, step=step)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[batches // 10 :])


def main() -> None:
    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.data.feature_cache import STORAGE_DTYPES
    from adaptkit.data.features import FeatureBank
    from adaptkit.data.splits import build_features, feature_cache_root
    from adaptkit.recipes import load_recipe
    from adaptkit.tasks import get_task

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    parser.add_argument("--recipe", default="recipes/easyvqa_qformer_lora.yaml")
    parser.add_argument("--images", type=int, default=20, help="distinct images per batch")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    root = feature_cache_root(recipe.feature_cache_dir)
    if root is None:
        raise SystemExit("the recipe keeps no feature store (feature_cache_dir=none)")
    vision = build_vision_backbone(recipe.vision, "cpu")
    data = get_task(recipe).load(recipe.data.train, "skip")
    store = build_features(
        vision,
        data.samples,
        torch.device("cpu"),
        cache=True,
        skip_bad=True,
        desc="feature store",
        cache_root=root,
        augment=recipe.data.augment if recipe.data.augment.views else None,
        dtype=STORAGE_DTYPES[recipe.feature_dtype],
    )
    memory = FeatureBank(store.all(), store.rows, {}, store.views, store.seed)
    row = {
        "feature_dtype": recipe.feature_dtype,
        "rows": len(store.source),
        "feature_shape": list(store.shape),
        "images_per_batch": args.images,
        "store_ms": round(_median_ms(store, args.images, args.batches), 2),
        "memory_ms": round(_median_ms(memory, args.images, args.batches), 2),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
