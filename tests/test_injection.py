"""Soft tokens injected at a middle LM layer (adapter.inject_layer) and the cached lower-layer states."""

from __future__ import annotations

import json

import pytest
import torch

from adaptkit.data.collate import collate_prompts
from adaptkit.data.formats import load_jsonl
from adaptkit.export import export_run
from adaptkit.inference import load_for_inference
from adaptkit.model import build_model
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from tests.conftest import greedy_by_recomputing, injected_model_and_batches, loss_and_grads, loss_of

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def test_lora_sits_only_above_the_injection_layer(tiny_overrides, tiny_vqa):
    model, *_ = injected_model_and_batches(tiny_overrides, tiny_vqa)
    lora = [n for n, _ in model.lm.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)


def test_cached_lower_states_give_the_full_forward_loss_and_gradients(tiny_overrides, tiny_vqa):
    model, plain, packed, feats, _ = injected_model_and_batches(tiny_overrides, tiny_vqa)
    loss_full, grads_full = loss_and_grads(model, feats, plain)
    assert any("lora_" in n for n in grads_full) and any(n.startswith("adapter.") for n in grads_full)
    cache = model.fusion.use_lower_states(max_mb=64)
    loss_cached, grads_cached = loss_and_grads(model, feats, plain)
    lengths = plain["attention_mask"].sum(-1).tolist()
    texts = {tuple(ids[:n]) for ids, n in zip(plain["input_ids"].tolist(), lengths)}
    assert cache.misses == len(texts) and len(cache.store) == len(texts)
    torch.testing.assert_close(loss_cached, loss_full, atol=1e-5, rtol=1e-5)
    assert grads_cached.keys() == grads_full.keys()
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_cached[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # A second pass reads every text from the cache; packed rows look their segments up one by one.
    misses = cache.misses
    loss_packed, grads_packed = loss_and_grads(
        model, feats, packed, segment_ids=packed["segment_ids"], positions=packed["positions"]
    )
    assert cache.misses == misses and cache.hits >= 7
    torch.testing.assert_close(loss_packed, loss_full, atol=1e-5, rtol=1e-5)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_injected_tokens_carry_the_image(tiny_overrides, tiny_vqa):
    """The equality above has teeth: other image features change the loss, on both paths."""
    model, plain, _, feats, _ = injected_model_and_batches(tiny_overrides, tiny_vqa)
    args = (plain["input_ids"], plain["attention_mask"], plain["labels"])
    other = torch.randn_like(feats)
    with torch.no_grad():
        a, b = loss_of(model, feats[plain["image"]], *args), loss_of(model, other[plain["image"]], *args)
        model.fusion.use_lower_states(max_mb=64)
        c = loss_of(model, other[plain["image"]], *args)
    assert abs(a - b) > 1e-4
    torch.testing.assert_close(c, b, atol=1e-5, rtol=1e-5)


def test_generation_matches_the_scoring_forward_and_the_stock_lm_call(tiny_overrides, tiny_vqa):
    model, _, _, feats, items = injected_model_and_batches(tiny_overrides, tiny_vqa)
    model.eval()
    prompts = collate_prompts(items, model.tokenizer.pad_token_id)
    answers, scores = model.generate(
        feats[prompts["image"]], prompts["input_ids"], prompts["attention_mask"], 3
    )
    assert len(answers) == len(items) and all(0.0 <= s <= 1.0 for s in scores)
    # The first generated token's score is the next-token probability of the scoring forward pass, and of
    # transformers' own causal-LM call given the same input (the soft tokens spliced in at layer 1).
    one = collate_prompts(items[:1], model.tokenizer.pad_token_id)
    args = (feats[one["image"]], one["input_ids"], one["attention_mask"])
    with torch.no_grad():
        logits = model.logits(*args)[0][0, -1].log_softmax(-1)
        inp = model.lm_input(*args)
        stock = model.lm(inputs_embeds=inp.embeds, attention_mask=inp.mask, **inp.kwargs()).logits[0, -1]
        alone = model.lm(inputs_embeds=inp.embeds, attention_mask=inp.mask).logits[0, -1]  # placeholders only
        tokens, logp = model.greedy(*args, max_new_tokens=1, stop_at_eos=False)
    torch.testing.assert_close(stock.log_softmax(-1), logits, atol=1e-5, rtol=1e-5)
    assert (alone.log_softmax(-1) - logits).abs().max() > 1e-4  # without the image the LM says otherwise
    assert tokens[0, 0] == logits.argmax() and abs(float(logp[0, 0] - logits.max())) < 1e-5


def test_generation_from_cached_prompt_states_equals_the_full_pass(tiny_overrides, tiny_vqa):
    """Generation looks up each prompt's states and keys/values below the injection layer per text and
    runs only the upper layers on the prompt; tokens and log-probabilities equal the whole model's, and
    recomputing the whole sequence for every token, for left-padded prompts of several lengths, over
    several steps."""
    model, _, _, feats, items = injected_model_and_batches(tiny_overrides, tiny_vqa)
    model.eval()
    prompts = collate_prompts(items, model.tokenizer.pad_token_id)
    lengths = prompts["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # left padding is exercised
    args = (feats[prompts["image"]], prompts["input_ids"], prompts["attention_mask"], 4)
    model.fusion.prompt_mb = 0  # the whole model
    with torch.no_grad():
        want_tokens, want_logp = model.greedy(*args, stop_at_eos=False)
    assert model.fusion.prompt_store() is None
    model.fusion.prompt_mb = 256
    with torch.no_grad():
        got_tokens, got_logp = model.greedy(*args, stop_at_eos=False)
    cache = model.fusion.prompt_store()
    texts = {tuple(ids[-n:]) for ids, n in zip(prompts["input_ids"].tolist(), lengths.tolist())}
    assert cache is not None and cache.misses == len(texts)  # the injected path ran, once per text
    assert got_tokens.shape == (len(items), 4)
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logp, want_logp, atol=1e-5, rtol=1e-5)
    recomputed_tokens, recomputed_logp = greedy_by_recomputing(model, *args[:3], steps=4)
    assert torch.equal(recomputed_tokens, want_tokens)
    torch.testing.assert_close(recomputed_logp, want_logp, atol=1e-5, rtol=1e-5)
    # Again, all from the cache, now stopping at EOS: the answers and scores of `generate` as before.
    hits = cache.hits
    with torch.no_grad():
        answers, scores = model.generate(*args)
    assert cache.misses == len(texts) and cache.hits == hits + len(items)
    want_answers = model.tokenizer.batch_decode(want_tokens, skip_special_tokens=True)
    eos = model.tokenizer.eos_token_id
    for answer, want, row in zip(answers, want_answers, want_tokens.tolist()):
        if eos not in row:
            assert answer == want.strip()
    # Other image features change the answers' probabilities (the soft tokens reach the upper layers).
    with torch.no_grad():
        _, other = model.greedy(torch.randn_like(args[0]), *args[1:], stop_at_eos=False)
    assert (other - got_logp).abs().max() > 1e-4

    # The cache follows the LM: kept while it stays put, recomputed after a change of dtype.
    with torch.no_grad():
        model.greedy(*args, stop_at_eos=False)
        assert model.fusion.prompt_store() is cache
        model.double()
        wide_tokens, wide_logp = model.greedy(args[0].double(), *args[1:], stop_at_eos=False)
    wide = model.fusion.prompt_store()
    assert wide is not cache and wide.lead.dtype == torch.float64
    assert torch.equal(wide_tokens, want_tokens)
    torch.testing.assert_close(wide_logp, want_logp, atol=1e-4, rtol=1e-4)
    # lower_state_cache_mb=0: generation runs the whole model and keeps nothing.
    off, *_ = injected_model_and_batches(tiny_overrides, tiny_vqa, extra=["lower_state_cache_mb=0"])
    off.eval()
    with torch.no_grad():
        off_tokens, off_logp = off.greedy(*args, stop_at_eos=False)
    assert off.fusion.prompt_mb == 0 and off.fusion.prompt_store() is None
    assert torch.equal(off_tokens, want_tokens)
    torch.testing.assert_close(off_logp, want_logp, atol=1e-5, rtol=1e-5)


def test_lower_state_cache_stays_within_its_budget(tiny_overrides, tiny_vqa):
    model, plain, _, feats, _ = injected_model_and_batches(tiny_overrides, tiny_vqa)
    per_token = 64 * 4  # hidden 64, float32
    cache = model.fusion.use_lower_states(max_mb=20 * per_token / 2**20)
    with torch.no_grad():
        loss_of(model, feats[plain["image"]], plain["input_ids"], plain["attention_mask"], plain["labels"])
    assert 0 < cache.bytes <= 20 * per_token and len(cache.store) < 7


def test_injection_layer_outside_the_lm_is_an_error(tiny_overrides):
    recipe = load_recipe(RECIPE, [*tiny_overrides, "adapter.inject_layer=2"])
    with pytest.raises(ValueError, match=r"adapter.inject_layer=2 .*\(0\.\.1\)"):
        build_model(recipe)


def test_training_export_and_prediction_with_injection(tiny_overrides, tiny_vqa, tmp_path):
    recipe = load_recipe(
        RECIPE,
        [*tiny_overrides, "adapter.inject_layer=1", "max_steps=6", "batch_size=8", "eval_every=0"],
    )
    summary = train(recipe)
    assert summary["steps"] == 6 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    run = tmp_path / "run"
    losses = [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] and all(x > 0 for x in losses if x is not None)
    assert "lower-layer states" in (run / "train.log").read_text()
    # The export's self-check (merged LM vs LoRA on the base, both with the injection hook) and the
    # predictor built from the export answer like the trained run.
    manifest = export_run(run, tmp_path / "export")
    assert manifest["verification"]["passed"] and manifest["verification"]["answers_identical"] == 1.0
    sample = load_jsonl(tiny_vqa).samples[0]
    trained, exported = load_for_inference(run), load_for_inference(tmp_path / "export")
    assert trained.model.entry_layer == exported.model.entry_layer == 1
    got, want = exported.answer(sample.image, sample.question), trained.answer(sample.image, sample.question)
    assert got.text == want.text and abs(got.score - want.score) < 1e-4
    assert [a for a, _ in got.top] == [a for a, _ in want.top]
