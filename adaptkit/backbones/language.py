"""The frozen causal language model: any Hugging Face causal LM, optionally 8-bit or 4-bit NF4.

``language.name`` is a hub id, a local folder, a GGUF file, or ``embedded:smollm2`` /
``embedded:gemma3-270m`` (packaged GGUFs); GGUFs are converted once to safetensors (``adaptkit.gguf``).
Quantization goes through bitsandbytes' ``BitsAndBytesConfig``, which runs on CPU as well as CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from adaptkit.config import LanguageConfig, VisionConfig


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_lm_path(name: str) -> str:
    """Turn ``embedded:NAME`` and GGUF files into their converted folders (``adaptkit.gguf``); hub ids and
    folders pass through."""
    from adaptkit import gguf

    if name.startswith("embedded:"):
        which = name.split(":", 1)[1]
        if which not in gguf.EMBEDDED_LMS:
            known = ", ".join(f"embedded:{k}" for k in gguf.EMBEDDED_LMS)
            raise ValueError(f"language.name: unknown embedded LM '{which}' (known: {known})")
        return str(gguf.EMBEDDED_LMS[which]())
    if gguf.is_gguf(name):
        return str(gguf.converted(name))
    return name


def quantization_config(cfg: LanguageConfig | VisionConfig):
    """The ``BitsAndBytesConfig`` for a backbone's ``quant`` (None for full precision)."""
    if cfg.quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
    )


def load_language_model(cfg: LanguageConfig, device: torch.device | str = "cpu"):
    """Load the causal LM and its tokenizer, frozen and in eval mode.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (the EOS token when it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(cfg.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"dtype": DTYPES[cfg.dtype]}
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    if cfg.quant == "4bit":
        keep_4bit_differentiable(model)
    freeze(model)
    return model, tokenizer


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for inference on CPU; returns the layers changed.

    On a CPU with AVX512-BF16, a ``Linear4bit`` in eval mode that sees an input without gradient repacks its
    weight, once and for good, into a layout whose matmul has no autograd. Any later training step then
    gets no gradient through that layer: nothing reaches LoRA below it or the soft tokens, silently. An
    evaluation during training (or ``adapter.inject_layer``'s start-up forward pass) would trigger it, so
    the frozen LM keeps the differentiable layout, at the cost of that faster CPU inference kernel.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter and switch to eval mode."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
