"""Rank texts for images with an ``adaptkit export --format hf-remote-code`` folder of a retrieval run and
transformers alone, the way a user without adaptkit runs it (an import hook refuses adaptkit).

    python -I benchmarks/remote_rank.py EXPORT_DIR IMAGES.jsonl TEXTS.json OUT.jsonl [--batch-size 64]

IMAGES.jsonl: one ``{"image": path, ...}`` per line. TEXTS.json: ``{"classes": [prompt, ...], "texts":
[text, ...]}``. OUT.jsonl: the same lines with ``predicted_class`` (the index of the best class prompt)
and ``best_text`` (the best of ``texts``), both from
``model(**processor(images=..., text=...)).logits_per_image``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python -I leaves the script's folder out
import remote_answers  # noqa: E402  (its import hook refuses adaptkit)


def main() -> None:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoModel

    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("images")
    parser.add_argument("texts")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    model, processor, rows = remote_answers.load(AutoModel, args.export, args.images)
    with open(args.texts) as handle:
        texts = json.load(handle)
    everything = texts["classes"] + texts["texts"]
    started = time.perf_counter()
    with open(args.out, "w") as out, torch.inference_mode():
        for i in tqdm(range(0, len(rows), args.batch_size), desc="ranking", unit="batch"):
            batch = rows[i : i + args.batch_size]
            images = [Image.open(r["image"]).convert("RGB") for r in batch]
            logits = model(**processor(images=images, text=everything)).logits_per_image
            classes, rest = logits[:, : len(texts["classes"])], logits[:, len(texts["classes"]) :]
            for row, c, t in zip(batch, classes.argmax(1).tolist(), rest.argmax(1).tolist()):
                out.write(json.dumps({**row, "predicted_class": c, "best_text": texts["texts"][t]}) + "\n")
    print(f"{len(rows)} images in {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
