"""The checklist every fusion adapter meets (docs/extending.md), run for each kind on the tiny fixtures:
a step changes the trainables and nothing frozen; save -> load gives identical outputs; export -> stock
transformers reload gives the same answers; resume is bit-exact; two processes match one; packed rows
give the unpacked loss. Then what is particular to each: zero gates give the frozen LM exactly (xattn),
generation with a KV cache equals recomputing the whole sequence, token pooling (projector)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.adapters.projector import pool_tokens
from adaptkit.cli import main
from adaptkit.config import RecipeError
from adaptkit.data.collate import VQADataset, collate_packed, collate_prompts, collate_train
from adaptkit.data.formats import load_jsonl
from adaptkit.export import export_run
from adaptkit.inference import load_for_inference
from adaptkit.model import build_model
from adaptkit.model.batch import Batch
from adaptkit.model.build import frozen_fingerprint
from adaptkit.recipes import load_recipe
from adaptkit.runs import load_run
from tests.conftest import greedy_by_recomputing, loss_of, train_crashing_at_save
from tests.test_distributed import _common, _train_two_processes
from tests.test_resume import RECIPE, _assert_same_run, _overrides

# Each kind as the tiny 2-layer LM takes it: the image enters at layer 1 (the shipped recipes' layer 20).
KINDS = {
    "qformer": [],
    "projector": ["adapter.kind=projector", "adapter.projector.hidden_size=0"],
    "projector_pooled": [
        "adapter.kind=projector",
        "adapter.projector.hidden_size=48",
        "adapter.projector.pool_tokens=2",
    ],
    "resampler": ["adapter.kind=resampler"],
    "xattn": ["adapter.kind=xattn", "adapter.inject_layer=0", "adapter.xattn.layers=[1]"],
    "xattn_resampler": [
        "adapter.kind=xattn",
        "adapter.inject_layer=0",
        "adapter.xattn.layers=[0,1]",
        "adapter.xattn.resampler=true",
    ],
}
NEW = [k for k in KINDS if k != "qformer"]  # the Q-Former's checklist lives in the older test files


def _recipe(tiny_overrides, kind, *extra):
    return load_recipe(RECIPE, [*tiny_overrides, *KINDS[kind], *extra])


def _batch(model, recipe, tiny_vqa, order=range(8)):
    samples = load_jsonl(tiny_vqa).samples
    rows = {path: i for i, path in enumerate(dict.fromkeys(s.image for s in samples))}
    dataset = VQADataset(samples, rows, model.tokenizer, recipe.data.prompt_template)
    return [dataset[i] for i in order], len(rows)


def _feats(model, n_images, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_images, model.vision.num_tokens, model.vision.feature_dim, generator=generator)


@pytest.mark.parametrize("kind", NEW)
def test_steps_change_every_trainable_and_nothing_frozen(kind, tiny_overrides, tiny_vqa):
    recipe = _recipe(tiny_overrides, kind, "lora.start_step=0")
    torch.manual_seed(0)
    model = build_model(recipe).train()
    items, n_images = _batch(model, recipe, tiny_vqa)
    batch = collate_train(items, model.tokenizer.pad_token_id)
    feats = _feats(model, n_images)[batch["image"]]
    frozen = frozen_fingerprint(model)
    before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    assert any(n.startswith("adapter.") for n in before) and any("lora_" in n for n in before)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2, weight_decay=0)
    # Two steps: zero-initialised parts (LoRA's B, xattn's gates) first move, then what they multiply.
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(model, feats, batch["input_ids"], batch["attention_mask"], batch["labels"]).backward()
        optimizer.step()
    assert frozen_fingerprint(model) == frozen
    unchanged = [n for n, p in model.trainable_parameters() if torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.parametrize("kind", NEW)
def test_train_save_load_export_and_predict(kind, tiny_overrides, tiny_vqa, tmp_path):
    recipe = _recipe(
        tiny_overrides, kind, "lora.start_step=0", "lr_lora=0.02", "max_steps=12", "eval_every=0"
    )
    from adaptkit.train import train

    summary = train(recipe)
    assert summary["steps"] == 12 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    run = tmp_path / "run"
    saved = load_file(str(run / "adapter.safetensors"))
    _, model = load_run(run)
    assert all(torch.equal(v, model.adapter.state_dict()[k]) for k, v in saved.items())

    # save -> load: identical answer logits from two loads of the run.
    items, n_images = _batch(model, recipe, tiny_vqa)
    batch = collate_train(items, model.tokenizer.pad_token_id)
    feats = _feats(model, n_images)[batch["image"]]
    args = (feats, batch["input_ids"], batch["attention_mask"], batch["labels"])
    _, again = load_run(run)
    with torch.no_grad():
        first, second = model.answer_logits(Batch(*args))[0], again.answer_logits(Batch(*args))[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)

    # export (LoRA merged, LM saved for stock transformers), reloaded: the same answers as the run.
    manifest = export_run(run, tmp_path / "export")
    assert manifest["verification"]["passed"] and manifest["verification"]["answers_identical"] == 1.0
    assert manifest["adapter"]["kind"] == recipe.adapter.kind
    samples = [json.loads(line) for line in tiny_vqa.read_text().splitlines()]
    images = [str(tiny_vqa.parent / s["image"]) for s in samples]
    questions = [s["question"] for s in samples]
    from_run = load_for_inference(run, "cpu").answer_batch(images, questions)
    from_export = load_for_inference(tmp_path / "export", "cpu").answer_batch(images, questions)
    assert [a.text for a in from_run] == [a.text for a in from_export]
    assert [a.score for a in from_run] == pytest.approx([a.score for a in from_export], abs=1e-4)


@pytest.mark.parametrize("kind", ["projector", "resampler", "xattn"])
def test_resume_after_a_crash_is_bit_identical(kind, tiny_overrides, tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(["train", RECIPE, *_overrides(tiny_overrides, ref), *KINDS[kind]]) == 0
    train_crashing_at_save([RECIPE, *_overrides(tiny_overrides, crashed), *KINDS[kind]], save=3)  # step 6
    assert main(["train", RECIPE, *_overrides(tiny_overrides, crashed), *KINDS[kind], "resume=auto"]) == 0
    _assert_same_run(ref, crashed)


@pytest.mark.parametrize("kind", ["projector", "xattn"])
def test_two_processes_match_one(kind, tiny_overrides, tmp_path):
    # Packed questions (the shipped path): one process with batch 4 takes the global batches of two with 2.
    common = [*_common(tiny_overrides), *KINDS[kind]]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", RECIPE, *common, "batch_size=4", f"output_dir={one}"]) == 0
    _train_two_processes(common, two)
    rows = {
        n: [json.loads(line) for line in (n / "samples.jsonl").read_text().splitlines()] for n in (one, two)
    }
    assert [r["indices"] for r in rows[two]] == [r["indices"] for r in rows[one]]
    for name in ("adapter.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.mean() < 1e-5 and diff.max() < 2e-3, name


@pytest.mark.parametrize("kind", NEW)
def test_packed_rows_give_the_unpacked_loss(kind, tiny_overrides, tiny_vqa):
    recipe = _recipe(tiny_overrides, kind, "adapter.qformer.text_conditioned=false", "pack_questions=3")
    torch.manual_seed(0)
    model = build_model(recipe).train()
    items, n_images = _batch(model, recipe, tiny_vqa, order=[0, 1, 2, 3, 4, 5, 8])
    pad = model.tokenizer.pad_token_id
    packed, plain = collate_packed(items, pad, pack=3), collate_train(items, pad)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    _give_gates_and_lora_weights(model)
    feats = _feats(model, n_images)
    with torch.no_grad():
        loss_plain = loss_of(
            model, feats[plain["image"]], plain["input_ids"], plain["attention_mask"], plain["labels"]
        )
        loss_packed = loss_of(
            model,
            feats[packed["image"]],
            packed["input_ids"],
            packed["attention_mask"],
            packed["labels"],
            segment_ids=packed["segment_ids"],
            positions=packed["positions"],
        )
    torch.testing.assert_close(loss_packed, loss_plain, atol=1e-5, rtol=1e-5)


def _give_gates_and_lora_weights(model) -> None:
    """Zero-initialised parts get values, so a test covers what they add."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("_gate"):
                p.normal_(std=0.5 if name.endswith("_gate") else 0.05)


