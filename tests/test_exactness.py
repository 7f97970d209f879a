"""Exactness (issue 30, class 1): a run's weights and per-step losses do not depend on how its feature cache
was filled, and resuming from any checkpoint, those taken before LoRA starts included, gives the
uninterrupted run bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.artifacts import RUN_FILE
from adaptkit.cli import main
from tests.test_hostile_inputs import RECIPE

SHORT = [
    "max_steps=6",
    "log_samples=true",
    "eval_every=0",
    "lora.start_step=4",
    "lr_lora=0.01",
    "log_every=1",
]


def _common(tiny_overrides) -> list[str]:
    skip = ("output_dir=", "max_steps=", "feature_cache_dir=")
    return [o for o in tiny_overrides if not o.startswith(skip)] + SHORT


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("adapter.safetensors", "lora/adapter_model.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(run / name)).items()})
    return out


def _assert_identical(a: Path, b: Path) -> None:
    rows = [[json.loads(line) for line in (r / "samples.jsonl").read_text().splitlines()] for r in (a, b)]
    assert [r["indices"] for r in rows[0]] == [r["indices"] for r in rows[1]]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]  # exact floats
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_cold_and_warm_feature_caches_give_the_same_run(tiny_overrides, tmp_path):
    common = [*_common(tiny_overrides), f"feature_cache_dir={tmp_path / 'features'}"]
    assert main(["train", RECIPE, *common, f"output_dir={tmp_path / 'cold'}"]) == 0  # fills the cache
    assert main(["train", RECIPE, *common, f"output_dir={tmp_path / 'warm'}"]) == 0  # reads it back
    _assert_identical(tmp_path / "cold", tmp_path / "warm")
    memory = [*_common(tiny_overrides), "feature_cache_dir=none"]  # and with no disk cache at all
    assert main(["train", RECIPE, *memory, f"output_dir={tmp_path / 'memory'}"]) == 0
    _assert_identical(tmp_path / "cold", tmp_path / "memory")


# The layers below the entry layer kept per text, or recomputed in each step with batches cut into token
# slices (max_batch_tokens: the tiny packed batches take ~60 LM slots).
VARIANTS = {"kept": ["lower_states=keep"], "sliced": ["lower_states=recompute", "max_batch_tokens=24"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("checkpoint", [1, 2, 3, 4, 5])
def test_resume_from_every_step_is_the_uninterrupted_run(
    checkpoint, variant, tiny_overrides, tmp_path_factory
):
    root = tmp_path_factory.getbasetemp() / f"exactness-{variant}"
    common = [
        *_common(tiny_overrides),
        *VARIANTS[variant],
        "checkpoint_every=1",
        "keep_checkpoints=10",
        f"feature_cache_dir={root / 'f'}",
    ]
    ref = root / "ref"
    if not (ref / RUN_FILE).exists():
        assert main(["train", RECIPE, *common, f"output_dir={ref}"]) == 0
    run = tmp_path_factory.mktemp(f"{variant}-from{checkpoint}") / "run"
    shutil.copytree(ref, run)
    for name in ("adapter.safetensors", "summary.json", "eval.json", "answers.json", "curves.png", RUN_FILE):
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "lora")
    for folder in (run / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) > checkpoint:
            shutil.rmtree(folder)
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(str(ref), str(run)))
    assert main(["train", RECIPE, *common, f"output_dir={run}", "resume=auto"]) == 0
    _assert_identical(ref, run)
