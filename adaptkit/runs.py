"""Rebuild a trained model from a run directory (``adaptkit train``) or an export folder (``adaptkit
export``). What those folders hold and how they are read: ``adaptkit.artifacts``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from adaptkit.artifacts import (
    ADAPTER_FILE,
    LORA_DIR,
    RECIPE_FILE,
    ArtifactError,
    is_export,
    read_manifest,
    resolve_export_recipe,
    verify_run,
)
from adaptkit.config import Recipe
from adaptkit.model.build import build_model
from adaptkit.model.trainables import load_trainables
from adaptkit.recipes import load_recipe


def check_run(run: Path, verify: bool = True) -> Recipe:
    """The recipe of a complete run directory or export folder (paths resolved), after checking the folder
    against its manifest (``verify=False``: the links and pickle-format files only); raises naming the file
    at fault."""
    recipe_path = run / RECIPE_FILE
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path} is missing: {run} is not a run directory of `adaptkit train`")
    export = is_export(run)
    if export:
        read_manifest(run, verify)
    else:
        verify_run(run, verify)
    recipe = load_recipe(recipe_path)
    if export:  # an `adaptkit export` folder: paths are relative to it
        recipe = resolve_export_recipe(recipe, run)
    lora_dir = run / LORA_DIR
    lora_files = ("adapter_config.json", "adapter_model.safetensors")
    if recipe.lora.enabled and not all((lora_dir / f).is_file() for f in lora_files):
        raise ArtifactError(
            f"{lora_dir} is missing or incomplete (it needs {' and '.join(lora_files)}); the recipe has "
            "lora.enabled=true"
        )
    if not (run / ADAPTER_FILE).is_file():
        raise ArtifactError(f"{run / ADAPTER_FILE} is missing; the run did not finish saving")
    return recipe


def load_run(
    run_dir: str | Path, device: torch.device | str = "cpu", lm_quant: str | None = None, verify: bool = True
):
    """Rebuild a trained model from a run directory or an export folder; returns ``(recipe, model)``.

    Args:
        verify: check every file against the folder's manifest first (:func:`check_run`).
        lm_quant: load the LM at this quantization instead of the run's: ``none`` (its original
            full-precision checkpoint) or ``dequantized`` (the run's 4/8-bit weights dequantized to float32,
            the base `adaptkit export` merges a quantized run's LoRA into by default).
    """
    run = Path(run_dir)
    recipe = check_run(run, verify)
    if lm_quant not in (None, "dequantized"):
        recipe = dataclasses.replace(recipe, language=dataclasses.replace(recipe.language, quant=lm_quant))
    model = build_model(
        recipe,
        device,
        lora_dir=run / LORA_DIR if recipe.lora.enabled else None,
        dequantize_lm=lm_quant == "dequantized",
    )
    load_trainables(model, run)
    model.eval()
    return recipe, model
