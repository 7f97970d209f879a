"""Questions about one image packed into one LM sequence (pack_questions)."""

from __future__ import annotations

import json

import pytest
import torch

from adaptkit.config import RecipeError
from adaptkit.data.collate import collate_packed, collate_train, pack_runs
from adaptkit.data.sampling import ImagePackedBatches
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from tests.conftest import lora_model_and_dataset, loss_of

RECIPE = "recipes/easyvqa_qformer_lora.yaml"
PACKED = ["adapter.qformer.text_conditioned=false", "pack_questions=3"]


def test_packed_batches_cover_each_sample_once_in_runs_of_one_image():
    image_rows = [i // 7 for i in range(70)] + [10] * 3  # 11 images, 7 or 3 questions each
    sampler = ImagePackedBatches(image_rows, batch_size=8, pack=3, seed=1)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 73 // 8 and all(len(b) == 8 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == len(seen) == 72  # one incomplete batch dropped
    for batch in batches:
        for run in pack_runs([image_rows[i] for i in batch], 3):
            assert 1 <= len(run) <= 3 and len({image_rows[batch[k]] for k in run}) == 1
    # Images' questions do end up together: far fewer LM rows than questions.
    rows = sum(len(pack_runs([image_rows[i] for i in b], 3)) for b in batches)
    assert rows <= 72 / 2
    assert sampler.batches(0) == batches and sampler.batches(1) != batches


def test_packed_batches_grouped_by_length_pad_less():
    generator = torch.Generator().manual_seed(0)
    image_rows = [i // 5 for i in range(400)]
    lengths = torch.randint(5, 30, (400,), generator=generator).tolist()

    def padding(batches):
        slots = real = 0
        for batch in batches:
            rows = [
                sum(lengths[batch[k]] for k in run) for run in pack_runs([image_rows[i] for i in batch], 3)
            ]
            slots, real = slots + len(rows) * max(rows), real + sum(rows)
        return 1 - real / slots

    plain = ImagePackedBatches(image_rows, 16, 3, seed=0, lengths=lengths, group=1).batches(0)
    grouped = ImagePackedBatches(image_rows, 16, 3, seed=0, lengths=lengths, group=4).batches(0)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert padding(grouped) < 0.8 * padding(plain)


def _packed_and_unpacked(overrides, tiny_vqa):
    recipe = load_recipe(RECIPE, [*overrides, *PACKED, "lora.start_step=0"])
    model, rows, dataset = lora_model_and_dataset(recipe, tiny_vqa)
    # Image 0's four questions, image 1's first two, image 2's first: rows of 3, 1, 2 and 1 questions.
    order = [0, 1, 2, 3, 4, 5, 8]
    items = [dataset[i] for i in order]
    pad = model.tokenizer.pad_token_id
    packed, plain = collate_packed(items, pad, pack=3), collate_train(items, pad)
    feats = torch.randn(len(rows), 4, 1280)
    return model, packed, plain, feats


def test_packed_rows_give_the_unpacked_loss_and_gradients(tiny_overrides, tiny_vqa):
    model, packed, plain, feats = _packed_and_unpacked(tiny_overrides, tiny_vqa)
    assert packed["input_ids"].shape[0] == 4 and plain["input_ids"].shape[0] == 7
    assert packed["segment_ids"].max() == 3 and packed["image"].tolist() == [0, 0, 1, 2]

    def loss_and_grads(batch, **kw):
        model.zero_grad(set_to_none=True)
        args = (feats[batch["image"]], batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = loss_of(model, *args, **kw)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss_plain, grads_plain = loss_and_grads(plain)
    loss_packed, grads_packed = loss_and_grads(
        packed, segment_ids=packed["segment_ids"], positions=packed["positions"]
    )
    torch.testing.assert_close(loss_packed, loss_plain, atol=1e-5, rtol=1e-5)
    assert grads_plain.keys() == grads_packed.keys() and any("lora_" in n for n in grads_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_without_the_segment_mask_questions_would_see_each_other(tiny_overrides, tiny_vqa):
    """The check above has teeth: packed rows run as plain causal rows give another loss."""
    model, packed, plain, feats = _packed_and_unpacked(tiny_overrides, tiny_vqa)
    with torch.no_grad():
        args = (feats[plain["image"]], plain["input_ids"], plain["attention_mask"], plain["labels"])
        loss_plain = loss_of(model, *args)
        args = (feats[packed["image"]], packed["input_ids"], packed["attention_mask"], packed["labels"])
        loss_causal = loss_of(model, *args)
    assert abs(loss_causal - loss_plain) > 1e-3


@pytest.mark.parametrize(
    "extra, needs",
    [
        (
            ["pack_questions=2", "adapter.qformer.text_conditioned=true"],
            "adapter.qformer.text_conditioned=false",
        ),
        ([*PACKED, "objectives.classify=0.5"], "objectives.classify=0"),
    ],
)
def test_packing_rejects_settings_it_cannot_serve(extra, needs):
    with pytest.raises(RecipeError, match=f"pack_questions=.* needs .*{needs}"):
        load_recipe(RECIPE, extra)


def test_training_with_packed_questions(tiny_overrides, tmp_path):
    recipe = load_recipe(RECIPE, [*tiny_overrides, *PACKED, "max_steps=6", "batch_size=8", "eval_every=0"])
    summary = train(recipe)
    assert summary["steps"] == 6 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(x == x and x > 0 for x in losses)  # finite, logged every 2 steps
    assert "LM token slots per question" in (run / "train.log").read_text()


def test_packed_masks_keep_a_sliding_window_by_position():
    """A 4-D mask reaches every layer as given, so the window of sliding layers is applied in the mask: by
    position within each question (not by index in the packed row), per kind of layer where kinds mix."""
    from types import SimpleNamespace

    from adaptkit.model.packing import packed_attention

    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    full, ids = packed_attention(segments, positions, 2, torch.float32)
    assert full.shape == (1, 1, 12, 12) and ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6]]
    mixed = SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=3)
    masks, _ = packed_attention(segments, positions, 2, torch.float32, mixed)
    assert torch.equal(masks["full_attention"], full)
    sees = masks["sliding_attention"][0, 0] == 0
    # The second question's last token (position 6) sees its own positions 4..6, not the soft tokens (0, 1)
    # nor its earlier tokens, nor anything of the first question.
    assert sees[11].nonzero().flatten().tolist() == [9, 10, 11]
    assert sees[7].nonzero().flatten().tolist() == [0, 1, 7]  # position 2: the soft tokens are near
    every, _ = packed_attention(segments, positions, 2, torch.float32, SimpleNamespace(sliding_window=3))
    assert torch.equal(every, masks["sliding_attention"])  # every layer slides (Mistral): one mask
    wide = SimpleNamespace(layer_types=["sliding_attention"], sliding_window=64)
    assert torch.equal(packed_attention(segments, positions, 2, torch.float32, wide)[0], full)
    no_slide = SimpleNamespace(layer_types=["full_attention"], sliding_window=3)
    assert torch.equal(packed_attention(segments, positions, 2, torch.float32, no_slide)[0], full)
