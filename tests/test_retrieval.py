"""The retrieval task end to end on tiny random backbones: train with ITC + ITM + triplet, save -> load
identical embeddings, predict / eval through the CLI, resume bit-exact after a crash, two processes
(ITC negatives gathered across them) match one, and recipes that cannot work are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.cli import main
from adaptkit.config import RecipeError
from adaptkit.inference import load_for_inference
from adaptkit.model.build import build_model
from adaptkit.model.trainables import saved_heads
from adaptkit.recipes import load_recipe
from adaptkit.runs import load_run
from tests.conftest import (
    RETRIEVAL_RECIPE,
    demo_module,
    launch_two,
    retrieval_overrides,
    train_crashing_at_save,
)

RECIPE = str(RETRIEVAL_RECIPE)


@pytest.fixture
def overrides(tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path):
    return retrieval_overrides(
        tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path
    )


ALL = ["objectives.itc=1", "objectives.itm=1", "objectives.triplet=1", "lr_adapter=0.01"]


def test_train_save_load_predict_and_eval(overrides, tiny_captions, tiny_text_encoder_dir, tmp_path, capsys):
    assert main(["train", RECIPE, *overrides, *ALL]) == 0
    run = tmp_path / "run"
    assert (run / "heads.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    parts = [r for r in rows if "loss" in r]
    assert {"loss_itc", "loss_itm", "loss_triplet"} <= set(parts[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["frozen_unchanged"] and summary["eval"]["n"] == 6 and summary["eval"]["texts"] == 12
    assert 0 <= summary["eval"]["classification_accuracy"] <= 1 and summary["eval"]["classes"] == 6

    # The heads trained (they differ from a fresh model's) and load back exactly; the frozen text encoder
    # is the folder's, unchanged.
    recipe, model = load_run(run)
    torch.manual_seed(recipe.seed)
    fresh = build_model(recipe)
    trained, initial = saved_heads(model), saved_heads(fresh)
    assert set(trained) == set(initial) and any(not torch.equal(trained[k], initial[k]) for k in trained)
    from transformers import AutoModel

    stock = AutoModel.from_pretrained(tiny_text_encoder_dir).state_dict()
    assert all(torch.equal(v, stock[k]) for k, v in model.text_encoder.model.state_dict().items())

    predictor = load_for_inference(run, "cpu")
    again = load_for_inference(run, "cpu")
    image = str(tiny_captions.parent / "images" / "0.png")
    texts = ["a red circle", "a blue rectangle", "a green circle"]
    torch.testing.assert_close(predictor.embed_texts(texts), again.embed_texts(texts), rtol=0, atol=0)
    torch.testing.assert_close(predictor.embed_images([image]), again.embed_images([image]), rtol=0, atol=0)
    ranked = predictor.rank_texts(image, texts)
    assert sorted(t for t, _ in ranked) == sorted(texts)
    assert sum(p for _, p in ranked) == pytest.approx(1, abs=1e-5)  # each rounded to 6 decimals
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    default = predictor.predict(image)  # no texts: the run's class prompts
    assert json.loads((run / "texts.json").read_text())["candidates"][0] == "a blue circle"
    assert default.text in predictor.candidates and len(default.top) == 5
    assert predictor.predict(image, "a red circle | a green circle").top[0][0] in (
        "a red circle",
        "a green circle",
    )

    # The demo: an empty text box ranks the run's classes; lines are candidates.
    respond = demo_module().respond
    text, top = respond(predictor, image, "")
    assert text == default.text and list(top) == [t for t, _ in default.top]
    text, top = respond(predictor, image, "a red circle\na blue circle")
    assert set(top) == {"a red circle", "a blue circle"} and text in top

    capsys.readouterr()
    assert (
        main(["predict", str(run), "--image", image, "--text", "a red circle\na blue circle", "--json"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert {t for t, _ in printed["top"]} == {"a red circle", "a blue circle"}
    assert main(["eval", str(run), "--data", str(tiny_captions), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["i2t_n"] == 6 and metrics["t2i_n"] == 12
    # A direct check of the metric: every image's best text is of its own group exactly when R@1 says so.
    records = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert sum(r["correct"] for r in records) / 6 == pytest.approx(metrics["i2t_r1"])

    # benchmarks/class_prompts.py with the run's own class template reproduces evaluation's classification
    # (images encoded through the predictor, not the feature bank); another wording gets its own figure.
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "class_prompts.py")
    cmd = [sys.executable, script, str(run), "--data", str(tiny_captions), "--json"]
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")}
    out = subprocess.run(
        [*cmd, "--template", "a {label}", "--template", "{label}!"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["images"] == 6 and report["classes"] == 6 and report["trained_template"] == "a {label}"
    assert report["accuracy"]["a {label}"] == pytest.approx(metrics["classification_accuracy"], abs=1e-6)
    assert set(report["accuracy"]) == {"a {label}", "{label}!"}
    bad = subprocess.run([*cmd, "--template", "no label"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "needs '{label}'" in bad.stderr


def crash_and_resume(common: list[str], tmp_path):
    """Train ``common`` uninterrupted (``ref``) and again with a crash during the second checkpoint save,
    then resumed (``crashed``); returns both run directories. ``common`` must set ``log_samples=true``."""
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(["train", RECIPE, *common, f"output_dir={ref}"]) == 0
    train_crashing_at_save([RECIPE, *common, f"output_dir={crashed}"], save=2)
    assert main(["train", RECIPE, *common, f"output_dir={crashed}", "resume=auto"]) == 0
    return ref, crashed


def assert_identical_runs(ref, crashed, files: tuple[str, ...]) -> None:
    """The same sample order and per-micro-batch losses (ITM's draws too) and bit-identical ``files``."""
    a = [json.loads(line) for line in (ref / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (crashed / "samples.jsonl").read_text().splitlines()]
    assert [(r["indices"], r["loss"]) for r in a] == [(r["indices"], r["loss"]) for r in b]
    for name in files:
        x, y = load_file(str(ref / name)), load_file(str(crashed / name))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), name


def test_resume_after_a_crash_is_bit_identical(overrides, tmp_path):
    common = [o for o in overrides if not o.startswith("output_dir=")] + ALL + ["log_samples=true"]
    ref, crashed = crash_and_resume(common, tmp_path)
    assert_identical_runs(ref, crashed, ("adapter.safetensors", "heads.safetensors"))


def train_one_and_two_processes(common: list[str], tmp_path):
    """Train ``common`` for 3 steps in one process (batch 4) and in two gloo processes (batch 2 each, the
    same global batches), every replica compared every step; returns both run directories."""
    common = [o for o in common if not o.startswith(("output_dir=", "batch_size="))]
    common += ["objectives.itm=0", "max_steps=3", "checkpoint_every=0", "log_every=1", "check_replicas=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", RECIPE, *common, "batch_size=4", f"output_dir={one}"]) == 0
    done = launch_two(["train", RECIPE, *common, "batch_size=2", f"output_dir={two}"])
    assert done.returncode == 0, done.stderr[-4000:]
    return one, two


