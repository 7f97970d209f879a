"""``adaptkit export``: a trained run → one self-contained folder with LoRA merged into the LM.

The export folder::

    lm/                     the merged causal LM + tokenizer, standard Hugging Face format (safetensors):
                            loads with stock ``AutoModelForCausalLM.from_pretrained``, no peft needed
    vision/                 the vision backbone's weights (absent for the embedded MobileNetV2, which the
                            manifest names by package, file and sha256)
    adapter.safetensors     the fusion adapter
    recipe.yaml             the composition as a recipe (paths relative to the folder)
    verification.json       merged vs unmerged model on held samples (answers, logit differences)
    README.md               a model card with the run's metrics
    adaptkit_export.json    the manifest: backbones, adapter, prompt template, preprocessing, answer set,
                            metrics, verification, and the sha256 of every file above

LoRA is never merged into quantized weights: a run trained on a 4-bit or 8-bit LM has its base reloaded
in full precision (float32) and LoRA merged there. The export verifies itself before it reports success:
on held samples the merged model must give the same greedy answers as the unmerged adapter model on the
same full-precision base, and logits within ``TOLERANCE[dtype]``; otherwise it fails and leaves the
partial folder for inspection.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from adaptkit.artifacts import (
    ADAPTER_FILE,
    EXPORT_FILE,
    HEADS_FILE,
    LORA_DIR,
    RECIPE_FILE,
    ExportError,
    read_json,
)
from adaptkit.assets import hash_files
from adaptkit.config import recipe_to_yaml
from adaptkit.data.splits import subset
from adaptkit.export_files import copy_text_encoder, copy_vision
from adaptkit.runs import check_run, load_run
from adaptkit.tasks import get_task

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Largest |logit difference| (merged vs unmerged, both computed in float64, over every vocabulary entry at
# every position of the held samples) accepted per export dtype. float32: the merged weights W + s*BA are
# rounded once to float32. 16-bit: they are rounded to 8 (bf16) or 11 (fp16) significant bits, so logits
# move by up to about a unit; greedy answers must still agree on MIN_AGREEMENT_16BIT of the samples.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2.0, "float16": 1.0}
MIN_AGREEMENT_16BIT = 0.95
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- writing one ----------------------------------------------------------------------------------


MERGE_BASES = ("dequantized", "original")


def full_precision_base(recipe, merge_base: str = "dequantized"):
    """The float32 LM that LoRA is merged into: for a run trained on a 4/8-bit LM, either the quantized
    weights dequantized to float32 (``dequantized``: the base LoRA was trained against) or the original
    checkpoint (``original``); for a full-precision run, its base in float32. Returns ``(lm, tokenizer)``."""
    from adaptkit.backbones.language import load_language_model

    if recipe.language.quant != "none" and merge_base == "dequantized":
        lm, tokenizer = load_language_model(recipe.language, "cpu")
        lm = lm.dequantize().float()  # transformers drops bitsandbytes layers and quantization_config
        return lm.eval(), tokenizer
    if merge_base not in MERGE_BASES:
        raise ValueError(f"--merge-base {merge_base}: choose one of {', '.join(MERGE_BASES)}")
    return load_language_model(dataclasses.replace(recipe.language, quant="none", dtype="float32"), "cpu")


def _merged_lm(recipe, run: Path, dtype: str, merge_base: str):
    """The run's LM with LoRA merged into its float32 base (see :func:`full_precision_base`), then cast."""
    lm, tokenizer = full_precision_base(recipe, merge_base)
    if recipe.lora.enabled:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run / LORA_DIR), is_trainable=False).merge_and_unload()
    lm = lm.to(DTYPES[dtype])
    if getattr(lm.config, "quantization_config", None) is not None:
        del lm.config.quantization_config
    return lm, tokenizer


