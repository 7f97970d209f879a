"""``adaptkit`` command line: train, eval, cache, check-quant, assets.

adaptkit train RECIPE.yaml [key=value ...]
adaptkit eval RUN_DIR --data SPEC [--limit N] [--batch-size B] [--json]
adaptkit cache RECIPE.yaml [key=value ...]   fill the frozen-feature disk cache ahead of training
adaptkit check-quant RECIPE.yaml [--levels 8bit,4bit] [--samples N] [--json]
adaptkit assets            verify the embedded assets and convert SmolLM2 once
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from adaptkit.assets import AssetError
from adaptkit.config import RecipeError
from adaptkit.data.formats import DataError

USER_ERRORS = (RecipeError, DataError, AssetError, FileNotFoundError, FileExistsError, ValueError)


def _device(args: argparse.Namespace):
    """``--device``, or CUDA when present, else CPU."""
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _cmd_train(args: argparse.Namespace) -> int:
    from adaptkit.config import load_recipe
    from adaptkit.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe)
    if args.json:
        print(json.dumps(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:

    from adaptkit.evaluation import evaluate_vqa
    from adaptkit.runs import feature_cache_root, load_run, prepare_split, write_json

    device = _device(args)
    recipe, model = load_run(args.run_dir, device)
    dataset, features, skipped = prepare_split(
        model,
        args.data,
        recipe.data.prompt_template,
        device,
        limit=args.limit,
        cache=recipe.cache_features,
        on_bad_sample=recipe.data.on_bad_sample,
        cache_root=feature_cache_root(recipe.feature_cache_dir),
    )
    metrics, records = evaluate_vqa(
        model, dataset, features, args.batch_size or recipe.eval_batch_size, recipe.max_new_tokens
    )
    result = {"data": args.data, "limit": args.limit, "skipped": len(skipped), **metrics}
    run = Path(args.run_dir)
    write_json(run / "eval.json", result)
    with (run / "eval_predictions.jsonl").open("w") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} samples "
            f"(yes/no {metrics['accuracy_yes_no']}, other {metrics['accuracy_other']}) "
            f"in {metrics['seconds']} s"
        )
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:

    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.config import load_recipe
    from adaptkit.data.formats import load_vqa
    from adaptkit.runs import build_features, feature_cache_root

    recipe = load_recipe(args.recipe, args.overrides)
    root = feature_cache_root(recipe.feature_cache_dir)
    if root is None or not recipe.cache_features:
        raise ValueError(
            f"{args.recipe}: the recipe keeps no disk cache (cache_features={recipe.cache_features}, "
            f"feature_cache_dir={recipe.feature_cache_dir!r}); set cache_features=true feature_cache_dir=auto"
        )
    logging.getLogger("adaptkit").setLevel(logging.INFO)
    device = _device(args)
    vision = build_vision_backbone(recipe.vision, device)
    specs = list(dict.fromkeys([recipe.data.train, recipe.data.eval]))
    for spec in specs:
        data = load_vqa(spec, recipe.data.on_bad_sample)
        bank = build_features(
            vision,
            data.samples,
            device,
            cache=True,
            skip_bad=recipe.data.on_bad_sample == "skip",
            desc=f"caching {spec}",
            cache_root=root,
        )
        shape = tuple(bank.features.shape[1:])
        print(f"{spec}: {len(bank.rows)} images cached, features {shape}, {len(bank.bad)} undecodable")
    return 0


def _cmd_check_quant(args: argparse.Namespace) -> int:

    from adaptkit.config import load_recipe
    from adaptkit.quant_check import check_quant, format_rows

    recipe = load_recipe(args.recipe, args.overrides)
    levels = [x.strip() for x in args.levels.split(",")] if args.levels else None
    for level in levels or []:
        if level not in ("8bit", "4bit"):
            raise ValueError(f"--levels: '{level}' is not 8bit or 4bit")
    device = _device(args)
    rows = check_quant(recipe, samples=args.samples, levels=levels, device=device)
    print(format_rows(rows))
    if args.json:
        print(json.dumps(rows))
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from adaptkit.assets import prepare_all

    for name, path in prepare_all().items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a recipe and write a run directory")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/easyvqa_qformer_lora.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=200 language.quant=4bit")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="greedy-decode answers and score exact-match accuracy")
    p.add_argument("run_dir", help="a run directory written by `adaptkit train`")
    p.add_argument("--data", required=True, help="easyvqa:test, easyvqa:train or a VQA .jsonl file")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N samples")
    p.add_argument(
        "--batch-size", type=int, default=None, help="generation batch size (default: the recipe's)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON object on the last line"
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("cache", help="encode a recipe's train and eval images into the feature cache")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser(
        "check-quant", help="compare 8-bit / 4-bit backbones with full precision on the recipe's data"
    )
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.add_argument("--samples", type=int, default=64, help="questions (and their images) to compare on")
    p.add_argument(
        "--levels", default=None, help="8bit,4bit (default: the recipe's quant, or both when it has none)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON list on the last line")
    p.set_defaults(func=_cmd_check_quant)

    p = sub.add_parser("assets", help="verify the embedded assets and convert SmolLM2 to safetensors once")
    p.set_defaults(func=_cmd_assets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"adaptkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
