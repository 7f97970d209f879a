"""LoRA inside the text encoder (``text_encoder.lora_r`` > 0) on tiny random backbones: only the LoRA
weights train (the encoder's base stays as loaded), they are saved and load back exactly, an export
merges them into a stock-loadable encoder with the same outputs, a crashed run resumes bit-exact, two
processes match one, and recipes that cannot use it are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.cli import main
from adaptkit.config import RecipeError
from adaptkit.inference import load_for_inference
from adaptkit.model.build import build_model
from adaptkit.recipes import load_recipe
from adaptkit.runs import load_run
from tests.conftest import RETRIEVAL_RECIPE, retrieval_overrides
from tests.test_retrieval import (
    assert_identical_runs,
    crash_and_resume,
    itc_losses,
    train_one_and_two_processes,
)

RECIPE = str(RETRIEVAL_RECIPE)
TEXT_LORA = ["text_encoder.lora_r=4", "text_encoder.lora_alpha=8", "lr_adapter=0.01"]


@pytest.fixture
def common(tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path):
    over = retrieval_overrides(
        tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path
    )
    return [o for o in over if not o.startswith("output_dir=")] + TEXT_LORA


def test_text_lora_trains_saves_loads_and_exports(common, tiny_captions, tiny_text_encoder_dir, tmp_path):
    from transformers import AutoModel

    from adaptkit.export import export_run

    run = tmp_path / "run"
    assert main(["train", RECIPE, *common, "objectives.itm=1", f"output_dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["frozen_unchanged"]
    saved = load_file(str(run / "text_lora.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained
    n = summary["parameters"]  # the LM has no LoRA in this recipe; the heads are the rest
    assert n["text_lora"] == sum(v.numel() for v in saved.values()) and n["lora"] == 0 and n["heads"] > 0
    assert n["adapter"] + n["heads"] + n["text_lora"] == n["trainable"]

    recipe, model = load_run(run)
    stock = AutoModel.from_pretrained(tiny_text_encoder_dir).state_dict()
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in
            model.text_encoder.model.state_dict().items() if "lora_" not in k}  # fmt: skip
    assert set(base) == set(stock) and all(torch.equal(v, stock[k]) for k, v in base.items())
    assert all(torch.equal(v, saved[k]) for k, v in model.text_encoder.lora_state().items())

    texts = ["a red circle", "a blue rectangle", "a green circle"]
    predictor = load_for_inference(run, "cpu")
    trained = predictor.embed_texts(texts)
    torch.testing.assert_close(load_for_inference(run, "cpu").embed_texts(texts), trained, rtol=0, atol=0)
    frozen = build_model(load_recipe(RECIPE, [*common, "text_encoder.lora_r=0"]))
    frozen.objectives.load_state_dict(model.objectives.state_dict())  # same heads, no LoRA
    states, mask = frozen.text_encoder(texts)
    assert not torch.allclose(frozen.objectives.heads["embed"].text_embeds(states, mask), trained, atol=1e-4)

    out = tmp_path / "export"
    manifest = export_run(run, out, verify_samples=4)
    assert manifest["verification"]["passed"] and manifest["text_encoder"]["lora_merged"]["r"] == 4
    merged = AutoModel.from_pretrained(out / "text_encoder")  # a plain transformers encoder, LoRA merged
    ids, mask = model.text_encoder.tokenize(texts)
    torch.testing.assert_close(
        merged(input_ids=ids, attention_mask=mask).last_hidden_state,
        model.text_encoder.encode(ids, mask),
        rtol=0,
        atol=1e-5,
    )
    exported = load_for_inference(out, "cpu")
    assert exported.recipe.text_encoder.lora_r == 0
    torch.testing.assert_close(exported.embed_texts(texts), trained, rtol=0, atol=1e-5)
    image = str(tiny_captions.parent / "images" / "0.png")
    assert [t for t, _ in exported.rank_texts(image, texts)] == [
        t for t, _ in predictor.rank_texts(image, texts)
    ]


def test_text_lora_resume_after_a_crash_is_bit_identical(common, tmp_path):
    ref, crashed = crash_and_resume([*common, "log_samples=true"], tmp_path)
    assert_identical_runs(ref, crashed, ("adapter.safetensors", "heads.safetensors", "text_lora.safetensors"))


def test_text_lora_two_processes_match_one(common, tmp_path):
    one, two = train_one_and_two_processes(common, tmp_path)
    assert itc_losses(one) == pytest.approx(itc_losses(two), abs=1e-5)
    # The text encoder's LoRA gradients are synchronised (check_replicas=1 also compared the replicas every
    # step). Adam turns float rounding of near-zero gradients into steps of up to the learning rate, so the
    # bound is relative: LoRA B starts at zero, so its values are the whole update the 3 steps made.
    a, b = load_file(str(one / "text_lora.safetensors")), load_file(str(two / "text_lora.safetensors"))
    keys = [k for k in a if "lora_B" in k]
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in keys])
    update = torch.cat([a[k].abs().flatten() for k in keys])
    assert update.mean() > 1e-3 and diff.mean() < 0.01 * update.mean(), (diff.mean(), update.mean())


def test_text_lora_recipes_that_cannot_work_are_refused(common):
    with pytest.raises(RecipeError, match="only the image-text objectives read"):
        load_recipe(
            "recipes/easyvqa_caption_lora.yaml",
            ["text_encoder.name=embedded:minilm", "text_encoder.lora_r=4"],
        )
    with pytest.raises(RecipeError, match="text_encoder.lora_r must be >= 0"):
        load_recipe(RECIPE, ["text_encoder.lora_r=-1"])
    bad = load_recipe(RECIPE, [*common, "text_encoder.lora_target_modules=[q_proj]"])
    with pytest.raises(ValueError, match=r"lora_target_modules=\['q_proj'\] do not fit .*named \[.*'query'"):
        build_model(bad)


def test_init_from_carries_the_text_lora(common, tmp_path, monkeypatch):
    from adaptkit.train import init_from
    from adaptkit.train.init_from import init_from_run

    stage1 = tmp_path / "stage1"
    assert main(["train", RECIPE, *common, f"output_dir={stage1}"]) == 0
    model = build_model(load_recipe(RECIPE, [*common, f"init_from={stage1}"]))
    init_from_run(model, str(stage1))
    saved = load_file(str(stage1 / "text_lora.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.text_encoder.lora_state().items())
    plain = build_model(load_recipe(RECIPE, [*common, "text_encoder.lora_r=0"]))
    warned = []
    monkeypatch.setattr(init_from.log, "warning", lambda msg, *args: warned.append(msg % args))
    init_from_run(plain, str(stage1))
    assert len(warned) == 1 and "this recipe does not have" in warned[0]
