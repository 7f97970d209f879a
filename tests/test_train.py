from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptkit.config import RecipeError
from adaptkit.model import build_model
from adaptkit.model.trainables import load_trainables, save_trainables
from adaptkit.recipes import load_recipe
from adaptkit.train import build_optimizer, build_scheduler, param_groups, train
from tests.conftest import loss_of

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def _lrs(recipe, steps, procs=1):
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(
        [
            {"params": [params[0]], "lr": 1.0, "name": "adapter"},
            {"params": [params[1]], "lr": 1.0, "name": "lora"},
        ]
    )
    scheduler = build_scheduler(optimizer, recipe, procs)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        for _ in range(procs):  # Accelerate steps a prepared scheduler once per process
            scheduler.step()
    return out


def test_fused_adamw_follows_the_plain_one():
    """Training's optimizer is fused AdamW on CPU; it takes the same steps as the per-parameter one
    (two groups, weight decay, a parameter without a gradient in some steps)."""
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(11), torch.randn(3, 3)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(6)]
    runs = []
    for make in (build_optimizer, lambda g, wd: torch.optim.AdamW(g, weight_decay=wd)):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}]
        optimizer = make(groups, 0.1)
        for n, step in enumerate(grads):
            for k, (p, g) in enumerate(zip(params, step)):
                p.grad = None if (k == 2 and n < 2) else g.clone()  # LoRA before lora.start_step
            optimizer.step()
        runs.append((optimizer, params))
    (fused, got), (_, want) = runs
    assert fused.param_groups[0]["fused"] is True
    for a, b, t in zip(got, want, start):
        assert not torch.equal(a, t)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_schedule_is_the_same_for_any_process_count():
    recipe = load_recipe(RECIPE, ["max_steps=50", "warmup_steps=7", "lora.start_step=13"])
    one = _lrs(recipe, 50)
    assert _lrs(recipe, 50, procs=2) == one and _lrs(recipe, 50, procs=3) == one


def test_schedule_warms_up_decays_and_delays_lora():
    recipe = load_recipe(RECIPE, ["max_steps=100", "warmup_steps=10", "lora.start_step=40"])
    lrs = _lrs(recipe, 100)
    adapter, lora = [a for a, _ in lrs], [b for _, b in lrs]
    assert adapter[0] < adapter[5] < adapter[10] and max(adapter) <= 1.0
    assert all(later <= earlier for earlier, later in zip(adapter[10:], adapter[11:]))
    assert adapter[-1] < 0.01
    assert all(lr == 0.0 for lr in lora[:40]) and lora[40] > 0
    assert max(lora) == lora[50] and lora[-1] < lora[60]


def test_lr_decay_steps_hold_the_rate_then_decay_over_the_last_steps():
    recipe = load_recipe(
        RECIPE, ["max_steps=100", "warmup_steps=10", "lora.start_step=40", "lr_decay_steps=30"]
    )
    lrs = _lrs(recipe, 100)
    adapter, lora = [a for a, _ in lrs], [b for _, b in lrs]
    assert adapter[0] < adapter[5] < adapter[10] == 1.0
    assert all(a == 1.0 for a in adapter[10:71]) and all(b == 1.0 for b in lora[50:71])
    assert all(later < earlier for earlier, later in zip(adapter[71:], adapter[72:]))  # cosine, last 30
    assert lora[71:] == adapter[71:] and adapter[-1] < 0.01  # both groups end together
    assert all(lr == 0.0 for lr in lora[:40])
    with pytest.raises(RecipeError, match="lr_decay_steps"):
        load_recipe(RECIPE, ["max_steps=100", "lr_decay_steps=101"])


def test_adapter_only_phase_leaves_lora_untouched(tiny_overrides):
    recipe = load_recipe(RECIPE, tiny_overrides)
    model = build_model(recipe).train()
    for name, param in model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 8, 9]])
    feats = torch.randn(1, 4, 1280)
    with_lora = loss_of(model, feats, ids, torch.ones_like(ids), labels)
    model.lora_active = False
    without = loss_of(model, feats, ids, torch.ones_like(ids), labels)
    without.backward()
    assert not torch.equal(with_lora, without)
    lora_grads = [p.grad for n, p in model.lm.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is None for g in lora_grads)
    assert all(p.grad is not None for p in model.adapter.parameters())
    assert len(param_groups(model, recipe)) == 2


def test_feature_standardization_is_saved_with_the_adapter(tiny_overrides, tmp_path):
    recipe = load_recipe(RECIPE, tiny_overrides)
    model = build_model(recipe)
    feats = torch.randn(2, 4, 1280) * 3 + 5
    before = model.adapter(feats)
    model.adapter.set_feature_stats(torch.full((1280,), 5.0), torch.full((1280,), 3.0))
    after = model.adapter(feats)
    assert not torch.allclose(before, after)
    save_trainables(model, tmp_path)
    fresh = build_model(recipe, lora_dir=tmp_path / "lora")
    load_trainables(fresh, tmp_path)
    torch.testing.assert_close(fresh.adapter(feats), after)


def test_tensorboard_tracker_gets_the_metrics(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(RECIPE, [*tiny_overrides, "report_to=tensorboard", "log_every=1"])
    train(recipe)
    out = Path(recipe.output_dir)
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [e.step for e in acc.Scalars("eval_accuracy")] == [4]
