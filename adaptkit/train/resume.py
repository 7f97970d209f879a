"""Where a run starts: a new output directory (never overwriting a run) or the checkpoint to resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from adaptkit import checkpoint as ckpt
from adaptkit.artifacts import ADAPTER_FILE, LORA_DIR, RECIPE_FILE

if TYPE_CHECKING:
    from adaptkit.config import Recipe


def check_output_dir(out: Path) -> None:
    """A new run starts only in a missing or empty directory, or over a start that failed in its set-up
    (:func:`_failed_start`): a finished run, a crashed one (metrics, checkpoints but no final weights) or
    anything else a user keeps there is never written over."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file, not a directory; pass another output_dir=...")
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    if not held or _failed_start(out, held):
        return
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    finished = (out / ADAPTER_FILE).exists() or (out / LORA_DIR).exists()
    hint = "pass another output_dir=..."
    if not finished and ckpt.latest_checkpoint(out) is not None:
        hint = f"continue it with resume=auto (adaptkit train RECIPE output_dir={out} resume=auto), or {hint}"
    what = "a finished run" if finished else "files"
    raise FileExistsError(f"output_dir {out} already holds {what} ({shown}); nothing was overwritten: {hint}")


#: what a start that failed in its set-up (bad data, a wrong model name) leaves: nothing trained.
FAILED_START = {RECIPE_FILE, "train.log", "metrics.jsonl"}


def _failed_start(out: Path, held: list[str]) -> bool:
    """Whether ``out`` holds only what a start that failed before its first step wrote (its recipe, its log
    and no metrics row past step 0), which a new start may replace."""
    if not set(held) <= FAILED_START:
        return False
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return True
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        if not isinstance(row, dict) or row.get("step", 0) != 0:
            return False
    return True


def resume_point(recipe: Recipe, out: Path) -> Path | None:
    """The checkpoint ``recipe.resume`` asks for (None: start from scratch)."""
    if not recipe.resume:
        return None
    if recipe.resume == "auto":
        found = ckpt.latest_checkpoint(out)
        if found is None and (out / RECIPE_FILE).exists():
            stale = ckpt.checkpoint_root(out)
            raise FileExistsError(
                f"resume=auto: {out} holds a run but no complete checkpoint under {stale}; start a new "
                "output_dir (nothing was overwritten)"
            )
        return found
    path = Path(recipe.resume)
    folder = path if (path / ckpt.MANIFEST).is_file() else ckpt.latest_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(f"resume={recipe.resume}: no complete checkpoint there")
    run = folder.parent.parent
    if run.resolve() != out.resolve():
        raise ValueError(
            f"resume={recipe.resume} belongs to run {run}, but output_dir is {out}; pass output_dir={run}"
        )
    return folder


def check_same_recipe(recipe: Recipe, out: Path) -> None:
    """A resumed run must train the recipe it was started with (only ``resume`` may differ)."""
    from adaptkit.config.docs import diff
    from adaptkit.recipes import load_recipe

    differ = [row for row in diff(load_recipe(out / RECIPE_FILE), recipe) if row[0] != "resume"]
    if differ:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ[:6])
        raise ValueError(
            f"resume: the recipe differs from {out / RECIPE_FILE} ({shown}); an exact resume needs the same "
            "recipe — drop those overrides or start a new output_dir"
        )


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a metrics file up to ``step`` (a crashed run may have logged past its checkpoint,
    or been killed in the middle of a line: a line that does not parse is dropped)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by the crash
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
