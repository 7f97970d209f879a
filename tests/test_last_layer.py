"""Training's last LM layer at answer positions only (adaptkit/model/last_layer.py): the same states,
loss and gradients as the stock layer on every position."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adaptkit.model import last_layer
from tests.conftest import injected_model_and_batches, loss_and_grads


def _config(kind: str):
    sizes = dict(
        vocab_size=40,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**sizes)  # q/k/v projections with biases
    if kind == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**sizes, sliding_window=None)
    return LlamaConfig(**sizes)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_last_layer_at_equals_the_stock_layer(kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind)).eval()
    decoder = model.get_decoder()
    assert last_layer.supported(model.config, decoder.layers[-1])
    ids = torch.randint(0, 40, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as training batches are
    mask[2, 4:] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = decoder(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
        rows, cols = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([3, 10, 0, 6, 3])
        rotary = decoder.rotary_emb(out.hidden_states[-2], position_ids=position_ids)
        allowed = last_layer.key_mask(mask, rows, cols)
        got = decoder.norm(
            last_layer.last_layer_at(decoder.layers[-1], out.hidden_states[-2], rows, cols, allowed, rotary)
        )
    torch.testing.assert_close(got, out.last_hidden_state[rows, cols], atol=1e-5, rtol=1e-5)


def test_unsupported_layouts_and_hooked_layers_are_left_to_the_stock_forward():
    model = LlamaForCausalLM(_config("llama"))
    layer = model.get_decoder().layers[-1]
    assert last_layer.supported(model.config, layer)
    handle = layer.register_forward_pre_hook(lambda module, args: None)
    assert not last_layer.supported(model.config, layer)  # e.g. an injection or cross-attention block
    handle.remove()
    handle = layer.register_forward_hook(lambda module, args, output: None)
    assert not last_layer.supported(model.config, layer)
    handle.remove()
    model.config.attention_dropout = 0.1
    assert not last_layer.supported(model.config, layer)
    from transformers import MistralConfig

    windowed = MistralConfig(**{**_config("mistral").to_dict(), "sliding_window": 8})
    assert not last_layer.supported(windowed, layer)
    qwen = _config("qwen2")
    assert last_layer.supported(qwen, layer)
    qwen.layer_types = ["full_attention", "full_attention", "sliding_attention"]
    assert not last_layer.supported(qwen, layer)


@pytest.fixture(scope="module")
def three_layer_lm(tiny_lm_dir, tmp_path_factory):
    """The tiny fixture LM with a third layer, so soft tokens can enter below a hook-free last layer."""
    config = LlamaConfig.from_pretrained(tiny_lm_dir)
    config.num_hidden_layers = 3
    out = tmp_path_factory.mktemp("three_layer_lm")
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("inject", [0, 1])
def test_training_loss_and_gradients_equal_the_full_last_layer(
    tiny_overrides, tiny_vqa, three_layer_lm, inject, monkeypatch
):
    extra = [f"language.name={three_layer_lm}", f"adapter.inject_layer={inject}"]
    extra.append("lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")  # the last layer's k/v LoRA too
    model, plain, packed, feats, _ = injected_model_and_batches(tiny_overrides, tiny_vqa, extra)
    if inject:
        model.fusion.use_lower_states(max_mb=64)
    packing = dict(segment_ids=packed["segment_ids"], positions=packed["positions"])
    calls = []
    spy = last_layer.last_layer_at
    monkeypatch.setattr(last_layer, "last_layer_at", lambda *a: calls.append(1) or spy(*a))

    model.fusion.run.answer_only_last_layer = False
    want = loss_and_grads(model, feats, plain)
    assert not calls
    model.fusion.run.answer_only_last_layer = True
    for batch, kw in ((plain, {}), (packed, packing)):
        loss, grads = loss_and_grads(model, feats, batch, **kw)
        torch.testing.assert_close(loss, want[0], atol=1e-5, rtol=1e-5)
        assert grads.keys() == want[1].keys()
        assert any(".layers.2." in n and "lora_" in n for n in grads)  # the last layer's LoRA learns
        for name, grad in want[1].items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert len(calls) == 2
