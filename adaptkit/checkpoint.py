"""Training checkpoints: atomic, complete, safe to load, and enough to resume bit for bit.

A checkpoint is a folder ``RUN/checkpoints/checkpoint-STEP/``::

    trainables.safetensors   every trainable parameter (fusion adapter, LoRA) by its name in the model
    optimizer.safetensors    AdamW's per-parameter tensors; optimizer.json: its groups and the rest
    scheduler.json           the LR scheduler's state
    rng-rank{R}.safetensors  torch CPU (and CUDA) generator states of process R, plus the data-order
                             generator; rng-rank{R}.json: Python's and NumPy's generator states
    state.json               step, epoch, micro-batches consumed in the epoch, the partial logging window
    manifest.json            sha256 of every file above, written last

Nothing is pickled: a checkpoint is safetensors and JSON only, so loading one never runs code.
It is written under ``checkpoint-STEP.tmp`` and renamed when complete, so a crash mid-save leaves the
previous checkpoints untouched and no folder that looks complete; only folders with a manifest count.
Loading verifies every hash first, then shapes and names, and names the file at fault.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adaptkit.artifacts import save_safetensors as save_file
from adaptkit.assets import first_mismatch, hash_files

log = logging.getLogger("adaptkit")

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, unsafe, or does not fit this model (the message names the file)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (renamed, with a manifest), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / MANIFEST).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- saving -----------------------------------------------------------------------------------------


def _rng_state(loader_generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    if loader_generator is not None:
        tensors["data_order"] = loader_generator.get_state()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def write_rng(folder: Path, rank: int, loader_generator: torch.Generator | None) -> None:
    """This process's generator states into ``folder`` (every process calls it)."""
    tensors, plain = _rng_state(loader_generator)
    save_file(tensors, str(folder / f"rng-rank{rank}.safetensors"))
    (folder / f"rng-rank{rank}.json").write_text(json.dumps(plain))


def staging_dir(run_dir: Path, step: int) -> Path:
    """The temporary folder the checkpoint of ``step`` is written into before :func:`commit` renames it."""
    return checkpoint_root(run_dir) / f"checkpoint-{step:06d}.tmp"


def begin(tmp: Path) -> None:
    """Create ``tmp`` afresh (a crash may have left one); main process only."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def write_main(tmp: Path, trainables: dict[str, torch.Tensor], optimizer, scheduler, state: dict) -> None:
    """The main process's files: weights, optimizer, scheduler, loop state."""
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in trainables.items()}, str(tmp / "trainables.safetensors")
    )
    tensors, meta = _split_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (tmp / "scheduler.json").write_text(json.dumps(sched))
    (tmp / "state.json").write_text(json.dumps(state))


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, keep: int) -> Path:
    """Flush every file to disk, write the manifest, rename ``tmp`` into place (and flush the folder
    entries), then drop all but the newest ``keep`` checkpoints."""
    files = hash_files(tmp)
    for name in files:
        _fsync(tmp / name)
    with (tmp / MANIFEST).open("w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(tmp)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    if keep > 0:
        for old in list_checkpoints(tmp.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove ``*.tmp`` folders left by a crash during a save; returns what was removed."""
    root = checkpoint_root(run_dir)
    stale = sorted(root.glob("checkpoint-*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ---- loading ----------------------------------------------------------------------------------------


def verify(folder: Path) -> dict:
    """Check the manifest's hashes; returns the manifest."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: missing or unreadable ({err}); {folder} is not a complete checkpoint"
        ) from None
    bad = first_mismatch(folder, files)
    if bad is not None and bad[1] is None:
        raise CheckpointError(f"{bad[0]} is missing from the checkpoint")
    if bad is not None:
        raise CheckpointError(
            f"{bad[0]} is damaged (its sha256 differs from {path}: truncated or changed on disk); "
            "resume from an earlier checkpoint with resume=PATH or delete this one"
        )
    return manifest


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors tensors + JSON (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        plain = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                plain[key] = {"tensor": f"{pid}.{key}"}
            else:
                plain[key] = value
        meta["state"][str(pid)] = plain
    return tensors, meta


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, file: Path) -> dict:
    try:

        def value(v):
            return tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v

        state = {int(pid): {k: value(v) for k, v in entry.items()} for pid, entry in meta["state"].items()}
        return {"state": state, "param_groups": meta["param_groups"]}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{file} and its optimizer.json do not agree ({err!r})") from None


def _load_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not readable JSON ({err})") from None


def load_trainables(folder: Path, named_params: dict[str, torch.nn.Parameter]) -> None:
    """Copy the checkpoint's weights into the model's trainable parameters (names and shapes must match)."""
    file = folder / "trainables.safetensors"
    state = _load_safetensors(file)
    missing = sorted(set(named_params) - set(state))
    unexpected = sorted(set(state) - set(named_params))
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            f"({len(missing)} and {len(unexpected)} in all; was it saved by another recipe?)"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}"
        for k, p in named_params.items()
        if state[k].shape != p.shape
    ]
    if wrong:
        raise CheckpointError(f"{file} has tensors of the wrong shape for this model: {wrong[:3]}")
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def load_optimizer(folder: Path, optimizer) -> None:
    file = folder / "optimizer.safetensors"
    state = _join_optimizer(_load_safetensors(file), _load_json(folder / "optimizer.json"), file)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{file} does not fit this optimizer ({err})") from None


def load_scheduler(folder: Path, scheduler) -> None:
    file = folder / "scheduler.json"
    state = _load_json(file)
    current = scheduler.state_dict()
    state["lr_lambdas"] = current.get("lr_lambdas")
    try:
        scheduler.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file} does not fit this scheduler ({err})") from None


#: the loop state's counters (state.json): each a non-negative integer.
STATE_COUNTERS = ("step", "epoch", "batch_in_epoch", "accumulation_counter", "window_n")


def load_state(folder: Path) -> dict:
    """The loop state of a checkpoint, its counters checked (``state.json``)."""
    file = folder / "state.json"
    state = _load_json(file)
    bad = [
        k
        for k in STATE_COUNTERS
        if not isinstance(state, dict) or type(state.get(k)) is not int or state.get(k) < 0
    ]
    if isinstance(state, dict) and not isinstance(state.get("window_loss"), int | float):
        bad.append("window_loss")
    if bad:
        shown = {k: state.get(k) for k in bad} if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{file}: {', '.join(bad)} must be non-negative numbers (integers but window_loss), got {shown}; "
            "resume from another checkpoint with resume=PATH, or delete this one"
        )
    return state


def load_rng(folder: Path, rank: int, loader_generator: torch.Generator | None) -> None:
    """Restore this process's generator states (a process count change is an error)."""
    file = folder / f"rng-rank{rank}.safetensors"
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: the checkpoint was written by fewer processes than this run has; "
            "resume with the same number of processes"
        )
    tensors = _load_safetensors(file)
    plain = _load_json(folder / f"rng-rank{rank}.json")
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    if loader_generator is not None and "data_order" in tensors:
        loader_generator.set_state(tensors["data_order"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
