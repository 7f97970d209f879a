"""What filling the feature cache costs per image: the frozen backbone eager against compiled
(``vision.compile``, ``adaptkit.data.encoding.BatchEncoder``), on the recipe's training images and their
augmented views, decoded and preprocessed as ``FeatureBank.compute`` does. Also how far the two paths'
features lie apart. Nothing is written to the cache. The last stdout line is one JSON object.

    python benchmarks/encoding.py                    # the default recipe's backbone, 640 images and views
    python benchmarks/encoding.py --images 1280 vision.image_size=128
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(encoder, items, origins, augment, keys, batch: int) -> tuple[float, float, torch.Tensor]:
    """(first batch's seconds, the later batches' seconds per item, every item's features)."""
    from tqdm.auto import tqdm

    from adaptkit.data.encoding import encode_items

    with tqdm(total=len(items), disable=True) as bar:
        start = time.perf_counter()
        _, head = encode_items(encoder, items[:batch], origins, batch, False, {}, bar, augment, keys)
        first = time.perf_counter() - start
        start = time.perf_counter()
        _, rest = encode_items(encoder, items[batch:], origins, batch, False, {}, bar, augment, keys)
        per_item = (time.perf_counter() - start) / max(len(items) - batch, 1)
    return first, per_item, torch.cat(head + rest)


def main() -> None:
    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.data.encoding import BatchEncoder
    from adaptkit.data.feature_cache import file_key
    from adaptkit.recipes import load_recipe
    from adaptkit.tasks import get_task

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    parser.add_argument("--recipe", default="recipes/easyvqa_qformer_lora.yaml")
    parser.add_argument("--images", type=int, default=640, help="images and views encoded per path")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (FeatureBank's default)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    device = torch.device("cpu")
    vision = build_vision_backbone(recipe.vision, device)
    samples = get_task(recipe).load(recipe.data.train, "skip").samples
    views = recipe.data.augment.views
    paths = list(dict.fromkeys(s.image for s in samples))
    items = [(p, v) for v in range(views + 1) for p in paths][: args.images]
    keys = {p: file_key(p) for p, _ in items} if views else {}
    origins = {s.image: s.origin for s in samples}
    augment = recipe.data.augment if views else None
    result = {"images": len(items), "views": views, "threads": torch.get_num_threads()}
    feats = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        encoder = BatchEncoder(vision, device, batch_size=args.batch, compiled=compiled)
        first, per_item, feats[name] = timed(encoder, items, origins, augment, keys, args.batch)
        result[f"{name}_ms_per_image"] = round(1000 * per_item, 2)
        if compiled:
            result["compiled"] = encoder.graph is not None
            result["compile_s"] = round(max(0.0, first - args.batch * per_item), 1)
        print(f"{name}: {1000 * per_item:.1f} ms per image", flush=True)
    result["speedup"] = round(result["eager_ms_per_image"] / result["compiled_ms_per_image"], 2)
    gap = (feats["compiled"] - feats["eager"]).abs()
    result["max_abs_diff"] = float(gap.max())
    result["max_abs_feature"] = float(feats["eager"].abs().max())
    # Images after which compiling has paid for itself.
    saved = result["eager_ms_per_image"] - result["compiled_ms_per_image"]
    result["break_even_images"] = round(1000 * result["compile_s"] / saved) if saved > 0 else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
