"""Multi-process training through `accelerate launch` (two CPU processes, gloo): replicas stay identical
after every step and the result matches one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.cli import main
from tests.conftest import AT_INPUT, launch_two

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "easyvqa_qformer_lora.yaml")


def _common(tiny_overrides) -> list[str]:
    kept = [o for o in tiny_overrides if not o.startswith(("output_dir=", "batch_size=", "max_steps="))]
    return [
        *kept,
        "max_steps=5",
        "lora.start_step=2",  # LoRA unused for two steps: DDP must cope with parameters without gradients
        "lr_lora=0.01",
        # The float-rounding bounds below scale with the step size: pin the rates the recipe may retune.
        "lr_adapter=1e-3",
        "warmup_steps=30",
        "eval_every=0",
        "eval_limit=0",
        "check_replicas=1",
        "log_every=1",
        "log_samples=true",
    ]


def _launch_two(common: list[str], out: Path, batch_size: int = 2) -> subprocess.CompletedProcess:
    return launch_two(["train", RECIPE, *common, f"batch_size={batch_size}", f"output_dir={out}"])


def _train_two_processes(common: list[str], out: Path) -> None:
    """``adaptkit train`` in two gloo processes (batch 2 each); checks that the replicas stayed identical."""
    done = _launch_two(common, out)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    digests = [r for r in rows if "replica_digests" in r]
    assert [r["step"] for r in digests] == [1, 2, 3, 4, 5]
    assert all(len(r["replica_digests"]) == 2 and len(set(r["replica_digests"])) == 1 for r in digests)


def test_two_processes_stay_in_sync_and_match_one(tiny_overrides, tmp_path):
    # One question per sequence: one process with batch 4 draws the same global batches as two with 2 each
    # (packed ones too: next test).
    common = [*_common(tiny_overrides), *AT_INPUT]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", RECIPE, *common, "batch_size=4", f"output_dir={one}"]) == 0
    _train_two_processes(common, two)

    # Same global batch (2 x 2 vs 4), same samples per step: same training within float rounding.
    losses = {
        n: [
            r["loss"]
            for r in (n / "metrics.jsonl").read_text()
            and [json.loads(line) for line in (n / "metrics.jsonl").read_text().splitlines()]
            if "loss" in r
        ]
        for n in (one,)
    }
    assert len(losses[one]) == 5
    one_seen = [json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()]
    two_seen = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    assert [r["indices"] for r in two_seen] == [r["indices"] for r in one_seen]  # same global batches
    # The same updates up to float rounding. Adam turns rounding noise in near-zero gradients into steps of
    # up to the learning rate for a few elements, so the bound is on the mean, plus a cap per element.
    for name in ("adapter.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.mean() < 1e-5 and (diff > 1e-4).float().mean() < 0.005 and diff.max() < 2e-3, name

    # Evaluation was sharded over the two processes and gathered: all 24 samples, scored once.
    ev_one, ev_two = (json.loads((n / "eval.json").read_text()) for n in (one, two))
    assert ev_two["n"] == ev_one["n"] == 24
    assert ev_two["accuracy"] == ev_one["accuracy"]
    log = (two / "train.log").read_text()
    assert log.count("saved run to") == 1  # one process logs and saves


def test_two_processes_with_the_shipped_path(tiny_overrides, tmp_path):
    # Soft tokens injected above layer 0 with cached lower-layer states, packed questions: the replicas
    # stay identical (checked every step), every global batch holds 4 different questions, no question is
    # drawn twice within the epoch (5 steps x 4 of the 24), and the global batches, packed and sorted by
    # length, are those of one process with batch 4 (each process takes its half of each).
    one, two = tmp_path / "one", tmp_path / "two"
    common = _common(tiny_overrides)
    assert main(["train", RECIPE, *common, "batch_size=4", f"output_dir={one}"]) == 0
    _train_two_processes(common, two)
    seen = [json.loads(line)["indices"] for line in (two / "samples.jsonl").read_text().splitlines()]
    flat = [i for batch in seen for i in batch]
    assert len(seen) == 5 and all(len(batch) == 4 for batch in seen) and len(set(flat)) == 20
    one_seen = [json.loads(line)["indices"] for line in (one / "samples.jsonl").read_text().splitlines()]
    assert seen == one_seen
    assert json.loads((two / "eval.json").read_text())["n"] == 24
    log = (two / "train.log").read_text()
    assert "lower-layer states" in log and log.count("saved run to") == 1


def test_global_batch_larger_than_the_data_is_refused(tiny_overrides, tmp_path):
    # 16 per process fits the 24 questions, but two processes draw global batches of 32.
    done = _launch_two(_common(tiny_overrides), tmp_path / "two", batch_size=16)
    assert done.returncode != 0
    assert "batch_size=16 x 2 processes exceeds the 24 training samples" in done.stderr


def test_example_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP"}
    for name, kind in expected.items():
        config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
        assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True  # peft's frozen/trainable split needs it
    zero2 = load_config_from_file(str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert zero2.distributed_type.value == "DEEPSPEED" and zero2.deepspeed_config["zero_stage"] == 2
    assert zero2.deepspeed_config["gradient_clipping"] == 1.0  # the recipes' max_grad_norm


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available(),
    reason="DeepSpeed ZeRO-2 needs `pip install deepspeed` and CUDA (not in adaptkit's requirements)",
)
def test_deepspeed_zero2_launch(tiny_overrides, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"),
        "--num_processes",
        "1",
        "-m",
        "adaptkit",
        "train",
        str(ROOT / "recipes" / "easyvqa_qformer_lora.yaml"),
        *tiny_overrides,
        "mixed_precision=bf16",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
