"""Scale of the frozen-feature store: training's peak memory and speed at N and 10N images.

For each size N a synthetic store of N images' features (``--tokens`` x ``--dim`` values each, the
recipe's ``feature_dtype``; by default the shape of a SigLIP-base tower, 196 x 768) is written into a
feature cache folder, then a fresh process trains the default recipe's trainable parts on it exactly as
`adaptkit train` reads features: a :class:`FeatureBank` over the store (rows read per lookup), the
feature statistics streamed over every image, batches packed and grouped as the recipe says, forward,
backward and AdamW. The Q-Former is built for the store's feature shape (the vision tower is not run:
the features already exist). The questions are easy-VQA's wording (``--questions`` per image), drawn at
random, so every lookup lands on rows spread over the whole store and, once the store outgrows the page
cache, on the disk.

Reported per size: the process's peak RSS before the store is opened (the model) and at the end, the
one-time statistics pass, samples/s over the timed steps and the share of step time spent reading
features. The last stdout line is one JSON object.

    python benchmarks/feature_store_scale.py compile=false feature_dtype=float16 --images 10000 100000

Writing the stores takes disk space (N x tokens x dim x the dtype's bytes: 30 GB at 100,000 images of
196 x 768 in float16, 60 GB in float32); a store that would not fit is refused before writing. ``--keep``
keeps them under ``--store`` for a second run, otherwise they are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "what is the color of the shape?",
    "what shape is in the image?",
    "is there a circle in the image?",
    "is there a red shape in the image?",
    "does the image contain a triangle?",
    "what color is the rectangle?",
    "is there not a blue shape in the image?",
    "which shape does the image contain?",
]
ANSWERS = ["red", "green", "blue", "circle", "rectangle", "triangle", "yes", "no"]


def _info(tokens: int, dim: int, dtype: str, images: int) -> dict:
    return {"key": f"synthetic-{images}x{tokens}x{dim}-{dtype}", "dtype": dtype, "synthetic": True}


def write_store(root: Path, images: int, tokens: int, dim: int, dtype: str) -> tuple[Path, float]:
    """A feature cache folder of ``images`` synthetic rows (a fixed random block per shard, shifted by the
    shard's number); returns the folder and the seconds spent writing it."""
    from adaptkit.data.feature_cache import SHARD_IMAGES, STORAGE_DTYPES, FeatureCache

    cache = FeatureCache(root, _info(tokens, dim, dtype, images))
    if (cache.dir / "complete").exists():
        return cache.dir, 0.0
    need = images * tokens * dim * STORAGE_DTYPES[dtype].itemsize
    free = shutil.disk_usage(cache.dir).free
    if need > 0.95 * free:
        shutil.rmtree(cache.dir)
        sys.exit(
            f"a store of {images} images needs {need / 1e9:.1f} GB and {root} has {free / 1e9:.1f} GB free"
        )
    start = time.perf_counter()
    block = torch.rand(SHARD_IMAGES, tokens, dim, generator=torch.Generator().manual_seed(0)) * 4
    block = block.to(STORAGE_DTYPES[dtype])
    for first in range(0, images, SHARD_IMAGES):
        n = min(SHARD_IMAGES, images - first)
        shift = (first // SHARD_IMAGES) % 7 * 0.125
        cache.put([f"img{i:07d}" for i in range(first, first + n)], block[:n] + shift)
        print(f"  store: {first + n}/{images} images", file=sys.stderr, flush=True)
    (cache.dir / "complete").touch()
    return cache.dir, time.perf_counter() - start


def child(args, overrides: list[str]) -> dict:
    """Train on the store of ``args.child`` images in this process; returns the figures."""
    from adaptkit.adapters import build_adapter
    from adaptkit.data.feature_cache import FeatureCache
    from adaptkit.data.features import FeatureBank
    from adaptkit.data.records import VQASample
    from adaptkit.data.sampling import ImagePackedBatches
    from adaptkit.model import build_model, prepare_for_training
    from adaptkit.model.batch import Batch
    from adaptkit.model.build import _hidden_std
    from adaptkit.model.fusion import make_fusion
    from adaptkit.perf import peak_memory_mb
    from adaptkit.recipes import load_recipe
    from adaptkit.tasks import get_task
    from adaptkit.train import build_optimizer

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, overrides)
    device = torch.device("cpu")
    model = build_model(recipe, device)
    lm = model.base_lm
    inject = model.entry_layer
    std = lm.get_input_embeddings().weight.float().std().item()
    if inject:
        std = _hidden_std(lm, model.tokenizer, inject)
    model.adapter = build_adapter(
        recipe.adapter, args.dim, lm.get_input_embeddings().embedding_dim, std, args.tokens
    )
    model.fusion = make_fusion(lm, model.adapter, model.tokenizer, inject)
    model.train()
    model_mb = peak_memory_mb(device)

    images = args.child
    cache = FeatureCache(args.store, _info(args.tokens, args.dim, recipe.feature_dtype, images))
    names = [f"img{i:07d}" for i in range(images)]
    start = time.perf_counter()
    bank = FeatureBank(cache.stored(names), {n: i for i, n in enumerate(names)}, {}, device=device)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    model.adapter.set_feature_stats(*bank.stats())
    stats_s = time.perf_counter() - start

    rng = random.Random(0)
    samples = [
        VQASample(
            image=n, question=rng.choice(QUESTIONS), answer=rng.choice(ANSWERS), origin=f"synthetic:{i}"
        )
        for i, n in enumerate(names)
        for _ in range(args.questions)
    ]
    task = get_task(recipe)
    ds = task.dataset(samples, bank.rows, model.tokenizer)
    task.setup_objectives(model, ds)
    lookups = (args.warmup + args.steps) * recipe.batch_size
    lower_states = prepare_for_training(model, recipe, task.texts(ds), lookups)
    collate = task.collate(model.tokenizer.pad_token_id, recipe.pack_questions)
    batches = ImagePackedBatches(
        ds.image_rows,
        recipe.batch_size,
        recipe.pack_questions,
        recipe.seed,
        task.lengths(ds),
        recipe.length_grouping,
        recipe.pack_max_tokens,
    ).batches(0)
    optimizer = build_optimizer(
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-5}], 0.0
    )
    step_s, read_s = [], []
    for n, ids in enumerate(batches[: args.warmup + args.steps]):
        t0 = time.perf_counter()
        batch = collate([ds[i] for i in ids])
        t1 = time.perf_counter()
        feats = bank.lookup(batch["image"], step=n)
        t2 = time.perf_counter()
        lm_in = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "answer_class") if k in batch}
        packing = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
        loss = model(Batch.of(feats, lm_in, **packing)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if n >= args.warmup:
            step_s.append(time.perf_counter() - t0)
            read_s.append(t2 - t1)
    seconds = sum(step_s)
    return {
        "images": images,
        "feature_shape": [args.tokens, args.dim],
        "feature_dtype": recipe.feature_dtype,
        "store_gb": round(
            images * args.tokens * args.dim * torch.empty(0, dtype=bank.source.dtype).element_size() / 1e9, 2
        ),
        "questions": len(samples),
        "peak_rss_mb_model": model_mb,
        "peak_rss_mb": peak_memory_mb(device),
        "open_s": round(open_s, 2),
        "stats_s": round(stats_s, 2),
        "samples_per_s": round(args.steps * recipe.batch_size / seconds, 2),
        "read_share": round(sum(read_s) / seconds, 4),
        "read_ms_per_step": round(1000 * sum(read_s) / len(read_s), 1),
        "lower_state_misses": None if lower_states is None else lower_states.misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    parser.add_argument("--recipe", default="recipes/easyvqa_qformer_lora.yaml")
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--questions", type=int, default=2, help="questions per image")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--store", type=Path, default=Path("/tmp/adaptkit_store_scale"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args, args.overrides)))
        return
    from adaptkit.recipes import load_recipe

    dtype = load_recipe(args.recipe, args.overrides).feature_dtype
    rows = []
    for images in args.images:
        folder, write_s = write_store(args.store, images, args.tokens, args.dim, dtype)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(images),
            "--recipe",
            args.recipe,
            "--store",
            str(args.store),
        ]
        for flag in ("tokens", "dim", "questions", "steps", "warmup"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        cmd += args.overrides
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the {images}-image run failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["write_s"] = round(write_s, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    base, top = rows[0], rows[-1]
    print(
        json.dumps(
            {
                "rows": rows,
                "peak_rss_ratio": round(top["peak_rss_mb"] / base["peak_rss_mb"], 3),
                "samples_per_s_ratio": round(top["samples_per_s"] / base["samples_per_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
