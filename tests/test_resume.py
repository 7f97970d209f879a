"""Checkpoints and resume: SIGKILL mid-epoch then resume=auto gives bit-identical per-step losses and the
same samples; a crash during a save leaves the previous checkpoint; bad checkpoints give clear errors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptkit import checkpoint as ckpt
from adaptkit.assets import sha256_file
from adaptkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "easyvqa_qformer_lora.yaml")
# 24 samples, 2 per micro-batch, 2 micro-batches per step: 6 steps per epoch, 3 epochs.
RESUMABLE = [
    "batch_size=2",
    "grad_accum_steps=2",
    "max_steps=18",
    "checkpoint_every=2",
    "keep_checkpoints=3",
    "log_every=1",
    "log_samples=true",
    "eval_every=0",
    "lora.start_step=3",
    "lr_lora=0.01",
    "warmup_steps=2",
]


def _overrides(tiny_overrides: list[str], out: Path) -> list[str]:
    kept = [o for o in tiny_overrides if not o.startswith(("output_dir=", "max_steps=", "batch_size="))]
    return [*kept, *RESUMABLE, f"output_dir={out}"]


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "adaptkit", "train", RECIPE, *overrides]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_run(ref: Path, other: Path) -> None:
    ref_rows, other_rows = _rows(ref / "samples.jsonl"), _rows(other / "samples.jsonl")
    assert [r["indices"] for r in other_rows] == [r["indices"] for r in ref_rows]
    assert [r["loss"] for r in other_rows] == [r["loss"] for r in ref_rows]  # exact floats, bit for bit
    ref_loss = [(r["step"], r["loss"]) for r in _rows(ref / "metrics.jsonl") if "loss" in r]
    other_loss = [(r["step"], r["loss"]) for r in _rows(other / "metrics.jsonl") if "loss" in r]
    assert other_loss == ref_loss and len(ref_loss) == 18
    a, b = load_file(str(ref / "adapter.safetensors")), load_file(str(other / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every epoch saw each of the 24 samples exactly once: no gap, no duplicate.
    per_epoch: dict[int, Counter] = {}
    for row in other_rows:
        per_epoch.setdefault(row["epoch"], Counter()).update(row["indices"])
    assert sorted(per_epoch) == [0, 1, 2]
    assert all(sorted(c) == list(range(24)) and set(c.values()) == {1} for c in per_epoch.values())


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_overrides, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    done = subprocess.run(
        _train_cmd(_overrides(tiny_overrides, ref)), capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        _train_cmd(_overrides(tiny_overrides, crashed)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 300
    while ckpt.latest_checkpoint(crashed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "summary.json").exists(), "the run finished before it could be killed"
    resumed_from = ckpt.latest_checkpoint(crashed)
    state = json.loads((resumed_from / "state.json").read_text())
    assert 0 < state["batch_in_epoch"] < 12, state  # mid-epoch

    done = subprocess.run(
        _train_cmd(_overrides(tiny_overrides, crashed) + ["resume=auto"]),
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {resumed_from}" in (crashed / "train.log").read_text()
    assert json.loads((crashed / "summary.json").read_text())["resumed_from"] == str(resumed_from)
    _assert_same_run(ref, crashed)
    # keep_checkpoints=3: the newest three remain, the last one at max_steps.
    assert [p.name for p in ckpt.list_checkpoints(crashed)] == [
        "checkpoint-000014",
        "checkpoint-000016",
        "checkpoint-000018",
    ]


def test_crash_during_checkpoint_save_resumes_from_previous(tiny_overrides, tmp_path, monkeypatch, capsys):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(["train", RECIPE, *_overrides(tiny_overrides, ref)]) == 0

    real_commit, calls = ckpt.commit, []

    def crash_on_third(tmp, keep):
        calls.append(tmp)
        if len(calls) == 3:  # files written, manifest and rename not yet: the process dies here
            raise KeyboardInterrupt("injected crash during the save of step 6")
        return real_commit(tmp, keep)

    monkeypatch.setattr(ckpt, "commit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(["train", RECIPE, *_overrides(tiny_overrides, crashed)])
    monkeypatch.setattr(ckpt, "commit", real_commit)
    assert (crashed / "checkpoints" / "checkpoint-000006.tmp").is_dir()
    assert ckpt.latest_checkpoint(crashed).name == "checkpoint-000004"
    ckpt.verify(ckpt.latest_checkpoint(crashed))  # the previous checkpoint is intact

    assert main(["train", RECIPE, *_overrides(tiny_overrides, crashed), "resume=auto"]) == 0
    assert not (crashed / "checkpoints" / "checkpoint-000006.tmp").exists()
    log = (crashed / "train.log").read_text()
    assert "resuming from" in log and "checkpoint-000004" in log and "left by a crash" in log
    _assert_same_run(ref, crashed)


@pytest.fixture
def finished(tiny_overrides, tmp_path) -> Path:
    out = tmp_path / "run"
    overrides = _overrides(tiny_overrides, out)
    overrides = [o for o in overrides if not o.startswith("max_steps=")] + ["max_steps=4"]
    assert main(["train", RECIPE, *overrides]) == 0
    return out


def _rehash(folder: Path) -> None:
    files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != ckpt.MANIFEST
    }
    (folder / ckpt.MANIFEST).write_text(json.dumps({"files": files}))


def _resume(tiny_overrides, out: Path, folder: Path, capsys) -> str:
    overrides = [o for o in _overrides(tiny_overrides, out) if not o.startswith("max_steps=")] + [
        "max_steps=4"
    ]
    assert main(["train", RECIPE, *overrides, f"resume={folder}"]) == 2
    return capsys.readouterr().err


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_are_refused_with_the_file_named(finished, tiny_overrides, tmp_path, capsys):
    folder = ckpt.checkpoint_root(finished) / "checkpoint-000002"
    weights = folder / "trainables.safetensors"
    original = weights.read_bytes()

    weights.write_bytes(original[: len(original) // 2])  # truncated on disk
    err = _resume(tiny_overrides, finished, folder, capsys)
    assert "trainables.safetensors is damaged" in err

    _rehash(folder)  # a truncated file whose manifest agrees: the safetensors reader catches it
    err = _resume(tiny_overrides, finished, folder, capsys)
    assert "trainables.safetensors is not a readable safetensors file" in err

    state = load_file(str(folder.parent / "checkpoint-000004" / "trainables.safetensors"))
    name = next(iter(state))
    save_file({**state, name: torch.zeros(3, 3)}, str(weights))
    _rehash(folder)
    err = _resume(tiny_overrides, finished, folder, capsys)
    assert "trainables.safetensors has tensors of the wrong shape" in err and name in err

    save_file({k: v for k, v in state.items() if k != name}, str(weights))
    _rehash(folder)
    err = _resume(tiny_overrides, finished, folder, capsys)
    assert "trainables.safetensors does not fit this model: missing" in err and name in err

    weights.write_bytes(original)
    marker = tmp_path / "payload-ran"
    with (folder / "optimizer.safetensors").open("wb") as handle:  # a pickle with a code payload
        pickle.dump({"state": _Payload(marker)}, handle)
    _rehash(folder)
    err = _resume(tiny_overrides, finished, folder, capsys)
    assert "optimizer.safetensors is not a readable safetensors file" in err
    assert not marker.exists()  # nothing was unpickled
    with (folder / "optimizer.safetensors").open("wb") as handle:
        torch.save({"state": _Payload(marker)}, handle)  # the same payload in torch.save's zip format
    _rehash(folder)
    err = _resume(tiny_overrides, finished, folder, capsys)
    assert "optimizer.safetensors is not a readable safetensors file" in err
    assert not marker.exists()


def test_resume_refuses_a_changed_recipe_and_a_finished_run(finished, tiny_overrides, capsys):
    overrides = [o for o in _overrides(tiny_overrides, finished) if not o.startswith("max_steps=")]
    assert main(["train", RECIPE, *overrides, "max_steps=4", "lr_adapter=0.5", "resume=auto"]) == 2
    assert "lr_adapter" in capsys.readouterr().err
    assert main(["train", RECIPE, *overrides, "max_steps=4", "resume=auto"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", RECIPE, *overrides, "max_steps=4"]) == 2  # no resume: never overwritten
    assert "already holds a finished run" in capsys.readouterr().err
