"""Build the model a recipe describes, and what training sets up on it before the first step.

``build_model``: the frozen vision backbone and LM (optionally 4/8-bit), a fresh fusion adapter from the
registry (``adaptkit.adapters.ADAPTERS``), LoRA through peft. ``prepare_for_training``: the lower-layer
state cache and compiled LM layers. Also the checks training makes that frozen means frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptkit.adapters import ADAPTERS, build_adapter
from adaptkit.backbones.language import load_language_model
from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.data.feature_cache import STORAGE_DTYPES, tensor_digest
from adaptkit.model.multimodal import MultimodalModel

if TYPE_CHECKING:
    from adaptkit.config import Recipe
    from adaptkit.model.lower_states import LowerStateCache

log = logging.getLogger(__name__)


def compile_lm_layers(model: MultimodalModel) -> int:
    """``torch.compile`` each LM decoder layer in place (parameter names unchanged).

    The layers share one compiled graph (same code, parameters as inputs), with dynamic sequence
    lengths, so compilation happens once (docs/benchmarks.md: its cost and gain) and fuses the
    elementwise work around the matmuls: norms, rotary embeddings, activations and LoRA's
    scale-and-add. Returns the number of layers compiled.
    """
    layers = model.base_lm.get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiled %d LM decoder layers with torch.compile (first step compiles)", len(layers))
    return len(layers)


def prepare_for_training(
    model: MultimodalModel, recipe: Recipe, texts: list[tuple[int, ...]] | None = None, lookups: int = 0
) -> LowerStateCache | None:
    """What `adaptkit train` (and the throughput benchmark) set up before the first step: with the soft
    tokens entering at ``adapter.inject_layer`` > 0, the lower-layer state store when ``lower_states``
    keeps (auto: decided from the training ``texts``, one per sample, and the run's ``lookups``,
    :func:`adaptkit.model.lower_states.plan`), and ``torch.compile`` of the LM layers when ``compile`` is
    on. Returns the store, if any."""
    from adaptkit.model.lower_states import plan

    cache = None
    if model.entry_layer:
        setting = recipe.lower_states
        if recipe.lower_state_cache_mb <= 0 and setting != "recompute":
            setting = "recompute"
        if setting == "auto" and texts is None:
            raise ValueError("lower_states=auto needs the training texts to decide")
        hidden = model.base_lm.config.hidden_size
        width = torch.finfo(model.base_lm.get_input_embeddings().weight.dtype).bits // 8
        decided = plan(texts or [], lookups, recipe.lower_state_cache_mb, hidden * width, setting)
        if decided.keep:
            cache = model.fusion.use_lower_states(recipe.lower_state_cache_mb)
        log.info(
            "the image enters LM layer %d; the states of the %d layers below it (text only): %s",
            model.entry_layer,
            model.entry_layer,
            decided.reason,
        )
    if recipe.compile:
        compile_lm_layers(model)
    return cache


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; 4-bit packed parameters count their unpacked elements."""
    total = 0
    for param in module.parameters():
        if trainable_only and not param.requires_grad:
            continue
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2
        total += n
    return total


def frozen_fingerprint(model: nn.Module) -> str:
    """A blake2b digest of every frozen parameter's bytes (to assert nothing frozen changed)."""
    return tensor_digest((n, p) for n, p in model.named_parameters() if not p.requires_grad)


@torch.no_grad()
def _hidden_std(lm: nn.Module, tokenizer, layer: int) -> float:
    """Std of the hidden states entering decoder ``layer`` on a short prompt (the first token, the LM's
    attention sink with outsized activations, left out): the scale soft tokens injected there start at."""
    ids = tokenizer("Question: What color is the shape in the image? Answer: blue", return_tensors="pt")
    ids = ids["input_ids"].to(lm.get_input_embeddings().weight.device)
    hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:].float().std().item()