def _held_samples(task, recipe, n: int):
    """``n`` samples of the recipe's eval data (its training data when the eval data is gone)."""
    from adaptkit.data.formats import DataError

    for spec in (recipe.data.eval, recipe.data.train):
        try:
            data = task.load(spec, "skip")
        except (DataError, FileNotFoundError, OSError):
            continue
        if data.samples:
            return spec, subset(data.samples, n, seed=1)
    raise ExportError(
        f"no held samples to verify the export: neither data.eval={recipe.data.eval} nor "
        f"data.train={recipe.data.train} is readable"
    )


@torch.no_grad()
def _outputs(
    model, task, samples, max_new_tokens: int, answers: bool = True
) -> tuple[list[str], torch.Tensor]:
    """Greedy answers and full-vocabulary logits at every position (soft tokens, prompt, gold answer)."""
    from adaptkit.data.collate import collate_prompts, collate_train
    from adaptkit.data.images import open_image

    paths = list(dict.fromkeys(s.image for s in samples))
    rows = {p: i for i, p in enumerate(paths)}
    feats = model.encode_images([open_image(p) for p in paths])
    feats = feats.to(next(model.adapter.parameters()).dtype)
    data = task.dataset(samples, rows, model.tokenizer)
    items = [data[i] for i in range(len(data))]
    pad = model.tokenizer.pad_token_id
    greedy: list[str] = []
    if answers:
        prompts = collate_prompts(items, pad)
        greedy, _ = model.generate(
            feats[prompts["image"]], prompts["input_ids"], prompts["attention_mask"], max_new_tokens
        )
    full = collate_train(items, pad)
    prompt_mask = full["attention_mask"] * (full["labels"] == -100)
    logits, mask = model.logits(feats[full["image"]], full["input_ids"], full["attention_mask"], prompt_mask)
    return greedy, logits[mask.bool()].double()


def _verify(
    recipe, run: Path, out: Path, dtype: str, samples: int, merge_base: str, verify: bool = True
) -> tuple[dict, str]:
    """Compare the export (loaded back from disk) with the unmerged adapter model on held samples; returns
    the report and the adapter's description.

    Answers: the export in its own dtype against the unmerged float32 model, as users run them.
    Logits: both models upcast to float64, so the difference measures the merged weights alone: float32
    arithmetic by itself moves a 30-layer LM's logits by about 1e-3 (SmolLM2: float32 vs float64 compute
    of the same unmerged model), more than a correct merge does.
    """
    from adaptkit.model.multimodal import MultimodalModel

    task = get_task(recipe)
    spec, held = _held_samples(task, recipe, samples)
    log.info("verifying the export on %d held samples of %s", len(held), spec)
    started = time.perf_counter()
    _, merged = load_run(out, "cpu")
    if task.compares_exports:  # the task's own outputs (e.g. retrieval's similarities), not generation
        report = {
            "data": spec,
            "dtype": dtype,
            **task.compare_export(load_run(run, "cpu", verify=verify)[1], merged, held),
        }
        report["seconds"] = round(time.perf_counter() - started, 2)
        return report, merged.adapter.describe()
    base, tokenizer = full_precision_base(recipe, merge_base)
    if recipe.lora.enabled:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(run / LORA_DIR), is_trainable=False)
    reference = MultimodalModel(
        merged.vision, merged.adapter, base, tokenizer, entry_layer=merged.entry_layer
    ).eval()
    reference.feature_dtype = merged.feature_dtype
    new = recipe.max_new_tokens
    ref_answers, ref_native = _outputs(reference, task, held, new)
    got_answers, got_native = _outputs(merged, task, held, new)
    agree = sum(a == b for a, b in zip(ref_answers, got_answers)) / max(1, len(ref_answers))
    report = {
        "data": spec,
        "samples": len(held),
        "dtype": dtype,
        "reference": f"unmerged LoRA (peft) on the same float32 base LM ({_base_words(recipe, merge_base)}), "
        "same vision backbone and adapter",
        "answers_identical": agree,
        f"max_abs_logit_diff_{dtype}_compute": float((ref_native - got_native).abs().max()),
    }
    if recipe.language.quant != "none":
        _, trained = load_run(run, "cpu", verify=verify)
        trained_answers, _ = _outputs(trained, task, held, new)
        report["answers_identical_to_trained_" + recipe.language.quant] = sum(
            a == b for a, b in zip(trained_answers, got_answers)
        ) / max(1, len(got_answers))
        del trained
    reference.double()
    merged.double()  # the vision backbone and adapter are shared; both models now compute in float64
    _, ref64 = _outputs(reference, task, held, new, answers=False)
    _, got64 = _outputs(merged, task, held, new, answers=False)
    diff = (ref64 - got64).abs()
    report["max_abs_logit_diff"] = float(diff.max())
    report["mean_abs_logit_diff"] = float(diff.mean())
    report["logits_compared_in"] = "float64"
    report["tolerance"] = TOLERANCE[dtype]
    need = 1.0 if dtype == "float32" else MIN_AGREEMENT_16BIT
    report["passed"] = bool(agree >= need and report["max_abs_logit_diff"] <= TOLERANCE[dtype])
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report, merged.adapter.describe()


