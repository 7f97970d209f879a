"""Data whose texts do not repeat (issue 33): the lower-layer states kept or recomputed by plan, packed rows
bounded in tokens, batches cut into token slices with the whole batch's gradients, and the generator of
instruction-style data the benchmarks use."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from adaptkit.data.collate import VQADataset, collate_packed, pack_runs
from adaptkit.data.formats import load_jsonl
from adaptkit.data.sampling import ImagePackedBatches
from adaptkit.model.lower_states import LowerStateCache, plan
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from adaptkit.train.loop import token_chunks
from tests.conftest import lora_model_and_dataset, loss_of

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "easyvqa_qformer_lora.yaml"


# ---- lower_states: keep or recompute ------------------------------------------------------------------


def test_plan_keeps_repeated_texts_and_recomputes_distinct_ones():
    # easy-VQA's shape: a few hundred texts behind tens of thousands of samples
    repeated = [tuple(range(i % 273, i % 273 + 14)) for i in range(38_575)]
    kept = plan(repeated, 64_000, 1024, 576 * 4)
    assert kept.keep and kept.hit_rate > 0.99 and "auto" in kept.reason
    # instruction data: every text distinct, one epoch of lookups: nothing would ever hit
    distinct = [tuple(range(i, i + 200)) for i in range(4000)]
    one_epoch = plan(distinct, 4000, 1024, 576 * 4)
    assert not one_epoch.keep and one_epoch.hit_rate == 0 and "recomputed" in one_epoch.reason
    # many epochs, but the states (4000 x 200 x 2304 B = 1.76 GB) fit the budget only in part
    many = plan(distinct, 64_000, 1024, 576 * 4)
    assert many.hit_rate == pytest.approx((1024 / 1758) * (60_000 / 64_000), rel=0.01)
    assert plan(distinct, 64_000, 4096, 576 * 4).keep  # with room for all of them: kept
    # forced either way; no budget means nothing can be kept
    assert plan(distinct, 4000, 1024, 2304, "keep").keep
    assert not plan(repeated, 64_000, 1024, 2304, "recompute").keep
    assert not plan(repeated, 64_000, 0, 2304).keep


def test_plan_counts_the_texts_a_short_run_meets():
    texts = [(i % 10,) for i in range(1000)]  # 10 texts, 100 samples each
    decided = plan(texts, 50, 1024, 4)  # 50 lookups meet almost all 10 texts
    assert decided.hit_rate == pytest.approx((50 - 10 * (1 - 0.9**50)) / 50, rel=1e-6)


class _Decoder(torch.nn.Module):
    """Enough of a decoder for the store's bookkeeping: its states are the embeddings + 1."""

    config = None

    def forward(self, inputs_embeds, attention_mask, position_ids, use_cache, **_):
        return type("Out", (), {"last_hidden_state": inputs_embeds + 1})()


def test_a_full_training_store_keeps_its_first_texts(monkeypatch):
    import adaptkit.model.lower_states as lower_states

    monkeypatch.setattr(lower_states, "decoder_slice", lambda *a, **k: _nullcontext())
    monkeypatch.setattr(lower_states, "cache_kwarg", lambda *a, **k: {})
    embedding = torch.nn.Embedding(50, 4)
    lead = torch.zeros(1, 4)
    per_text_mb = 10 * 4 * 4 / 2**20  # 10 tokens x 4 floats
    store = LowerStateCache(_Decoder(), lead, 1, max_mb=2.5 * per_text_mb, evict=False)
    texts = [tuple(range(i, i + 10)) for i in range(4)]
    store.texts(texts, embedding)
    assert list(store.store) == texts[:2]  # the first two fit; the others were computed, not kept
    store.texts(texts, embedding)  # a second epoch: the kept ones hit, the others are computed again
    assert (store.hits, store.misses) == (2, 6)
    lru = LowerStateCache(_Decoder(), lead, 1, max_mb=2.5 * per_text_mb)  # generation's: evicts
    lru.texts(texts, embedding)
    assert list(lru.store) == texts[2:]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- packed rows bounded in tokens ----------------------------------------------------------------------


