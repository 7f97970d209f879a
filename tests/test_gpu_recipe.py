"""The GPU recipe for users' own SigLIP + Qwen-style checkpoints, run end to end on random-weight models of
those architectures built from configs (the same loading code as real checkpoints: HF folders)."""

from __future__ import annotations

import json

import pytest
import torch

from adaptkit.inference import load_for_inference
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from tests.conftest import _tiny_tokenizer

RECIPE = "recipes/gpu_siglip_qwen_lora.yaml"


@pytest.fixture(scope="module")
def siglip_and_qwen(tmp_path_factory):
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("gpu_recipe")
    vision, lm = root / "siglip", root / "qwen2"
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    SiglipVisionModel(config).save_pretrained(vision)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vision)
    tokenizer = _tiny_tokenizer()
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    return vision, lm


def test_gpu_recipe_trains_siglip_and_qwen_checkpoints(siglip_and_qwen, tiny_vqa, tmp_path):
    vision, lm = siglip_and_qwen
    recipe = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path / 'run'}",
            f"vision.name={vision}",
            f"language.name={lm}",
            f"data.train={tiny_vqa}",
            f"data.eval={tiny_vqa}",
            f"feature_cache_dir={tmp_path / 'features'}",
            "adapter.qformer.hidden_size=32",
            "adapter.qformer.num_heads=4",
            "adapter.qformer.num_queries=4",
            "max_steps=3",
            "batch_size=4",
            "warmup_steps=1",
            "lora.start_step=1",
            "eval_limit=8",
            "eval_batch_size=4",
            "max_new_tokens=3",
            "checkpoint_every=0",
            "compile=false",
            # this CPU: the recipe's bf16 is for GPUs
            *([] if torch.cuda.is_available() else ["language.dtype=float32", "mixed_precision=no"]),
        ],
    )
    assert recipe.vision.family == "hf" and recipe.vision.feature_layer == -2
    summary = train(recipe)
    assert summary["steps"] == 3 and summary["frozen_unchanged"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"hf:{vision}:layer-2" in log  # the SigLIP tower's penultimate hidden state
    assert summary["parameters"]["lora"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    predictor = load_for_inference(tmp_path / "run")
    sample = json.loads(tiny_vqa.read_text().splitlines()[0])
    answer = predictor.predict(str(tiny_vqa.parent / sample["image"]), sample["question"])
    assert isinstance(answer.text, str) and 0 <= answer.score <= 1
