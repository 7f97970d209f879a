"""Training steps with the LM's last layer at answer positions only, against the stock last layer.

    python benchmarks/last_layer.py --adapter projector --pairs 12

The recipe is set up as ``adaptkit train`` sets it up (``adaptkit.train.setup``: model, feature cache,
packed and length-grouped batches, compiled layers, lower-layer state cache) in a temporary run
directory, LoRA on. Then real training steps (``train_step``: forward, backward, clipping, AdamW) run on
consecutive batches with ``DecoderRun.answer_only_last_layer`` (``model.fusion.run``) on and off in
ABBA order (which cancels a linear drift of the machine's speed), after warm-up steps of both. Prints the
median step time of each and their ratio; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from adaptkit.recipes import load_recipe
from adaptkit.train.loop import train_step
from adaptkit.train.setup import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. adapter.inject_layer=16")
    parser.add_argument("--adapter", default="projector", help="qformer | projector | resampler | xattn")
    parser.add_argument("--pairs", type=int, default=12, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting first")
    args = parser.parse_args()
    recipe_path = f"recipes/easyvqa_{args.adapter}_lora.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"output_dir={Path(tmp) / 'run'}", "lora.start_step=0", "eval_every=0"]
        recipe = load_recipe(recipe_path, [*args.overrides, *extra])
        run = setup(recipe)
        batches = iter(run.loader)
        times: dict[bool, list[float]] = {True: [], False: []}
        order = [True, False] * args.warmup + [True, False, False, True] * ((args.pairs + 1) // 2)
        for n, answer_only in enumerate(order):
            run.model.fusion.run.answer_only_last_layer = answer_only
            batch = next(batches)
            start = time.perf_counter()
            train_step(run, batch)
            run.step += 1
            if n >= 2 * args.warmup:
                times[answer_only].append(time.perf_counter() - start)
    fast, stock = statistics.median(times[True]), statistics.median(times[False])
    result = {
        "recipe": recipe_path,
        "overrides": args.overrides,
        "steps_per_setting": len(times[True]),
        "answer_only_median_step_s": round(fast, 3),
        "stock_median_step_s": round(stock, 3),
        "speedup": round(stock / fast, 3),
    }
    print(f"answer-only last layer {fast:.3f} s/step, stock {stock:.3f} s/step: {stock / fast:.3f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
