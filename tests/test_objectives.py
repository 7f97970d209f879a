"""Joint objectives (LM loss + answer classification), also with compiled LM layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adaptkit.config import RecipeError
from adaptkit.data.collate import answer_vocab, collate_train
from adaptkit.model import build_model, compile_lm_layers
from adaptkit.objectives import Objectives
from adaptkit.recipes import load_recipe
from adaptkit.tasks import get_task
from adaptkit.train import param_groups, train
from tests.conftest import AT_INPUT, loss_of

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def _model_and_batch(overrides, tiny_vqa, weights=(1.0, 0.5)):
    lm, classify = weights
    weighted = [f"objectives.lm={lm}", f"objectives.classify={classify}"]
    recipe = load_recipe(RECIPE, [*overrides, "pack_questions=1", *weighted])
    torch.manual_seed(0)
    model = build_model(recipe).train()
    task = get_task(recipe)
    samples = task.load(str(tiny_vqa)).samples
    rows = {path: i for i, path in enumerate(dict.fromkeys(s.image for s in samples))}
    dataset = task.dataset(samples, rows, model.tokenizer)
    line = task.setup_objectives(model, dataset)
    assert "answer classification over 7 answers (24 of 24 samples labelled)" in line
    vocab = answer_vocab([s.answer for s in dataset.samples], 1000)
    batch = collate_train([dataset[i] for i in (0, 1, 2, 3, 5, 6)], model.tokenizer.pad_token_id)
    feats = torch.randn(len(rows), 4, 1280)[batch["image"]]
    return recipe, model, batch, feats, vocab


def test_answer_vocab_is_most_frequent_first_and_capped():
    answers = ["no", "yes", "yes ", "red", "no", "yes", "blue"]
    assert answer_vocab(answers, 10) == ["yes", "no", "blue", "red"]
    assert answer_vocab(answers, 2) == ["yes", "no"]


def test_loss_is_the_weighted_sum_of_lm_and_classification(tiny_overrides, tiny_vqa):
    # At the LM's input, so the soft tokens can be read back from the embedded sequence below.
    _, model, batch, feats, vocab = _model_and_batch([*tiny_overrides, *AT_INPUT], tiny_vqa)
    args = (feats, batch["input_ids"], batch["attention_mask"], batch["labels"])
    total = loss_of(model, *args, answer_class=batch["answer_class"])
    lm_only = loss_of(model, *args)  # no classes given: the LM loss alone
    # The classification loss from scratch: the head on the mean of the soft tokens the LM is given.
    prompt_mask = batch["attention_mask"] * (batch["labels"] == -100)
    inp = model.lm_input(feats, batch["input_ids"], batch["attention_mask"], prompt_mask)
    soft = inp.embeds[:, : inp.n_lead]
    head = model.objectives.heads["classify"]
    logits = head.proj(F.layer_norm(soft.mean(1), (soft.shape[-1],), head.norm.weight, head.norm.bias))
    cls = F.cross_entropy(logits, batch["answer_class"])
    torch.testing.assert_close(total, lm_only + 0.5 * cls)
    assert set(model.loss_parts) == {"lm"}  # the last call had no classes
    loss_of(model, *args, answer_class=batch["answer_class"])
    torch.testing.assert_close(model.loss_parts["classify"], cls.detach())
    assert [vocab[c] for c in batch["answer_class"]][:2] == ["red", "circle"]


def test_classification_alone_trains_the_adapter_and_head_not_lora(tiny_overrides, tiny_vqa):
    recipe, model, batch, feats, _ = _model_and_batch(tiny_overrides, tiny_vqa, weights=(0.0, 1.0))
    loss = loss_of(
        model,
        feats,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        answer_class=batch["answer_class"],
    )
    loss.backward()
    head = model.objectives.heads["classify"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert model.adapter.out_proj.weight.grad.abs().sum() > 0
    # LoRA gets a gradient only from the LM loss (here weighted 0): exactly zero.
    assert all(p.grad is None or not p.grad.any() for n, p in model.lm.named_parameters() if "lora_" in n)
    adapter_group = param_groups(model, recipe)[0]["params"]
    assert {id(p) for p in model.objectives.heads["classify"].parameters()} <= {id(p) for p in adapter_group}


def test_unknown_answers_are_ignored(tiny_overrides, tiny_vqa):
    _, model, batch, feats, _ = _model_and_batch(tiny_overrides, tiny_vqa)
    args = (feats, batch["input_ids"], batch["attention_mask"], batch["labels"])
    classes = batch["answer_class"].clone()
    classes[2:] = -100
    partial = loss_of(model, *args, answer_class=classes)
    alone = loss_of(model, *[a[:2] for a in args], answer_class=batch["answer_class"][:2])
    cls_first_two = model.loss_parts["classify"]
    torch.testing.assert_close(partial - loss_of(model, *args), 0.5 * cls_first_two)
    assert alone.isfinite()
    everything_unknown = loss_of(model, *args, answer_class=torch.full_like(classes, -100))
    torch.testing.assert_close(everything_unknown, loss_of(model, *args))


def test_objective_weights_are_checked(tiny_overrides):
    with pytest.raises(RecipeError, match="objectives"):
        load_recipe(RECIPE, [*tiny_overrides, "objectives.lm=0", "objectives.classify=0"])
    with pytest.raises(RecipeError, match="objectives"):
        load_recipe(RECIPE, [*tiny_overrides, "objectives.classify=-1"])


def test_training_with_both_objectives_and_compiled_layers(tiny_overrides, tmp_path):
    recipe = load_recipe(
        RECIPE,
        [*tiny_overrides, "objectives.classify=0.5", "pack_questions=1", "compile=true"]
        + ["log_every=1", "eval_every=2"],
    )
    summary = train(recipe)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss_lm"] + 0.5 * r["loss_classify"], rel=1e-5)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 4]  # eager generation, compiled layers
    assert summary["eval"]["n"] == 8
    saved = load_file(str(run / "adapter.safetensors"))
    assert saved and not any(k.startswith(("objectives", "norm.", "proj.")) for k in saved)  # training only
    log = (run / "train.log").read_text()
    assert "answer classification over 7 answers" in log and "compiled 2 LM decoder layers" in log


def test_compiled_layers_on_a_4bit_lm_match_eager(tiny_overrides):
    feats = torch.randn(2, 4, 1280)
    ids = torch.tensor([[5, 6, 7, 8, 9], [6, 7, 8, 9, 4]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, -100, -100, 4]])
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(load_recipe(RECIPE, [*tiny_overrides, "language.quant=4bit"])).train()
        if compiled:
            compile_lm_layers(model)
        loss = loss_of(model, feats, ids, torch.ones_like(ids), labels)
        loss.backward()
        losses.append(loss.detach())
        assert model.adapter.out_proj.weight.grad is not None
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


def test_objectives_sum_their_weighted_parts_and_check_names():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 11), torch.tensor([1, 4, 0, 10, 3])
    soft, classes = torch.randn(2, 3, 8), torch.tensor([2, -100])
    lm = F.cross_entropy(logits, targets)
    outputs = {"logits": logits, "targets": targets, "soft": soft, "answer_class": classes}
    only_lm = Objectives()
    assert only_lm.active() == ["lm"]
    assert only_lm(outputs).item() == lm.item()  # the lone LM loss, unscaled
    both = Objectives({"lm": 2.0, "classify": 0.25})
    assert both.active() == ["lm"]  # classify needs its head
    both.add_head("classify", _MeanHead())
    cls = F.cross_entropy(soft.mean(1)[:1, :4], classes[:1])  # the unknown class (-100) takes no part
    torch.testing.assert_close(both(outputs), 2.0 * lm + 0.25 * cls, rtol=0, atol=1e-6)
    assert set(both.parts) == {"lm", "classify"}
    torch.testing.assert_close(both.parts["classify"], cls)
    with pytest.raises(ValueError, match="unknown objectives"):
        Objectives({"lm": 1.0, "contrastive": 1.0})


class _MeanHead(torch.nn.Module):
    """A parameter-free head: the first 4 features of the mean soft token as class logits."""

    def forward(self, soft):
        return soft.mean(1)[:, :4]