def attach_text_side(model: MultimodalModel, recipe: Recipe, device) -> None:
    """The frozen text encoder and the image-text heads (``adaptkit.contrastive``) when the recipe names a
    text encoder: the embedding head always, the matching head when ``objectives.itm`` > 0. They are part
    of the model a recipe describes, so a run's ``heads.safetensors`` loads back into them."""
    if recipe.text_encoder.name in ("", "none"):
        return
    from adaptkit.backbones.text import TextEncoder
    from adaptkit.contrastive import EmbeddingHead, MatchingHead
    from adaptkit.objectives import Objectives

    obj = recipe.objectives
    model.text_encoder = TextEncoder(recipe.text_encoder, device)
    lm_dim = model.base_lm.get_input_embeddings().embedding_dim
    weights = {"lm": obj.lm, "classify": obj.classify, "itc": obj.itc, "itm": obj.itm, "triplet": obj.triplet}
    model.objectives = Objectives(weights, {"triplet_margin": obj.triplet_margin})
    text_dim = model.text_encoder.dim
    model.objectives.add_head(
        "embed", EmbeddingHead(lm_dim, text_dim, obj.embed_dim, obj.temperature).to(device)
    )
    if obj.itm > 0:
        model.objectives.add_head("itm", MatchingHead(lm_dim, text_dim).to(device))
    log.info(
        "text encoder %s (frozen%s, D=%d); image-text heads: %s",
        recipe.text_encoder.name,
        f" + LoRA r={recipe.text_encoder.lora_r}" if model.text_encoder.trainable else "",
        text_dim,
        ", ".join(model.objectives.heads),
    )


def build_model(
    recipe: Recipe,
    device: torch.device | str = "cpu",
    lora_dir: str | Path | None = None,
    dequantize_lm: bool = False,
):
    """Build the model a recipe describes: frozen backbones, a fresh adapter, LoRA via peft.

    Args:
        lora_dir: load trained LoRA weights from this peft folder instead of initializing new ones.
        dequantize_lm: load the LM at the recipe's quantization, then dequantize it to float32 (the base
            `adaptkit export` merges a 4/8-bit run's LoRA into).
    """
    vision = build_vision_backbone(recipe.vision, device)
    lm, tokenizer = load_language_model(recipe.language, device)
    if dequantize_lm and recipe.language.quant != "none":
        lm = lm.dequantize().float()
    embeddings = lm.get_input_embeddings()
    inject = ADAPTERS[recipe.adapter.kind].entry_layer(recipe.adapter)
    if inject >= lm.config.num_hidden_layers:
        key = f"adapter.inject_layer={inject}" if recipe.adapter.inject_layer else "adapter.xattn.layers"
        raise ValueError(
            f"{key} is outside this LM's decoder layers (0..{lm.config.num_hidden_layers - 1}): choose "
            "layers inside them"
        )
    output_std = embeddings.weight.float().std().item() if not inject else _hidden_std(lm, tokenizer, inject)
    adapter = build_adapter(
        recipe.adapter, vision.feature_dim, embeddings.embedding_dim, output_std, vision.num_tokens
    ).to(device)
    if lora_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(lora_dir), is_trainable=False)
    elif recipe.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=list(recipe.lora.target_modules),
            task_type="CAUSAL_LM",
            # Layers below the entry layer k never see the image: LoRA there could not help it.
            layers_to_transform=list(range(inject, lm.config.num_hidden_layers)) if inject else None,
            layers_pattern="layers" if inject else None,
        )
        lm = get_peft_model(lm, lora)
    model = MultimodalModel(vision, adapter, lm, tokenizer, entry_layer=inject)
    model.fusion.prompt_mb = recipe.lower_state_cache_mb
    model.feature_dtype = STORAGE_DTYPES[recipe.feature_dtype]
    attach_text_side(model, recipe, device)
    if recipe.activation_checkpointing:
        # Recompute each checkpointed LM layer's activations in the backward pass instead of keeping them:
        # activations, not the frozen weights, dominate a small LM's training memory.
        model.base_lm.activation_checkpointing_enable(every_n_layers=recipe.activation_checkpointing)
    log.info(
        "model: vision %s (frozen, D=%d), adapter %s, LM %s (%s, frozen%s)",
        vision.identity,
        vision.feature_dim,
        recipe.adapter.kind,
        recipe.language.name,
        recipe.language.quant,
        " + LoRA" if recipe.lora.enabled else "",
    )
    return model
