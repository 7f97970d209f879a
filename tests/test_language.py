from __future__ import annotations

import pytest
import torch

from adaptkit.backbones.language import load_language_model
from adaptkit.config import LanguageConfig
from adaptkit.model import build_model, count_parameters, frozen_fingerprint
from adaptkit.recipes import load_recipe
from adaptkit.train import param_groups
from tests.conftest import loss_of


def test_fp32_load_is_frozen(tiny_lm_dir):
    model, tokenizer = load_language_model(LanguageConfig(name=str(tiny_lm_dir)))
    assert tokenizer.pad_token is not None
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("quant, layer_type", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_lm_trains_a_step_on_cpu(quant, layer_type, tiny_overrides):
    recipe = load_recipe("recipes/easyvqa_qformer_lora.yaml", [*tiny_overrides, f"language.quant={quant}"])
    model = build_model(recipe)
    base = model.base_lm
    kinds = {type(m).__name__ for m in base.modules()}
    assert layer_type in kinds, kinds
    # 4-bit packs two weights per byte; the count must still report the unpacked size.
    fp32 = build_model(load_recipe("recipes/easyvqa_qformer_lora.yaml", tiny_overrides))
    assert count_parameters(model) == count_parameters(fp32)

    frozen = frozen_fingerprint(model)
    trainable = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    assert any("lora_" in n for n in trainable) and any(n.startswith("adapter.") for n in trainable)
    optimizer = torch.optim.AdamW(param_groups(model, recipe), lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8], [6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 8, 9], [-100, -100, -100, 4]])
    with torch.no_grad():  # an evaluation first, as during training (bitsandbytes may repack weights here)
        loss_of(model.eval(), torch.randn(2, 4, 1280), ids, torch.ones_like(ids), labels)
    model.train()
    loss = loss_of(model, torch.randn(2, 4, 1280), ids, torch.ones_like(ids), labels)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert frozen_fingerprint(model) == frozen
    changed = [n for n, p in model.trainable_parameters() if not torch.equal(p, trainable[n])]
    # Every LoRA layer got a gradient (through the frozen quantized layers above it), and the adapter did.
    assert all(n in changed for n in trainable if "lora_B" in n) and any(
        n.startswith("adapter.") for n in changed
    )


def test_optimizer_groups_reject_unfrozen_backbone(tiny_overrides):
    recipe = load_recipe("recipes/easyvqa_qformer_lora.yaml", tiny_overrides)
    model = build_model(recipe)
    next(model.vision.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match="do not match the trainable parameters"):
        param_groups(model, recipe)
