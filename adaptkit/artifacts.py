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
    adaptkit_run.json      the manifest: the sha256 of every file that defines the trained model, written
                           when the run saves and checked whenever the run is loaded (logs, evaluations
                           and checkpoints, which have their own, are left out)

An export folder (``adaptkit export``) holds the same ``recipe.yaml`` and ``adapter.safetensors``, the
merged LM in ``lm/`` and ``adaptkit_export.json``, a manifest with the sha256 of every file.

Modules that rebuild models (``runs``), write exports (``export``) or serve them (``inference``) all read
these through this module, which depends on none of them (nor on the recipe loader). Whatever is loaded from
either folder is checked first against its manifest; links that leave the folder and pickle-format files
(which would run code when loaded) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
RUN_FILE = "adaptkit_run.json"
#: what a run's manifest leaves out: logs, files later commands rewrite, checkpoints (they have their own).
UNSEALED = (
    "checkpoints",
    "tensorboard",
    "train.log",
    "metrics.jsonl",
    "samples.jsonl",
    "curves.png",
    "eval.json",
    "eval_predictions.jsonl",
    "quickstart_eval.json",
    RUN_FILE,
)
#: weight formats that unpickle when loaded: never read from a run or an export.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ArtifactError(RuntimeError):
    """A run directory or an export folder is incomplete, damaged or unsafe (the message names the file and
    what to do)."""


class ExportError(ArtifactError):
    """An export failed its verification, or an export folder is damaged (names the file)."""


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when the file is missing or unreadable (optional run files)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_list(path: Path, key: str) -> list[str] | None:
    """The list of strings under ``key`` in a run file such as ``answers.json`` (None: the file is missing,
    or says none); a file of another shape is an error naming it, never used silently."""
    if not path.exists():
        return None
    saved = read_json(path)
    value = saved.get(key, ...) if isinstance(saved, dict) else ...
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ArtifactError(
            f"{path} is not a run file adaptkit wrote (expected an object whose {key!r} is a list of "
            "strings); retrain the run, or restore the file"
        )
    return value


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (a full disk, a read-only folder) raised as the
    ``OSError`` they are: safetensors reports them as ``SafetensorError``, which the callers' "cannot write"
    handling (checkpoints, the feature cache, run files) would otherwise miss."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from err


def write_json(path: Path, obj: dict, durable: bool = False) -> None:
    """Write JSON atomically (temporary file, then rename); ``durable``: flushed to the disk before the
    rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(json.dumps(obj, indent=2) + "\n")
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    tmp.replace(path)


def is_export(root: str | Path) -> bool:
    return (Path(root) / EXPORT_FILE).is_file()


def read_manifest(root: str | Path, verify: bool = True) -> dict:
    """The manifest of an export folder, after :func:`check_files` (with ``verify``, every listed file's
    sha256 too).

    Raises:
        ExportError: manifest unreadable, a file missing or changed since export, a link out of the folder,
            a pickle-format file.
    """
    root = Path(root)
    path = root / EXPORT_FILE
    try:
        manifest = _read_manifest(path, "adaptkit-export")
        fix = "re-export, or load with verify=False if you changed it on purpose"
        check_files(root, manifest["files"], "export", fix, verify)
    except ExportError:
        raise
    except ArtifactError as err:
        raise ExportError(str(err)) from None
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


# ---- run manifests ----------------------------------------------------------------------------------


def seal_run(root: str | Path) -> dict:
    """Write ``adaptkit_run.json``: the sha256 of every file of the finished run but :data:`UNSEALED`
    (written atomically and flushed to disk)."""
    from adaptkit.assets import sha256_file

    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in UNSEALED
    }
    manifest = {"format": "adaptkit-run", "version": 1, "files": files}
    write_json(root / RUN_FILE, manifest, durable=True)
    return manifest


def _read_manifest(path: Path, fmt: str) -> dict:
    """A manifest, its shape checked (an object with ``format`` and ``files``: path -> sha256)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: not a readable manifest ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or not isinstance(files, dict):
        raise ArtifactError(f"{path}: not an {fmt} manifest (expected an object with format {fmt} and files)")
    bad = [k for k, v in files.items() if not isinstance(v, str) or len(v) != 64 or ".." in Path(k).parts]
    if bad:
        raise ArtifactError(f"{path}: malformed entries for {bad[:3]}")
    return manifest


def check_files(root: Path, files: dict[str, str], what: str, fix: str, hashes: bool = True) -> None:
    """Refuse a folder whose listed ``files`` link outside it, that holds pickle-format weights, or (with
    ``hashes``) whose listed files are missing or changed since the manifest was written."""
    top = root.resolve()
    for rel in files:
        file = root / rel
        try:
            target = file.resolve()
        except (OSError, RuntimeError) as err:  # a link loop
            raise ArtifactError(f"{file} cannot be resolved ({err}); refusing to read it") from None
        if not target.is_relative_to(top):
            raise ArtifactError(f"{file} is a link to {target}, outside the {what}; refusing to read it")
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if file.suffix.lower() in PICKLE_SUFFIXES and rel.parts[0] != "checkpoints":
            raise ArtifactError(
                f"{file} is a pickle-format file, which adaptkit never loads (it could run code): delete it; "
                f"the {what}'s weights are its .safetensors files"
            )
    bad = first_mismatch(root, files) if hashes else None
    if bad is not None:
        file, actual = bad
        if actual is None:
            raise ArtifactError(f"{file} is missing from the {what}; {fix}")
        expected = files[file.relative_to(root).as_posix()]
        raise ArtifactError(
            f"{file} was changed after the {what} was written (sha256 {actual[:16]}…, manifest "
            f"{expected[:16]}…): {fix}"
        )


def verify_run(root: str | Path, verify: bool = True) -> None:
    """Check a run directory against its manifest (see :func:`check_files`); ``verify=False`` skips the
    hashes (not the links and pickles) and accepts a run without a manifest."""
    root = Path(root)
    path = root / RUN_FILE
    if not path.is_file():
        if (root / "lm").is_dir() and (root / ADAPTER_FILE).is_file():
            raise ArtifactError(
                f"{root} looks like an export folder whose {EXPORT_FILE} is missing; an export is only "
                "loaded with its manifest (it would otherwise look for its LM on the hub): export again"
            )
        if verify:
            raise ArtifactError(
                f"{path} is missing: {root} is not a finished run of `adaptkit train` (still training, "
                "crashed before its final save, or its manifest was deleted), so its files cannot be "
                "checked; resume or retrain it, or pass --no-verify (verify=False) if you trust them"
            )
        check_files(root, {}, "run directory", "", hashes=False)
        return
    files = _read_manifest(path, "adaptkit-run")["files"]
    check_files(root, files, "run directory", "retrain the run, or restore the file", hashes=verify)