def itc_losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_itc"] for r in rows if "loss_itc" in r]


def test_itc_negatives_are_gathered_so_two_processes_match_one(overrides, tmp_path):
    one, two = train_one_and_two_processes(overrides, tmp_path)
    # Each process's loss is over its own 2 rows against all 4 texts / images; their mean is the 4-row loss.
    # Without the gather each process would see 2 negatives and a different (smaller) loss.
    assert itc_losses(one) == pytest.approx(itc_losses(two), abs=1e-5)
    # The same updates up to float rounding, which Adam turns into steps of up to the learning rate for
    # elements whose gradient is near zero (as in test_distributed): the bound is on the mean.
    for name in ("adapter.safetensors", "heads.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.mean() < 1e-5 and (diff > 1e-4).float().mean() < 0.005, (name, diff.mean(), diff.max())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["objectives.itc=0", "objectives.itm=0", "objectives.lm=1"], "trains an image-text objective"),
        (["objectives.itc=0", "objectives.itm=0"], "not all 0"),
        (["text_encoder.name=none"], "need a text encoder"),
        (["pack_questions=2"], "pack_questions=1"),
        (["data.class_template=a thing"], "must contain '{label}'"),
        (["objectives.temperature=0"], "temperature must be > 0 and < 1"),
    ],
)
def test_recipes_that_cannot_work_are_refused(extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, extra)


def test_vqa_recipes_need_no_text_encoder_but_can_add_the_objectives():
    recipe = load_recipe("recipes/easyvqa_qformer_lora.yaml")
    assert recipe.text_encoder.name == "none" and recipe.objectives.itc == 0
    with pytest.raises(RecipeError, match="need a text encoder"):
        load_recipe("recipes/easyvqa_qformer_lora.yaml", ["objectives.itc=0.5"])


def test_export_carries_heads_and_text_encoder_and_verifies_itself(overrides, tiny_captions, tmp_path):
    from adaptkit.export import export_run

    assert main(["train", RECIPE, *overrides]) == 0
    run, out = tmp_path / "run", tmp_path / "export"
    manifest = export_run(run, out, verify_samples=4)
    assert (out / "heads.safetensors").is_file() and (out / "text_encoder" / "config.json").is_file()
    assert "heads.safetensors" in manifest["files"] and manifest["text_encoder"]["name"].endswith("encoder0")
    ver = manifest["verification"]
    assert ver["passed"] and ver["answers_identical"] == 1.0 and ver["max_abs_logit_diff"] <= 1e-4
    image = str(tiny_captions.parent / "images" / "3.png")
    texts = ["a red circle", "a green rectangle", "a blue circle"]
    assert load_for_inference(out, "cpu").rank_texts(image, texts) == load_for_inference(
        run, "cpu"
    ).rank_texts(image, texts)
    (out / "heads.safetensors").write_bytes(b"changed")
    with pytest.raises(Exception, match="heads.safetensors was changed after the export was written"):
        load_for_inference(out, "cpu")
