"""The caption task on tiny random backbones, the caption metrics against known values, and BLIP-2's two
stages: stage 1 (ITC + ITM + ITG) as one retrieval recipe, stage 2 (captioning) starting from it."""

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
from adaptkit.train.init_from import check_init_source, init_from_run
from tests.conftest import RETRIEVAL_RECIPE, demo_module, retrieval_overrides

CAPTION = "recipes/easyvqa_caption_lora.yaml"


@pytest.fixture
def overrides(tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path):
    return retrieval_overrides(
        tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path
    )


def _caption_overrides(overrides: list[str]) -> list[str]:
    keep = [o for o in overrides if not o.startswith(("text_encoder.", "objectives."))]
    return [*keep, "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]", "lora.start_step=0",
            "compile=false", "max_new_tokens=4", "eval_batch_size=4", "data.prompt_template=a"]  # fmt: skip


def test_caption_metrics_known_values():
    from adaptkit.metrics import CaptionScores

    refs = [["a red circle", "a circle that is red"], ["a blue square"]]
    perfect = CaptionScores().compute(predictions=["A red circle.", "a blue square"], references=refs)
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    wrong = CaptionScores().compute(predictions=["a green triangle", "a green triangle"], references=refs)
    assert wrong["cider"] < perfect["cider"] and wrong["bleu4"] < 1e-6 and wrong["n"] == 2
    # BLEU-1 by hand: "a blue circle" against "a blue square": 2 of 3 unigrams match, equal lengths
    one = CaptionScores().compute(predictions=["a blue circle"], references=[["a blue square"]])
    assert one["bleu1"] == pytest.approx(2 / 3, abs=1e-6)


def test_label_mentioned_known_values():
    from adaptkit.metrics import LabelMentioned

    captions = ["A circle that is RED.", "a red square", "a blue circle", ""]
    labels = ["red circle", "red circle", "blue circle", "blue circle"]
    result = LabelMentioned().compute(predictions=captions, references=labels)
    assert result == {"label_mentioned": 0.5, "n": 4}  # word order free, every label word needed


def test_caption_train_eval_predict(overrides, tiny_captions, tmp_path, capsys):
    assert main(["train", CAPTION, *_caption_overrides(overrides)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["n"] == 6 and {"cider", "bleu4", "rouge_l"} <= set(summary["eval"])
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tiny_captions), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(records) == 6 and len(records[0]["references"]) == 2
    from adaptkit.metrics import caption_tokens

    named = [set(r["label"].split()) <= set(caption_tokens(r["caption"]).split()) for r in records]
    assert metrics["label_mentioned"] == pytest.approx(sum(named) / 6)  # the tiny captions are labelled
    predictor = load_for_inference(run, "cpu")
    image = str(tiny_captions.parent / "images" / "0.png")
    caption = predictor.predict(image)
    assert caption.text == records[0]["caption"]  # the same greedy caption as evaluation's
    assert 0 < caption.score <= 1
    demo = demo_module()  # the demo captions with the recipe's prompt when the text box is empty
    assert demo.respond(predictor, image, "")[0] == (caption.text or demo.EMPTY_ANSWER)

    from adaptkit.export import export_run  # LoRA merged; the export verifies its captions and logits

    manifest = export_run(run, tmp_path / "export", verify_samples=4)
    assert manifest["verification"]["passed"] and manifest["verification"]["answers_identical"] == 1.0
    assert load_for_inference(tmp_path / "export", "cpu").predict(image).text == caption.text


def test_blip2_stage_one_then_stage_two(overrides, tmp_path, caplog):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    common = [o for o in overrides if not o.startswith("output_dir=")]
    # Stage 1: ITC + ITM + ITG (the frozen LM generating the caption) in one retrieval recipe.
    assert main(["train", str(RETRIEVAL_RECIPE), *common, "objectives.lm=1", f"output_dir={stage1}"]) == 0
    rows = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_lm", "loss_itc", "loss_itm"} <= set(next(r for r in rows if "loss" in r))

    # Stage 2 starts from stage 1's adapter, its feature statistics included.
    recipe = load_recipe(CAPTION, [*_caption_overrides(overrides), f"init_from={stage1}"])
    model = build_model(recipe)
    init_from_run(model, recipe.init_from)
    saved = load_file(str(stage1 / "adapter.safetensors"))
    assert all(torch.equal(model.adapter.state_dict()[k], v) for k, v in saved.items())
    assert (
        main(
            ["train", CAPTION, *_caption_overrides(overrides), f"init_from={stage1}", f"output_dir={stage2}"]
        )
        == 0
    )
    assert f"init_from {stage1}: adapter loaded" in (stage2 / "train.log").read_text()

    with pytest.raises(ValueError, match="does not fit"):
        bad = load_recipe(CAPTION, [*_caption_overrides(overrides), "adapter.qformer.num_queries=3"])
        init_from_run(build_model(bad), str(stage1))
    # An adapter trained on other image features is refused before anything is built.
    other = load_recipe(CAPTION, [*_caption_overrides(overrides), "vision.feature_layer=-2"])
    with pytest.raises(RecipeError, match=r"vision.feature_layer: -1 there, -2 here"):
        check_init_source(other, stage1)
    with pytest.raises(RecipeError, match="recipe.yaml is missing"):
        check_init_source(other, tmp_path)


def test_caption_recipes_that_cannot_work_are_refused():
    with pytest.raises(RecipeError, match="objectives.lm > 0"):
        load_recipe(CAPTION, ["objectives.lm=0", "objectives.itc=1", "text_encoder.name=embedded:minilm"])
    with pytest.raises(RecipeError, match="pack_questions=1"):
        load_recipe(CAPTION, ["pack_questions=2"])
