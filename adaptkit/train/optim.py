"""The optimizer and learning-rate schedule: AdamW with one group for the adapter (and the objectives'
heads), one for LoRA and one for the text encoder's LoRA (``text_encoder.lora_r`` > 0), linear warmup
then cosine decay, LoRA's schedule starting at ``lora.start_step``."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from adaptkit.config import Recipe

log = logging.getLogger("adaptkit")


def param_groups(model, recipe: Recipe) -> list[dict]:
    """AdamW groups (adapter + objective heads, LoRA, the text encoder's LoRA), checked to hold exactly the
    trainable parameters: a frozen weight that became trainable stops the run."""
    adapter = [p for p in model.adapter.parameters() if p.requires_grad]
    adapter += [p for p in model.objectives.parameters() if p.requires_grad]  # e.g. objectives.classify
    lora = [p for n, p in model.lm.named_parameters() if p.requires_grad]
    bad = [n for n, p in model.lm.named_parameters() if p.requires_grad and "lora_" not in n]
    text = model.text_encoder
    text_lora = [p for p in text.parameters() if p.requires_grad] if text is not None else []
    bad += [n for n, p in (text.named_parameters() if text else ()) if p.requires_grad and "lora_" not in n]
    if bad:
        raise RuntimeError(f"non-LoRA backbone parameters are trainable: {bad[:5]}")
    trainable = {id(p) for _, p in model.trainable_parameters()}
    if {id(p) for p in adapter + lora + text_lora} != trainable:
        raise RuntimeError(
            "optimizer groups do not match the trainable parameters (vision backbone not frozen?)"
        )
    groups = [{"params": adapter, "lr": recipe.lr_adapter, "name": "adapter"}]
    if lora:
        groups.append({"params": lora, "lr": recipe.lr_lora, "name": "lora"})
    if text_lora:  # the text encoder's LoRA learns with the image-text heads it feeds, from step 0
        groups.append({"params": text_lora, "lr": recipe.lr_adapter, "name": "text_lora"})
    return groups


def build_optimizer(groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) where torch has a fused kernel for their device.

    Same arithmetic as the per-parameter loop (``tests/test_train.py``), a fraction of its time on the
    default recipe's ~190 tensors (docs/benchmarks.md, "Fused AdamW").
    """
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except RuntimeError as err:  # parameters on a device without a fused kernel
        log.info("AdamW without the fused kernel (%s)", err)
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, procs: int = 1) -> LambdaLR:
    """Linear warmup then cosine decay to 0, per group; LoRA's starts at ``lora.start_step``. With
    ``lr_decay_steps`` N > 0 the rate holds after warmup and the cosine spans only the last N steps
    (warmup-stable-decay).

    Accelerate steps a prepared scheduler once per process at every optimizer step, so ``t // procs`` is
    the optimizer step and N processes follow exactly the one-process schedule.
    """

    def schedule(start: int):
        warmup, end = recipe.warmup_steps, recipe.max_steps

        def factor(t: int) -> float:
            t //= procs
            if t < start:
                return 0.0
            t -= start
            if t < warmup:
                return (t + 1) / (warmup + 1)
            span = end - start - warmup  # steps after warmup
            decay = min(recipe.lr_decay_steps, span) if recipe.lr_decay_steps > 0 else span
            progress = (t - warmup - (span - decay)) / max(1, decay)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress)))))

        return factor

    starts = {"adapter": 0, "lora": recipe.lora.start_step, "text_lora": 0}
    return LambdaLR(optimizer, [schedule(starts[group["name"]]) for group in optimizer.param_groups])