def _model_card(manifest: dict, task) -> str:
    ver = manifest["verification"]
    metrics = manifest.get("metrics", {})
    evaluation = metrics.get("eval") or {}
    params = manifest["parameters"]
    lines = [
        f"# adaptkit export of `{manifest['source_run']}`",
        "",
        "A vision-language model trained with adaptkit: a frozen vision backbone, a trained fusion adapter "
        "and a causal LM with its LoRA merged in.",
        "",
        f"- vision: {manifest['vision']['family']}:{manifest['vision']['name']} "
        f"(weights: {manifest['vision']['weights']}), frozen",
        f"- adapter: {manifest['adapter']['kind']} ({manifest['adapter']['summary']}), `{ADAPTER_FILE}`",
        f"- language model: `lm/` = {manifest['language']['base']} + LoRA merged in float32 into "
        f"{manifest['language']['merged_into']}, saved as {manifest['dtype']} (trained with the LM at "
        f"quant={manifest['language']['trained_quant']})",
        f"- prompt template: `{manifest['prompt_template']}`",
        f"- parameters: {params.get('trainable')} trained of {params.get('total')}",
    ]
    if evaluation:
        lines.append(
            f"- {task.headline_metric} of the run: {evaluation.get(task.headline_metric)} on "
            f"{evaluation.get('n')} samples of {evaluation.get('data', 'its eval data')}"
        )
    lines += [
        "",
        "## Verification",
        "",
        f"On {ver['samples']} held samples of {ver['data']}: greedy answers identical to the unmerged "
        f"model on {ver['answers_identical']:.1%}; largest |logit difference| "
        f"{ver['max_abs_logit_diff']:.2e} (tolerance {ver['tolerance']}).",
        "",
        "## Use",
        "",
        "```python",
        "from adaptkit import load_for_inference",
        "predictor = load_for_inference('THIS_FOLDER')",
        f"print(predictor.predict('image.png', {task.demo.text_placeholder!r}))",
        "```",
        "",
        f'or `adaptkit predict THIS_FOLDER --image image.png --text "{task.demo.text_placeholder}"`,',
        "`adaptkit demo THIS_FOLDER`.",
        "The LM alone: `transformers.AutoModelForCausalLM.from_pretrained('THIS_FOLDER/lm')`.",
        "",
    ]
    return "\n".join(lines)


def _base_words(recipe, merge_base: str) -> str:
    if recipe.language.quant == "none":
        return "the run's base"
    if merge_base == "dequantized":
        return f"the {recipe.language.quant} weights LoRA was trained against, dequantized"
    return f"the original checkpoint, not the {recipe.language.quant} weights LoRA was trained against"


