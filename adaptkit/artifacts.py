"""What `adaptkit train` and `adaptkit export` write, and how to read it back (no model code here).

A run directory::

    recipe.yaml            the resolved recipe (every knob, after overrides)
    adapter.safetensors    the fusion adapter's weights
    heads.safetensors      the image-text heads (embedding projections, matching), when the recipe has them
    lora/                  the LoRA adapter in peft's format (adapter_config.json + safetensors)
    train.log              the training log
    metrics.jsonl          one JSON object per logged step (step, loss, lr, samples_per_s, ...)
    eval.json              the latest evaluation
    summary.json           parameter counts, timings, final metrics
    answers.json           the task's run file (VQA: the training answers predict and the demo rank)

An export folder (``adaptkit export``) holds the same ``recipe.yaml`` and ``adapter.safetensors``, the
merged LM in ``lm/`` and ``adaptkit_export.json``, a manifest with the sha256 of every file.

Modules that rebuild models (``runs``), write exports (``export``) or serve them (``inference``) all read
these through this module, which depends on none of them (nor on the recipe loader).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from adaptkit.assets import first_mismatch

if TYPE_CHECKING:
    from adaptkit.config import Recipe

RECIPE_FILE = "recipe.yaml"
ADAPTER_FILE = "adapter.safetensors"
HEADS_FILE = "heads.safetensors"
TEXT_LORA_FILE = "text_lora.safetensors"
LORA_DIR = "lora"
EXPORT_FILE = "adaptkit_export.json"


class ExportError(RuntimeError):
    """An export failed its verification, or an export folder is damaged (names the file)."""


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


def is_export(root: str | Path) -> bool:
    return (Path(root) / EXPORT_FILE).is_file()


def read_manifest(root: str | Path, verify: bool = True) -> dict:
    """The manifest of an export folder; with ``verify``, every listed file's sha256 is checked.

    Raises:
        ExportError: manifest unreadable, a file missing, or a file changed since export.
    """
    root = Path(root)
    path = root / EXPORT_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not a readable adaptkit export manifest ({err})") from None
    if manifest.get("format") != "adaptkit-export":
        raise ExportError(f"{path}: not an adaptkit export manifest (no format: adaptkit-export)")
    files = manifest.get("files", {})
    bad = first_mismatch(root, files) if verify else None
    if bad is not None:
        file, actual = bad
        if actual is None:
            raise ExportError(f"{file} is missing from the export; re-export with `adaptkit export`")
        expected = files[file.relative_to(root).as_posix()]
        raise ExportError(
            f"{file} was changed after export (sha256 {actual[:16]}…, manifest {expected[:16]}…); "
            "re-export, or load with verify=False if you changed it on purpose"
        )
    return manifest


def resolve_export_recipe(recipe: Recipe, root: Path) -> Recipe:
    """Turn an export recipe's folder-relative paths into absolute ones."""
    lang = dataclasses.replace(recipe.language, name=str(root / recipe.language.name))
    vision = recipe.vision
    if vision.family == "hf" and (root / vision.name).is_dir():
        vision = dataclasses.replace(vision, name=str(root / vision.name))
    elif vision.weights not in ("embedded", "", "none", "random") and (root / vision.weights).is_file():
        vision = dataclasses.replace(vision, weights=str(root / vision.weights))
    text = recipe.text_encoder
    if text.name not in ("", "none") and (root / text.name).is_dir():
        text = dataclasses.replace(text, name=str(root / text.name))
    return dataclasses.replace(recipe, language=lang, vision=vision, text_encoder=text)
