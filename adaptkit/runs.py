"""Run directories and evaluation data: what `adaptkit train` writes and `adaptkit eval` reads.

A run directory holds::

    recipe.yaml            the resolved recipe (every knob, after overrides)
    adapter.safetensors    the fusion adapter's weights
    lora/                  the LoRA adapter in peft's format (adapter_config.json + safetensors)
    train.log              the training log
    metrics.jsonl          one JSON object per logged step (step, loss, lr, samples_per_s, ...)
    eval.json              the latest evaluation
    summary.json           parameter counts, timings, final metrics
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import torch

from adaptkit.assets import cache_dir
from adaptkit.config import load_recipe
from adaptkit.data.collate import VQADataset
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.features import FeatureBank, OnTheFlyFeatures
from adaptkit.data.formats import DataError, VQASample, load_vqa
from adaptkit.export import EXPORT_FILE, resolve_export_recipe
from adaptkit.model import ADAPTER_FILE, LORA_DIR, build_model

RECIPE_FILE = "recipe.yaml"
log = logging.getLogger("adaptkit")


def subset(samples: list[VQASample], limit: int | None, seed: int = 0) -> list[VQASample]:
    """A fixed random subset of ``limit`` samples in their original order (all when limit is falsy)."""
    if not limit or limit >= len(samples):
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def feature_cache_root(setting: str) -> Path | None:
    """The disk cache folder a recipe's ``feature_cache_dir`` names (None: keep features in memory only)."""
    if setting in ("", "none", "off"):
        return None
    if setting == "auto":
        return cache_dir() / "features"
    return Path(setting).expanduser()


def build_features(
    vision,
    samples: list[VQASample],
    device,
    cache: bool,
    skip_bad: bool,
    desc: str,
    progress: bool = True,
    cache_root: Path | FeatureCache | None = None,
):
    """Feature source for the images of ``samples``: encoded once (cache) or at every lookup.

    With ``cache_root`` (a cache folder, or a :class:`FeatureCache` already keyed for ``vision``, which
    saves hashing the backbone again), features persist on disk, keyed by backbone and image content.
    """
    paths = [s.image for s in samples]
    origins: dict[str, str] = {}
    for s in samples:
        origins.setdefault(s.image, s.origin)
    if not cache:
        return OnTheFlyFeatures(vision, paths, device, origins, skip_bad)
    disk = cache_root
    if cache_root is not None and not isinstance(cache_root, FeatureCache):
        disk = FeatureCache.for_backbone(cache_root, vision, device)
    return FeatureBank.compute(
        vision,
        paths,
        origins,
        device,
        skip_bad=skip_bad,
        desc=desc,
        disable_progress=not progress,
        cache=disk,
    )


def prepare_split(
    model,
    spec: str,
    template: str,
    device,
    limit: int | None = None,
    cache: bool = True,
    on_bad_sample: str = "error",
    progress: bool = True,
    desc: str = "encoding images",
    cache_root: Path | FeatureCache | None = None,
    max_skip_ratio: float = 1.0,
):
    """Load a data spec, encode its images and tokenize it.

    Bad samples (malformed lines, unusable images) raise with ``on_bad_sample="error"``; with ``skip``
    they are dropped and listed, and the call fails (naming them) when more than ``max_skip_ratio`` of
    the samples are bad.

    Returns:
        ``(dataset, features, skipped)`` where ``skipped`` lists ``origin: reason`` of dropped samples.
    """
    data = load_vqa(spec, on_bad_sample)
    samples = subset(data.samples, limit)
    features = build_features(
        model.vision, samples, device, cache, on_bad_sample == "skip", desc, progress, cache_root
    )
    skipped = list(data.skipped) + [features.bad[s.image] for s in samples if s.image in features.bad]
    total = len(samples) + len(data.skipped)
    if skipped and len(skipped) > max_skip_ratio * total:
        shown = "\n  ".join(skipped[:20]) + (
            f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        )
        raise DataError(
            f"{spec}: {len(skipped)} of {total} samples ({len(skipped) / total:.1%}) are unusable, more than "
            f"data.max_skip_ratio={max_skip_ratio}:\n  {shown}\n"
            "Fix or remove them, or raise data.max_skip_ratio"
        )
    if features.bad:
        log.warning(
            "%s: skipped %d samples whose image is unusable (%d images), first: %s",
            spec,
            len(skipped) - len(data.skipped),
            len(features.bad),
            next(iter(features.bad.values())),
        )
    dataset = VQADataset(samples, features.rows, model.tokenizer, template)
    return dataset, features, skipped


def check_run(run: Path):
    """The recipe of a complete run directory or export folder (paths resolved); raises on a missing file."""
    recipe_path = run / RECIPE_FILE
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path} is missing: {run} is not a run directory of `adaptkit train`")
    recipe = load_recipe(recipe_path)
    if (run / EXPORT_FILE).is_file():  # an `adaptkit export` folder: paths are relative to it
        recipe = resolve_export_recipe(recipe, run)
    lora_dir = run / LORA_DIR
    if recipe.lora.enabled and not (lora_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{lora_dir} is missing or incomplete; the recipe has lora.enabled=true")
    if not (run / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{run / ADAPTER_FILE} is missing; the run did not finish saving")
    return recipe


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", lm_quant: str | None = None):
    """Rebuild a trained model from a run directory or an export folder; returns ``(recipe, model)``.

    Args:
        lm_quant: load the LM at this quantization instead of the run's: ``none`` (its original
            full-precision checkpoint) or ``dequantized`` (the run's 4/8-bit weights dequantized to float32,
            the base `adaptkit export` merges a quantized run's LoRA into by default).
    """
    run = Path(run_dir)
    recipe = check_run(run)
    if lm_quant not in (None, "dequantized"):
        recipe = dataclasses.replace(recipe, language=dataclasses.replace(recipe.language, quant=lm_quant))
    model = build_model(
        recipe,
        device,
        lora_dir=run / LORA_DIR if recipe.lora.enabled else None,
        dequantize_lm=lm_quant == "dequantized",
    )
    model.load_adapter(run)
    model.eval()
    return recipe, model


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when the file is missing or unreadable (optional run files)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
