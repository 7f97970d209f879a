"""Every fast path on a second LM family with different internals: a tiny random Gemma 3 (sliding-window
layers between full ones, each kind with its own rotary embedding, tied embeddings, scaled input embeddings,
its own norms). Each path is exact on it or cleanly off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptkit.data.collate import collate_prompts
from adaptkit.export import export_run
from adaptkit.inference import load_for_inference
from adaptkit.model import last_layer
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from tests.conftest import (
    greedy_by_recomputing,
    injected_model_and_batches,
    loss_and_grads,
    loss_of,
    overrides_for,
    save_tiny_gemma3,
)

RECIPE = "recipes/easyvqa_qformer_lora.yaml"
# Layer 1, where the soft tokens enter, is a full-attention layer after a sliding one: a decoder that ran
# layers 1.. as if they were layers 0.. would give them the wrong mask and rotary embedding.
KINDS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
WINDOW = 4  # shorter than every text, so the sliding layers see less than the full ones


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), KINDS, WINDOW)


@pytest.fixture
def gemma_overrides(tiny_gemma3_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path) -> list[str]:
    return overrides_for(tiny_gemma3_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path)


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_tiny_gemma3_is_what_it_claims(gemma_overrides, tiny_vqa):
    model, plain, *_ = injected_model_and_batches(gemma_overrides, tiny_vqa)
    config = model.base_lm.config
    assert config.model_type == "gemma3_text" and config.layer_types == KINDS
    assert plain["attention_mask"].sum(-1).min() > WINDOW  # every text is longer than the window
    embedding = model.base_lm.get_input_embeddings()
    assert model.base_lm.get_output_embeddings().weight is embedding.weight  # tied
    ids = torch.tensor([[3, 4]])
    assert not torch.equal(embedding(ids), torch.nn.functional.embedding(ids, embedding.weight))  # scaled


def test_lower_states_and_packed_rows_give_the_full_forward_loss_and_gradients(gemma_overrides, tiny_vqa):
    model, plain, packed, feats, _ = injected_model_and_batches(gemma_overrides, tiny_vqa)
    full = loss_and_grads(model, feats, plain)
    assert any("lora_" in n for n in full[1]) and any(n.startswith("adapter.") for n in full[1])
    packed_kw = {"segment_ids": packed["segment_ids"], "positions": packed["positions"]}
    _assert_same(loss_and_grads(model, feats, packed, **packed_kw), full)  # packed, whole LM
    cache = model.fusion.use_lower_states(max_mb=64)
    _assert_same(loss_and_grads(model, feats, plain), full)  # layers 1.. on the kept states of layer 0
    lengths = plain["attention_mask"].sum(-1).tolist()
    texts = {tuple(ids[:n]) for ids, n in zip(plain["input_ids"].tolist(), lengths)}
    assert cache.misses == len(texts) and len(cache.store) == len(texts)
    _assert_same(loss_and_grads(model, feats, packed, **packed_kw), full)
    assert cache.misses == len(texts) and cache.hits >= 7


def test_a_window_blind_packed_mask_would_differ(gemma_overrides, tiny_vqa, monkeypatch):
    """The equality above has teeth: one 4-D mask for every layer lets the sliding layers see past their
    window in packed rows."""
    from adaptkit.model import packing

    model, plain, packed, feats, _ = injected_model_and_batches(gemma_overrides, tiny_vqa)
    packed_kw = {"segment_ids": packed["segment_ids"], "positions": packed["positions"]}
    with torch.no_grad():
        want = loss_of(
            model, feats[plain["image"]], plain["input_ids"], plain["attention_mask"], plain["labels"]
        )
        monkeypatch.setattr(packing, "sliding_window", lambda config: None)
        args = (feats[packed["image"]], packed["input_ids"], packed["attention_mask"], packed["labels"])
        blind = loss_of(model, *args, **packed_kw)
    assert abs(float(blind - want)) > 1e-4


def test_the_answer_only_last_layer_is_off_and_says_so(gemma_overrides, tiny_vqa):
    model, *_ = injected_model_and_batches(gemma_overrides, tiny_vqa)
    decoder = model.base_lm.get_decoder()
    assert not last_layer.supported(model.base_lm.config, decoder.layers[-1])


def test_generation_is_the_recomputed_greedy_and_the_prompt_store_is_off(gemma_overrides, tiny_vqa):
    model, _, _, feats, items = injected_model_and_batches(gemma_overrides, tiny_vqa)
    model.eval()
    prompts = collate_prompts(items, model.tokenizer.pad_token_id)
    args = (feats[prompts["image"]], prompts["input_ids"], prompts["attention_mask"])
    with torch.no_grad():
        tokens, logp = model.greedy(*args, 4, stop_at_eos=False)
    # Gemma's cache keeps sliding layers' keys in windows, which the prompt store does not serve.
    assert model.fusion.prompt_store() is None
    want_tokens, want_logp = greedy_by_recomputing(model, *args, steps=4)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    one = collate_prompts(items[:1], model.tokenizer.pad_token_id)
    one_args = (feats[one["image"]], one["input_ids"], one["attention_mask"])
    with torch.no_grad():
        inp = model.lm_input(*one_args)
        stock = model.lm(inputs_embeds=inp.embeds, attention_mask=inp.mask, **inp.kwargs()).logits[0, -1]
        ours = model.logits(*one_args)[0][0, -1]
    torch.testing.assert_close(ours.log_softmax(-1), stock.log_softmax(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant, layer_type", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_gemma3_trains_a_step(quant, layer_type, gemma_overrides, tiny_vqa):
    extra = [f"language.quant={quant}"]
    model, plain, _, feats, _ = injected_model_and_batches(gemma_overrides, tiny_vqa, extra)
    assert layer_type in {type(m).__name__ for m in model.base_lm.modules()}
    model.fusion.use_lower_states(max_mb=64)
    loss, grads = loss_and_grads(model, feats, plain)
    assert torch.isfinite(loss)
    assert any("lora_B" in n for n in grads) and any(n.startswith("adapter.") for n in grads)


def test_training_and_verified_export_on_gemma3(gemma_overrides, tiny_vqa, tmp_path):
    recipe = load_recipe(RECIPE, [*gemma_overrides, "max_steps=6", "batch_size=8", "eval_every=0"])
    summary = train(recipe)
    assert summary["steps"] == 6 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    assert "lower-layer states" in log
    manifest = export_run(run, tmp_path / "export")
    assert manifest["verification"]["passed"] and manifest["verification"]["answers_identical"] == 1.0
    config = json.loads((tmp_path / "export" / "lm" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["layer_types"] == KINDS
    from adaptkit.data.formats import load_jsonl

    sample = load_jsonl(tiny_vqa).samples[0]
    got = load_for_inference(tmp_path / "export").answer(sample.image, sample.question)
    want = load_for_inference(run).answer(sample.image, sample.question)
    assert got.text == want.text and abs(got.score - want.score) < 1e-4