@pytest.mark.parametrize("kind", ["xattn", "xattn_resampler"])
def test_zero_gates_compute_the_frozen_lm(kind, tiny_overrides, tiny_vqa):
    recipe = _recipe(tiny_overrides, kind)
    model = build_model(recipe).eval()
    items, n_images = _batch(model, recipe, tiny_vqa)
    batch = collate_train(items, model.tokenizer.pad_token_id)
    feats = _feats(model, n_images)[batch["image"]]
    inp = model.lm_input(feats, batch["input_ids"], batch["attention_mask"])
    # The image is carried to the blocks, and no soft token enters the sequence (a sink leads it at k > 0).
    assert inp.image is not None and inp.n_lead == (1 if model.entry_layer else 0)
    positions = (inp.mask.cumsum(-1) - 1).clamp(min=0)
    stock = {"inputs_embeds": inp.embeds, "attention_mask": inp.mask, "position_ids": positions}
    with torch.no_grad():
        fused = model.logits(feats, batch["input_ids"], batch["attention_mask"])[0]
        alone = model.lm(**stock).logits  # the LM alone: no image given, no block runs
        through_stock = model.lm(**stock, **inp.kwargs()).logits  # transformers' call carries it too
    torch.testing.assert_close(fused, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(through_stock, fused, rtol=0, atol=0)
    # ... and with open gates the image changes the logits (the blocks are wired in).
    _give_gates_and_lora_weights(model)
    with torch.no_grad():
        opened = model.logits(feats, batch["input_ids"], batch["attention_mask"])[0]
    assert (opened - alone).abs().max() > 1e-3


def test_image_tokens_for_other_rows_are_refused(tiny_overrides, tiny_vqa):
    recipe = _recipe(tiny_overrides, "xattn", "adapter.xattn.layers=[0,1]")
    model = build_model(recipe).eval()
    items, n_images = _batch(model, recipe, tiny_vqa)
    batch = collate_train(items, model.tokenizer.pad_token_id)
    inp = model.lm_input(_feats(model, n_images)[batch["image"]], batch["input_ids"], batch["attention_mask"])
    with pytest.raises(RuntimeError, match="image tokens for 8"):
        model.lm(input_ids=batch["input_ids"][:3], **inp.kwargs())


@pytest.mark.parametrize("kind", NEW)
def test_generation_with_kv_cache_equals_recomputing(kind, tiny_overrides, tiny_vqa):
    recipe = _recipe(tiny_overrides, kind)
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    _give_gates_and_lora_weights(model)
    items, n_images = _batch(model, recipe, tiny_vqa)
    prompts = collate_prompts(items, model.tokenizer.pad_token_id)
    feats = _feats(model, n_images)[prompts["image"]]
    args = (feats, prompts["input_ids"], prompts["attention_mask"])
    expected, _ = greedy_by_recomputing(model, *args, steps=3)
    with torch.no_grad():
        cached, _ = model.greedy(*args, max_new_tokens=3, stop_at_eos=False)  # stored prompt states
        model.fusion.prompt_mb = 0
        full, _ = model.greedy(*args, max_new_tokens=3, stop_at_eos=False)  # the whole model
    assert torch.equal(full, expected) and torch.equal(cached, expected)


def test_pooling_averages_neighbouring_tokens():
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, row-major
    assert pool_tokens(grid, 4).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 blocks
    assert pool_tokens(grid, 2).flatten().tolist() == [3.5, 11.5]  # not square: runs of 8 along the sequence


@pytest.mark.parametrize(
    "extra, message",
    [
        (["adapter.kind=xattn"], "adapter.xattn.layers must list"),
        (["adapter.kind=xattn", "adapter.xattn.layers=[3,1]"], "ascending"),
        (
            ["adapter.kind=xattn", "adapter.xattn.layers=[20]", "adapter.inject_layer=4"],
            "set adapter.inject_layer=0",
        ),
        (["adapter.kind=projector", "adapter.projector.pool_tokens=-1"], "pool_tokens must be >= 0"),
        (["adapter.kind=mlp"], "adapter.kind='mlp' is not one of qformer, projector, resampler, xattn"),
    ],
)
def test_bad_adapter_settings_are_named(extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, extra)


def test_entry_layers_outside_the_lm_are_errors(tiny_overrides):
    with pytest.raises(
        ValueError, match=r"adapter.xattn.layers is outside this LM's decoder layers \(0\.\.1\)"
    ):
        build_model(_recipe(tiny_overrides, "xattn", "adapter.xattn.layers=[5]"))
    with pytest.raises(ValueError, match="more than the 4 image tokens"):
        build_model(_recipe(tiny_overrides, "projector", "adapter.projector.pool_tokens=9"))


def test_projector_and_resampler_soft_token_counts(tiny_overrides):
    assert build_model(_recipe(tiny_overrides, "projector")).adapter.num_tokens == 4  # 2x2 grid at 64 px
    assert build_model(_recipe(tiny_overrides, "projector_pooled")).adapter.num_tokens == 2
    assert build_model(_recipe(tiny_overrides, "resampler")).adapter.num_tokens == 4  # num_queries
    model = build_model(_recipe(tiny_overrides, "xattn"))
    assert model.adapter.num_tokens == 0 and model.entry_layer == 1 and model.adapter.num_media == 4


@pytest.mark.parametrize("kind", ["qformer", "xattn"])
def test_compiled_lm_layers_give_the_same_loss_and_gradients(kind, tiny_overrides):
    """The shipped recipes compile the LM layers; xattn's block hooks then run inside the compiled graphs."""
    from adaptkit.model import compile_lm_layers

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(_recipe(tiny_overrides, kind)).train()
        _give_gates_and_lora_weights(model)
        if compiled:
            names = [n for n, _ in model.named_parameters()]
            assert compile_lm_layers(model) == 2
            assert [n for n, _ in model.named_parameters()] == names  # checkpoints and peft see no change
        feats = _feats(model, 3)
        ids = torch.tensor([[5, 6, 7, 8, 9], [6, 7, 8, 9, 4], [5, 5, 6, 7, 8]])
        labels = torch.tensor(
            [[-100, -100, -100, 8, 9], [-100, -100, -100, -100, 4], [-100, -100, -100, 7, 8]]
        )
        out = []
        for width in (5, 4):  # two sequence lengths: one dynamic-shape graph
            loss = loss_of(model, feats, ids[:, :width], torch.ones_like(ids[:, :width]), labels[:, :width])
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
            model.zero_grad()
        results.append(out)
    for (loss0, grads0), (loss1, grads1) in zip(*results):
        torch.testing.assert_close(loss0, loss1, rtol=1e-5, atol=1e-6)
        assert kind != "xattn" or any(n.endswith("attn_gate") for n in grads0)
        for name in grads0:
            torch.testing.assert_close(grads0[name], grads1[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_xattn_trains_on_a_quantized_lm(quant, tiny_overrides, tiny_vqa, tmp_path):
    recipe = _recipe(tiny_overrides, "xattn", f"language.quant={quant}", "lora.start_step=0", "eval_every=0")
    from adaptkit.train import train

    summary = train(recipe)
    assert summary["steps"] == 4 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    gates = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert all(float(v.abs().max()) > 0 for k, v in gates.items() if k.endswith("_gate"))  # the gates opened
    predictor = load_for_inference(tmp_path / "run", "cpu")
    image = str(tiny_vqa.parent / "images" / "0.png")
    assert isinstance(predictor.predict(image, "what is the shape?").text, str)
