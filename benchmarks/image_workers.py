"""Samples/s and memory by ``image_workers``: without a feature store (``cache_features=false``), or with it.

Where there is no disk for a feature store, every step decodes, augments, preprocesses and encodes its
images; with the store (``--features store``), the workers read each batch's stored rows. This runs
``adaptkit train`` (the default recipe) at each worker count, one run at a time (with the store, a first
untimed run fills it), on one of two kinds of data:

- ``--data photos``: photo-sized JPEGs (Fashion-MNIST's labelled photos, resized to ``--side`` px with
  sensor-like noise, quality 90, written once into ``--out``; two questions per photo, as
  ``fashionmnist:``), where decoding a file is real work: the users' case;
- ``--data easyvqa``: the default's own 64 px PNGs with its augmented views (each step makes its views).

Reported per run: training's median samples/s over the logged steps after the first log line (the first
holds the workers' start and the first compiled step), its peak memory as adaptkit reports it (the
training process), and the peak proportional set size (PSS) of the training process and its workers
together, sampled every second (PSS shares a page among the processes that map it, so fork's shared
pages are counted once).

    python benchmarks/image_workers.py --data photos --workers 0 2 --steps 30
    python benchmarks/image_workers.py --data easyvqa --features store --workers 0 2 --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def write_photos(out: Path, photos: int, side: int, seed: int = 0) -> Path:
    """``photos`` Fashion-MNIST training photos as ``side`` px JPEGs, with a VQA file over them."""
    import numpy as np
    from PIL import Image

    from adaptkit.data.fashion import load_fashion_vqa

    questions = out / "questions.jsonl"
    if questions.exists():
        return questions
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, names = [], {}
    for sample in load_fashion_vqa(f"train:{photos}").samples:
        if sample.image not in names:
            name = f"{len(names):05d}.jpg"
            big = Image.open(sample.image).convert("RGB").resize((side, side), Image.BICUBIC)
            noisy = np.asarray(big, dtype=np.float32) + rng.normal(0, 6, (side, side, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out / name, quality=90)
            names[sample.image] = name
        rows.append({"image": names[sample.image], "question": sample.question, "answer": sample.answer})
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions


def _pss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_full_info().pss
    return total / 2**20


def run(data: list[str], workers: int, steps: int, out: Path, store: bool = False) -> dict:
    """One ``adaptkit train`` run (features computed every step, or read from the store); its figures."""
    overrides = [
        *data,
        f"cache_features={str(store).lower()}",
        f"image_workers={workers}",
        f"max_steps={steps}",
        "log_every=5",
        "eval_every=0",
        "eval_limit=32",
        "checkpoint_every=0",
        f"output_dir={out}",
    ]
    cmd = [sys.executable, "-m", "adaptkit", "train", RECIPE, *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_mb(proc.pid))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if proc.wait() != 0:
        raise SystemExit(f"training failed: {' '.join(cmd)} (see {out}/train.log)")
    sampler.join()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "image_workers": workers,
        "samples_per_s": round(statistics.median(rates), 2),
        "training_peak_mb": summary["peak_memory_mb"]["training"],
        "tree_peak_pss_mb": round(peak[0]),
        "train_seconds": summary["train_seconds"],
    }


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", choices=("photos", "easyvqa"), default="photos")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--features", choices=("every-step", "store"), default="every-step")
    parser.add_argument("--photos", type=int, default=2000, help="photos written for --data photos")
    parser.add_argument("--side", type=int, default=640, help="their side in pixels")
    parser.add_argument("--out", type=Path, default=Path("/tmp/adaptkit_image_workers"))
    args = parser.parse_args()
    if args.data == "photos":
        questions = write_photos(args.out / f"photos_{args.photos}_{args.side}", args.photos, args.side)
        data = [f"data.train={questions}", f"data.eval={questions}"]
    else:
        data = []
    store = args.features == "store"
    runs = args.out / f"{args.data}_{args.features}_{time.strftime('%Y%m%d-%H%M%S')}"  # this call's runs
    if store:  # fill the store (the images and the views these steps show) before the timed runs
        run(data, 0, args.steps, runs / "fill", store)
    results = []
    for n, workers in enumerate(args.workers):  # a count may repeat (ABBA order): each run its own folder
        out = runs / f"{n}_w{workers}"
        results.append(run(data, workers, args.steps, out, store))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["samples_per_s"]
    for r in results:
        print(
            f"image_workers={r['image_workers']}: {r['samples_per_s']} samples/s "
            f"({r['samples_per_s'] / base:.2f}x image_workers={results[0]['image_workers']}), training "
            f"process peak {r['training_peak_mb']:.0f} MB, with workers (PSS) {r['tree_peak_pss_mb']} MB"
        )


if __name__ == "__main__":
    main()
