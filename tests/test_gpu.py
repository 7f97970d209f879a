"""CUDA paths: skipped cleanly where no GPU is present (CI), run on a lent GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

from adaptkit.recipes import load_recipe
from adaptkit.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


@pytest.mark.parametrize("quant", ["none", "4bit", "8bit"])
def test_train_on_cuda_bf16(tiny_overrides, quant, tmp_path):
    overrides = [*tiny_overrides, "mixed_precision=bf16", f"language.quant={quant}", "lora.start_step=1"]
    summary = train(load_recipe(RECIPE, overrides))
    assert summary["frozen_unchanged"] and summary["steps"] == 4
    assert summary["peak_memory_mb"]["training"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def test_feature_cache_is_keyed_by_device(tiny_mobilenet_pth):
    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.config import VisionConfig
    from adaptkit.data.feature_cache import backbone_key

    backbone = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    cpu_key = backbone_key(backbone, "cpu")["key"]
    gpu_key = backbone_key(backbone.to("cuda"), "cuda")["key"]
    assert cpu_key != gpu_key