def _manifest(recipe, run: Path, dtype: str, merge_base: str, vision_cfg, vision_info: dict) -> dict:
    """The export manifest before its file hashes and verification are added."""
    summary = read_json(run / "summary.json") or {}
    run_eval = read_json(run / "eval.json") or {}
    return {
        "format": "adaptkit-export",
        "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run.resolve()),
        "dtype": dtype,
        "language": {
            "path": "lm",
            "base": recipe.language.name,
            "trained_quant": recipe.language.quant,
            "merged_in": "float32",
            "merged_into": _base_words(recipe, merge_base),
            "lora": dataclasses.asdict(recipe.lora) if recipe.lora.enabled else None,
        },
        "vision": {**vision_info, **dataclasses.asdict(vision_cfg)},
        "adapter": {
            "file": ADAPTER_FILE,
            "kind": recipe.adapter.kind,
            "config": dataclasses.asdict(recipe.adapter),
        },
        "prompt_template": recipe.data.prompt_template,
        "max_new_tokens": recipe.max_new_tokens,
        "task": recipe.task,
        **get_task(recipe).export_info(run),
        "parameters": summary.get("parameters", {}),
        "metrics": {"eval": run_eval, "steps": summary.get("steps")},
    }


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    verify_samples: int = 32,
    merge_base: str = "dequantized",
    verify: bool = True,
) -> dict:
    """Export a run directory into ``out_dir`` (which must not exist); returns the manifest.

    Raises:
        FileExistsError: ``out_dir`` exists (an export is never overwritten).
        ExportError: the merged model failed its verification (the partial folder is kept).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    run, out = Path(run_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; exports are never overwritten, choose another --out")
    recipe = check_run(run, verify)  # fails early, naming the file, on an incomplete or damaged run
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    started = time.perf_counter()

    if merge_base not in MERGE_BASES:
        raise ValueError(f"--merge-base {merge_base}: choose one of {', '.join(MERGE_BASES)}")
    if recipe.language.quant != "none":
        log.info(
            "the run trained on a %s LM: merging LoRA into a float32 base (%s), never into quantized weights",
            recipe.language.quant,
            _base_words(recipe, merge_base),
        )
    lm, tokenizer = _merged_lm(recipe, run, dtype, merge_base)
    lm.save_pretrained(partial / "lm", safe_serialization=True)
    tokenizer.save_pretrained(partial / "lm")
    del lm
    vision_cfg, vision_info = copy_vision(recipe, partial)
    text_cfg, text_info = copy_text_encoder(recipe, partial, run)
    shutil.copy2(run / ADAPTER_FILE, partial / ADAPTER_FILE)
    if (run / HEADS_FILE).is_file():
        shutil.copy2(run / HEADS_FILE, partial / HEADS_FILE)
    lang_cfg = dataclasses.replace(recipe.language, name="lm", quant="none", dtype=dtype)
    lora_cfg = dataclasses.replace(recipe.lora, enabled=False)
    exported = dataclasses.replace(
        recipe, language=lang_cfg, vision=vision_cfg, lora=lora_cfg, text_encoder=text_cfg, init_from=""
    )
    (partial / RECIPE_FILE).write_text(recipe_to_yaml(exported))

    manifest = _manifest(recipe, run, dtype, merge_base, vision_cfg, vision_info)
    if text_info:
        manifest["text_encoder"] = text_info
    # Hash before verifying: the verification loads the folder the way users will.
    manifest["files"] = hash_files(partial, skip=EXPORT_FILE)
    (partial / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    report, manifest["adapter"]["summary"] = _verify(
        recipe, run, partial, dtype, verify_samples, merge_base, verify
    )
    manifest["verification"] = report
    (partial / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    (partial / "README.md").write_text(_model_card(manifest, get_task(recipe)))
    manifest["files"] = hash_files(partial, skip=EXPORT_FILE)
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    (partial / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if not report["passed"]:
        raise ExportError(
            f"the merged model does not match the adapter model on {report['samples']} held samples "
            f"(answers identical {report['answers_identical']:.1%}, max |logit diff| "
            f"{report['max_abs_logit_diff']:.3g} > tolerance {report['tolerance']}); the partial export is "
            f"kept in {partial} with verification.json"
        )
    os.replace(partial, out)
    return manifest