def test_packed_rows_stop_at_the_token_cap():
    images, lengths = [0, 0, 0, 0, 1, 1], [30, 40, 50, 20, 100, 10]
    assert pack_runs(images, 4) == [[0, 1, 2, 3], [4, 5]]
    assert pack_runs(images, 4, lengths, 100) == [[0, 1], [2, 3], [4], [5]]
    assert pack_runs(images, 4, lengths, 0) == pack_runs(images, 4)
    # the sampler cuts its chunks by the same rule, so collate's rows are the ones it sorted by length
    image_rows = [i // 4 for i in range(64)]
    lengths = [random.Random(i).randint(10, 90) for i in range(64)]
    sampler = ImagePackedBatches(image_rows, 16, 4, seed=0, lengths=lengths, group=2, max_tokens=100)
    for batch in sampler.batches(0):
        rows = pack_runs([image_rows[i] for i in batch], 4, [lengths[i] for i in batch], 100)
        assert all(len(r) == 1 or sum(lengths[batch[k]] for k in r) <= 100 for r in rows)


def test_collate_packed_honours_the_cap(tiny_lm_dir, tiny_vqa):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    samples = load_jsonl(tiny_vqa).samples[:4]  # one image's four questions
    dataset = VQADataset(samples, {samples[0].image: 0}, tokenizer, "{question}")
    items = [dataset[i] for i in range(4)]
    lengths = [len(it["prompt"]) + len(it["target"]) for it in items]
    assert collate_packed(items, 0, pack=4)["input_ids"].shape[0] == 1
    cap = sum(lengths[:2])
    capped = collate_packed(items, 0, pack=4, max_tokens=cap)
    rows = pack_runs([0] * 4, 4, lengths, cap)
    assert rows[0] == [0, 1] and capped["input_ids"].shape[0] == len(rows) > 1
    assert capped["segment_ids"].max() == 2 and capped["input_ids"].shape[1] <= cap


# ---- batches cut into token slices ----------------------------------------------------------------------


def test_token_slices_give_the_whole_batch_loss_and_gradients(tiny_overrides, tiny_vqa):
    recipe = load_recipe(RECIPE, [*tiny_overrides, "lora.start_step=0", "pack_questions=2"])
    model, rows, dataset = lora_model_and_dataset(recipe, tiny_vqa)
    batch = collate_packed([dataset[i] for i in range(12)], model.tokenizer.pad_token_id, pack=2)
    feats = torch.randn(len(rows), 4, 1280)
    n_rows, width = batch["input_ids"].shape
    chunks = token_chunks(batch, 2 * width)
    assert len(chunks) == -(-n_rows // 2) and sum(w for _, _, w in chunks) == pytest.approx(1.0)
    assert token_chunks(batch, 0)[0][1] is batch and token_chunks(batch, n_rows * width)[0][2] == 1.0

    def run(parts):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for _, part, weight in parts:
            keys = ("input_ids", "attention_mask", "labels")
            extra = {k: part[k] for k in ("segment_ids", "positions")}
            loss = loss_of(model, feats[part["image"]], *(part[k] for k in keys), **extra) * weight
            loss.backward()
            total += loss.detach()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole_loss, whole = run(token_chunks(batch, 0))
    sliced_loss, sliced = run(chunks)
    torch.testing.assert_close(sliced_loss, whole_loss, atol=1e-6, rtol=1e-5)
    assert whole.keys() == sliced.keys() and any("lora_" in n for n in whole)
    for name, grad in whole.items():
        torch.testing.assert_close(sliced[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_kept_recomputed_and_sliced_runs_train_alike(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    common += ["max_steps=6", "log_every=1", "eval_every=0", "lora.start_step=2"]
    runs = {
        "auto": [],
        "keep": ["lower_states=keep"],
        "recompute": ["lower_states=recompute"],
        "sliced": ["lower_states=recompute", "max_batch_tokens=20"],
    }
    losses = {}
    for name, extra in runs.items():
        train(load_recipe(RECIPE, [*common, *extra, f"output_dir={tmp_path / name}"]))
        log = (tmp_path / name / "train.log").read_text()
        decided = [line for line in log.splitlines() if "below it (text only)" in line]
        assert len(decided) == 1, log  # the log says what was chosen, and why
        # the tiny set: 24 samples with 9 distinct texts, 24 lookups: most would hit
        expected = {"auto": "kept per text (auto", "keep": "kept per text;", "recompute": "recomputed"}
        assert expected.get(name, "recomputed") in decided[0]
        losses[name] = _losses(tmp_path / name)
    assert len(losses["keep"]) == 6
    for name in ("auto", "recompute", "sliced"):
        got, kept = torch.tensor(losses[name]), torch.tensor(losses["keep"])
        torch.testing.assert_close(got, kept, rtol=1e-4, atol=1e-5)


# ---- the instruction-style data generator -------------------------------------------------------------


def _generator():
    path = ROOT / "benchmarks" / "instruction_data.py"
    spec = importlib.util.spec_from_file_location("instruction_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_instruction_data_has_distinct_texts_within_the_lengths(tiny_vqa):
    gen = _generator()
    samples = load_jsonl(tiny_vqa).samples

    def count(text: str) -> int:
        return round(1.3 * len(text.split()))

    rows = gen.generate(samples, 200, 0, 100, 300, count)
    texts = [r["question"] for r in rows]
    assert len(set(texts)) == 200
    lengths = [count(r["question"] + " " + r["answer"]) + 1 for r in rows]
    assert max(lengths) <= 300 and sum(lengths) / len(lengths) > 150
    assert sum(n < 100 for n in lengths) <= 10  # a context ends when no sentence fits
    by_question = {(s.question, s.answer) for s in samples}
    assert all((r["question"].split(" Question: ")[-1], r["answer"]) in by_question for r in rows)
    assert gen.generate(samples, 200, 0, 100, 300, count) == rows  # seeded
