"""check-quant on tiny models: figures in range, full precision vs itself is exact, errors are clear."""

from __future__ import annotations

import json

import pytest

from adaptkit.config import RecipeError
from adaptkit.data.formats import load_vqa
from adaptkit.data.splits import subset
from adaptkit.quant_check import check_quant
from adaptkit.recipes import load_recipe


@pytest.fixture
def tiny_vit_dir(tmp_path):
    # Width 64, not the 32 of test_vision's ViT: bitsandbytes' 8-bit CPU path fails on 32-wide layers.
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def test_check_quant_reports_lm_and_vision(tiny_overrides, tiny_vit_dir):
    recipe = load_recipe(
        "recipes/easyvqa_qformer_lora.yaml",
        [*tiny_overrides, "vision.family=hf", f"vision.name={tiny_vit_dir}", "vision.extra_layers=[]"],
    )
    rows = check_quant(recipe, samples=12)
    lm = {r["quant"]: r for r in rows if r["backbone"] == "language"}
    vision = {r["quant"]: r for r in rows if r["backbone"] == "vision"}
    assert set(lm) == set(vision) == {"8bit", "4bit"}
    for row in lm.values():
        assert 0.0 <= row["kl_mean"] < 1.0 and 0.0 <= row["kl_answer_mean"] < 1.0
        assert 0.5 <= row["top1_agreement"] <= 1.0
        assert row["memory_mb"] < row["full_precision_memory_mb"]
    # 4-bit is coarser than 8-bit: further from full precision.
    assert lm["4bit"]["kl_mean"] > lm["8bit"]["kl_mean"] >= 0
    for row in vision.values():
        assert 0.5 < row["feature_cosine_min"] <= row["feature_cosine_mean"] <= 1.0 + 1e-6
        assert row["images"] == len({s.image for s in subset(load_vqa(recipe.data.train).samples, 12)})
    assert vision["4bit"]["feature_cosine_mean"] < vision["8bit"]["feature_cosine_mean"]


def test_check_quant_cli_json_and_cnn_note(tiny_overrides, capsys):
    from adaptkit.cli import main

    argv = ["check-quant", "recipes/easyvqa_qformer_lora.yaml", *tiny_overrides, "--levels", "4bit"]
    assert main([*argv, "--samples", "8", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])
    assert [r["quant"] for r in rows] == ["4bit", "none"]
    assert "not quantized" in rows[1]["note"]
    assert out[0].startswith("language 4bit")
    assert main([*argv[:-1], "3bit"]) == 2
    assert "is not 8bit or 4bit" in capsys.readouterr().err


def test_quantized_cnn_is_a_recipe_error(tiny_overrides):
    with pytest.raises(RecipeError, match="vision.quant=4bit needs vision.family=hf"):
        load_recipe("recipes/easyvqa_qformer_lora.yaml", [*tiny_overrides, "vision.quant=4bit"])
