"""End-to-end: `adaptkit train` a few steps on a tiny JSONL, then `adaptkit eval --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adaptkit.cli import main

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def test_train_then_eval_end_to_end(tiny_overrides, tiny_vqa, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", RECIPE, *tiny_overrides]) == 0
    for name in (
        "recipe.yaml",
        "adapter.safetensors",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
        "train.log",
        "metrics.jsonl",
        "eval.json",
        "summary.json",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert all({"step", "loss", "lr", "samples_per_s", "wall_s"} <= r.keys() for r in steps)
    assert [r["wall_s"] for r in steps] == sorted(r["wall_s"] for r in steps)
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["frozen_unchanged"]
        and 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"]
        and summary["peak_memory_mb"]["training"] > 0
    )
    assert (
        set(load_file(str(run / "adapter.safetensors")))
        and "trainable parameters" in (run / "train.log").read_text()
    )

    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tiny_vqa), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 24 and 0.0 <= result["accuracy"] <= 1.0
    assert json.loads((run / "eval.json").read_text())["n"] == 24
    assert len((run / "eval_predictions.jsonl").read_text().splitlines()) == 24

    # A second run into the same directory is refused and leaves the first one intact.
    before = (run / "adapter.safetensors").read_bytes()
    assert main(["train", RECIPE, *tiny_overrides]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run / "adapter.safetensors").read_bytes() == before


def test_eval_json_last_line_in_subprocess(tiny_overrides, tiny_vqa, tmp_path):
    run = tmp_path / "run"
    assert main(["train", RECIPE, *tiny_overrides, "max_steps=1", "log_every=1"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptkit",
            "eval",
            str(run),
            "--data",
            str(tiny_vqa),
            "--limit",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 5 and isinstance(result["accuracy"], float)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", RECIPE, "max_stepz=3"], "max_stepz"),
        (["train", RECIPE, "language.quant=2bit"], "language.quant"),
        (["eval", "/nonexistent/run", "--data", "easyvqa:test"], "not a run directory"),
        (["assets", "llama"], "no embedded LM llama (known: smollm2, gemma3-270m)"),
    ],
)
def test_cli_user_errors_exit_2_with_message(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_malformed_training_data_is_reported(tiny_overrides, tiny_vqa, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = tiny_vqa.read_text().splitlines()
    bad.write_text(
        "\n".join(lines[:3] + ['{"image": "nope.png", "question": "q", "answer": "a"}'] + lines[3:])
    )
    (tmp_path / "images").symlink_to(tiny_vqa.parent / "images")
    assert main(["train", RECIPE, *tiny_overrides, f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4" in err and "nope.png" in err


def test_batch_larger_than_the_data_is_refused(tiny_overrides, capsys):
    # The tiny data has 24 questions: a batch of 32 could never be drawn (nor trained on forever).
    assert main(["train", RECIPE, *tiny_overrides, "batch_size=32"]) == 2
    err = capsys.readouterr().err
    assert "batch_size=32 exceeds the 24 training samples: lower batch_size" in err
