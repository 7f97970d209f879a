"""``adaptkit`` command line: train, eval, cache, check-quant, assets.

adaptkit train RECIPE.yaml [key=value ...]
adaptkit eval RUN_DIR --data SPEC [--limit N] [--batch-size B] [--json]
adaptkit cache RECIPE.yaml [key=value ...]   fill the frozen-feature disk cache ahead of training
adaptkit check-quant RECIPE.yaml [--levels 8bit,4bit] [--samples N] [--json]
adaptkit export RUN_DIR --out DIR [--dtype ...] [--format FORMAT]   merge LoRA, a verified folder
adaptkit predict DIR --image X --question "..." [--json]   the task's output (VQA: the answer)
adaptkit demo DIR [--host 127.0.0.1] [--port 7860]        the Gradio demo
adaptkit assets [gemma3-270m]  verify the embedded assets and convert SmolLM2 (and Gemma) once
adaptkit recipe show RECIPE [key=value ...]   the resolved recipe, every key with its documentation
adaptkit recipe diff A [B] [--set key=value]  what differs between two recipes (B: the schema's defaults)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from adaptkit.artifacts import ArtifactError
from adaptkit.assets import AssetError
from adaptkit.checkpoint import CheckpointError
from adaptkit.config import RecipeError
from adaptkit.data.formats import DataError

USER_ERRORS = (
    RecipeError,
    DataError,
    AssetError,
    ArtifactError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)


def _device(args: argparse.Namespace):
    """``--device``, or CUDA when present, else CPU."""
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _cmd_train(args: argparse.Namespace) -> int:
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train

    overrides = list(args.overrides)
    if args.resume:
        overrides += [f"resume={args.resume}", f"output_dir={args.resume}"]
    recipe = load_recipe(args.recipe, overrides)
    summary = train(recipe)
    if args.json:
        print(json.dumps(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from adaptkit.artifacts import write_json
    from adaptkit.data.splits import feature_cache_root, prepare_split
    from adaptkit.runs import load_run
    from adaptkit.tasks import get_task

    device = _device(args)
    recipe, model = load_run(args.run_dir, device, lm_quant=args.lm_quant, verify=not args.no_verify)
    task = get_task(recipe)
    dataset, features, skipped = prepare_split(
        task,
        model,
        args.data,
        device,
        limit=args.limit,
        cache=recipe.cache_features,
        on_bad_sample=recipe.data.on_bad_sample,
        cache_root=feature_cache_root(recipe.feature_cache_dir),
    )
    metrics, records = task.evaluate(model, dataset, features, args.batch_size)
    result = {"data": args.data, "limit": args.limit, "skipped": len(skipped), **metrics}
    run = Path(args.run_dir)
    write_json(run / "eval.json", result)
    with (run / "eval_predictions.jsonl").open("w") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    print(json.dumps(result) if args.json else task.format_metrics(metrics))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from adaptkit.data.splits import fill_cache
    from adaptkit.recipes import load_recipe
    from adaptkit.tasks import get_task

    recipe = load_recipe(args.recipe, args.overrides)
    logging.getLogger("adaptkit").setLevel(logging.INFO)
    for line in fill_cache(recipe, args.recipe, get_task(recipe), _device(args)):
        print(line)
    return 0


def _cmd_check_quant(args: argparse.Namespace) -> int:
    from adaptkit.quant_check import check_quant, format_rows
    from adaptkit.recipes import load_recipe

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


def _cmd_export(args: argparse.Namespace) -> int:
    from adaptkit.export import export_run

    logging.getLogger("adaptkit").setLevel(logging.INFO)
    if args.format in ("hf-llava", "hf-remote-code"):
        from adaptkit import export_llava, export_remote

        module = export_llava if args.format == "hf-llava" else export_remote
        write = export_llava.export_llava if args.format == "hf-llava" else export_remote.export_remote
        report = write(args.run_dir, args.out, args.dtype, args.verify_samples, args.merge_base)
        summary = module.summary
        print(summary(args.run_dir, args.out, report) + (f"\n{json.dumps(report)}" if args.json else ""))
        return 0
    manifest = export_run(
        args.run_dir,
        args.out,
        dtype=args.dtype,
        verify_samples=args.verify_samples,
        merge_base=args.merge_base,
        verify=not args.no_verify,
    )
    ver = manifest["verification"]
    merged_in = manifest["language"]
    if merged_in["trained_quant"] != "none":
        print(
            f"the run trained on a {merged_in['trained_quant']} LM: LoRA was merged in float32 into "
            f"{merged_in['merged_into']} (never into quantized weights)"
        )
    print(
        f"exported {args.run_dir} -> {args.out} ({manifest['dtype']}, {manifest['seconds']} s); verified on "
        f"{ver['samples']} held samples: answers identical {ver['answers_identical']:.1%}, "
        f"max |logit diff| {ver['max_abs_logit_diff']:.2e} (tolerance {ver['tolerance']})"
    )
    for key, value in ver.items():
        if key.startswith("answers_identical_to_trained_"):
            print(f"answers identical to the run as trained ({key.rsplit('_', 1)[1]} LM): {value:.1%}")
    if args.json:
        print(json.dumps({k: manifest[k] for k in ("dtype", "verification", "seconds")}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from adaptkit.inference import load_for_inference

    predictor = load_for_inference(args.dir, device=_device(args), verify=not args.no_verify)
    result = predictor.predict(args.image, args.text, top_k=args.top)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{result.text}  (p={result.score:.4f})")
    for answer, prob in result.top:
        print(f"  {prob:7.2%}  {answer}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    from adaptkit.inference import load_for_inference

    script = Path(__file__).resolve().parent.parent / "app" / "demo.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: the demo runs from a checkout of the adaptkit repo")
    spec = importlib.util.spec_from_file_location("adaptkit_demo_app", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    logging.getLogger("adaptkit").setLevel(logging.INFO)
    predictor = load_for_inference(args.dir, device=_device(args), verify=not args.no_verify)
    demo.launch(predictor, host=args.host, port=args.port, share=args.share)
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from adaptkit import gguf
    from adaptkit.assets import prepare_all

    unknown = [name for name in args.on_request if name not in gguf.EMBEDDED_LMS]
    if unknown:
        known = ", ".join(gguf.EMBEDDED_LMS)
        raise AssetError(f"no embedded LM {', '.join(unknown)} (known: {known})")
    for name, path in prepare_all().items():
        print(f"{name}: {path}")
    print(f"smollm2_hf: {gguf.smollm2_dir()}")
    for name in args.on_request:
        print(f"{name}_hf: {gguf.EMBEDDED_LMS[name]()}")
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    from adaptkit.config import Recipe
    from adaptkit.config.docs import diff, format_diff, show
    from adaptkit.recipes import load_recipe

    if args.action == "show":
        recipe = load_recipe(args.recipe, args.rest)
        title = " ".join([args.recipe, *args.rest]) + ", resolved"
        print(show(recipe, title), end="")
        return 0
    if args.rest:  # A against B
        left, right = load_recipe(args.recipe, args.set), load_recipe(args.rest[0], args.set)
        print(format_diff(diff(left, right), args.recipe, args.rest[0]), end="")
    else:  # what A changes from the schema's defaults
        recipe = load_recipe(args.recipe, args.set)
        print(format_diff(diff(Recipe(), recipe), "schema defaults", args.recipe), end="")
    return 0


NO_VERIFY = (
    "load a folder whose files cannot be checked against its manifest (a run of an earlier adaptkit); links "
    "out of the folder and pickle-format files are refused all the same"
)


def _add_training_commands(sub) -> None:
    """train, eval, cache, check-quant."""
    p = sub.add_parser("train", help="fine-tune a recipe and write a run directory")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/easyvqa_qformer_lora.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=200 language.quant=4bit")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    p.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="greedy-decode answers and score exact-match accuracy")
    p.add_argument("run_dir", help="a run directory written by `adaptkit train`, or an export folder")
    p.add_argument(
        "--data",
        required=True,
        help="a data spec of the run's task: easyvqa:test, easyvqa-captions:test, a .jsonl / COCO or "
        "LLaVA .json file, hf:PATH[:SPLIT]",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N samples")
    p.add_argument(
        "--batch-size", type=int, default=None, help="generation batch size (default: the recipe's)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON object on the last line"
    )
    p.add_argument(
        "--lm-quant",
        choices=["none", "8bit", "4bit", "dequantized"],
        default=None,
        help="load the LM at this quantization instead of the run's (dequantized: the run's 4/8-bit weights "
        "in float32, what its export computes with; none: the original checkpoint)",
    )
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY)
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


def _add_model_commands(sub) -> None:
    """export, predict, demo, assets."""
    p = sub.add_parser("export", help="merge LoRA and write a self-contained, self-verified model folder")
    p.add_argument("run_dir", help="a run directory written by `adaptkit train`")
    p.add_argument("--out", required=True, help="the export folder to create (must not exist)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="merged LM weights"
    )
    p.add_argument(
        "--format",
        choices=["adaptkit", "hf-llava", "hf-remote-code"],
        default="adaptkit",
        help="adaptkit: any run, loaded by adaptkit; hf-llava: projector runs on an hf tower at LM layer 0, "
        "loaded by stock transformers (LlavaForConditionalGeneration + AutoProcessor); hf-remote-code: VQA, "
        "caption and retrieval runs of any adapter on torchvision / timm / hf / open_clip towers, loaded by "
        "AutoModelForImageTextToText + AutoProcessor with trust_remote_code=True",
    )
    p.add_argument("--verify-samples", type=int, default=32, help="held samples the export is verified on")
    p.add_argument(
        "--merge-base",
        choices=["dequantized", "original"],
        default="dequantized",
        help="for a run trained on a 4/8-bit LM: merge into its quantized weights dequantized to float32 "
        "(the base LoRA learned against; default) or into the original float32 checkpoint",
    )
    p.add_argument("--json", action="store_true", help="print the verification as JSON on the last line")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "predict", help="the task's output for one image (VQA: an answer) from a run or an export"
    )
    p.add_argument("dir", help="a run directory or an export folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument(
        "--question",
        "--text",
        dest="text",
        default=None,
        help="the text the task reads (VQA: the question; retrieval: candidate texts separated by '|'; "
        "caption: none)",
    )
    p.add_argument("--top", type=int, default=3, help="top answers of the answer set to show (0: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="serve the Gradio demo for a run or an export")
    p.add_argument("dir", help="a run directory or an export folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (default off)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("assets", help="verify the embedded assets and convert SmolLM2 to safetensors once")
    p.add_argument(
        "on_request",
        nargs="*",
        metavar="gemma3-270m",
        help="also prepare these LMs, installed on request only (README, 'Bring your own models')",
    )
    p.set_defaults(func=_cmd_assets)

    p = sub.add_parser("recipe", help="show a resolved recipe with every key's documentation, or diff two")
    p.add_argument("action", choices=["show", "diff"], help="show RECIPE [key=value ...] | diff A [B]")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument(
        "rest", nargs="*", help="show: key=value overrides; diff: the other recipe (default: schema)"
    )
    p.add_argument("--set", action="append", default=[], help="diff: an override applied to both sides")
    p.set_defaults(func=_cmd_recipe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_model_commands(sub)
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
