"""Runs a gated cross-attention adapter's blocks inside the LM (``adapter.kind: xattn``).

A forward pre-hook on each decoder layer of ``adapter.xattn_layers`` passes the hidden states entering
it through that layer's block (``adaptkit.adapters.xattn``), reading the image tokens of the current
batch. The LM's modules and parameter names stay as transformers made them (peft's LoRA, 4/8-bit
layers, ``torch.compile`` and export see a stock LM); the blocks are the adapter's.

The image tokens are set by every forward pass of the model (:meth:`CrossAttentionWiring.set`) and kept
until the next one, so the LM calls that follow it read them: generation's one-token steps (the prompt's
keys and values were computed with the image, and every new token attends to the image again), and the
backward pass's recomputation under activation checkpointing. A forward of another batch size without
setting them is refused, naming both sizes.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class CrossAttentionWiring:
    """The hooks that run ``blocks`` (``{str(layer): block}``) before decoder ``layers[layer]``."""

    def __init__(self, layers: nn.ModuleList, blocks: nn.ModuleDict) -> None:
        bad = [int(k) for k in blocks if not 0 <= int(k) < len(layers)]
        if bad:
            raise ValueError(
                f"adapter.xattn_layers {bad} are outside this LM's decoder layers (0..{len(layers) - 1})"
            )
        self.media: torch.Tensor | None = None
        self.handles = [
            layers[int(k)].register_forward_pre_hook(partial(self._hook, block), with_kwargs=True)
            for k, block in blocks.items()
        ]

    def set(self, media: torch.Tensor | None) -> None:
        """The image tokens ``(B, M, D)`` the blocks read from now on (None: the LM runs alone)."""
        self.media = media

    def remove(self) -> None:
        """Take the hooks off the LM's layers (the LM then computes as it did before)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.media = None

    def _hook(self, block: nn.Module, module, args, kwargs):
        if self.media is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] != self.media.shape[0]:
            raise RuntimeError(
                f"the LM runs a batch of {hidden.shape[0]} rows but the cross-attention blocks hold image "
                f"tokens for {self.media.shape[0]}: run it through the MultimodalModel (which sets them), "
                "or clear them with model.cross_attention.set(None) to run the LM alone"
            )
        hidden = block(hidden, self.media)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
