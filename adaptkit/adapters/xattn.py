"""Flamingo's gated cross-attention: blocks inserted before chosen LM decoder layers read the image.

Before each decoder layer listed in ``adapter.xattn.layers`` a GATED XATTN-DENSE block updates the text's
hidden states: ``h += tanh(a) * attention(LN(h), image)`` then ``h += tanh(b) * FFN(LN(h))``, with the
gates ``a`` and ``b`` initialised to zero, so at step 0 the model computes exactly the frozen LM. The
image tokens the blocks read are the standardized features projected to the LM's width (one per image
token), or, with ``adapter.xattn.resampler``, a perceiver resampler's latents (``adapter.resampler.*``).
No soft token enters the LM's sequence, so every prompt token costs what it costs the LM alone and the
image can be any number of tokens.

This module holds the trainable parts (saved as ``adapter.safetensors``); the hooks that run the blocks
inside the LM are ``adaptkit.model.fusion.CrossAttention``. The LM's own weights are untouched, so its export
is a stock transformers folder and the blocks travel beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptkit.adapters.base import FusionAdapter, heads_problem
from adaptkit.adapters.resampler import Resampler, feed_forward

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig


class GatedCrossAttentionBlock(nn.Module):
    """Text hidden states ``(B, L, D)`` attend to image tokens ``(B, M, D)``; tanh-gated residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn = feed_forward(dim, mlp_ratio, dropout)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """``hidden`` in the LM's dtype, computed in the block's and returned in the LM's."""
        x = hidden.to(self.attn_gate.dtype)
        media = media.to(x.dtype)
        x = x + self.attn_gate.tanh() * self.attn(self.norm(x), media, media, need_weights=False)[0]
        x = x + self.ffn_gate.tanh() * self.ffn(x)
        return x.to(hidden.dtype)


class GatedCrossAttention(FusionAdapter):
    """Image features ``(B, T, D_v)`` -> the image tokens ``(B, M, D_lm)`` the blocks read, and the blocks.

    Args: as :class:`~adaptkit.adapters.base.FusionAdapter`; ``adapter.xattn.*``: ``layers`` (where the
    blocks go), ``num_heads`` (must divide D_lm), ``mlp_ratio``, ``dropout``; with ``resampler`` the
    resampler sized by ``adapter.resampler.*``.
    """

    fusion = "cross_attention"

    @classmethod
    def config_problem(cls, cfg: AdapterConfig) -> str | None:
        layers = list(cfg.xattn.layers)
        if not layers or min(layers) < 0 or sorted(set(layers)) != layers:
            return (
                "adapter.xattn.layers must list the LM decoder layers that get a gated cross-attention "
                f"block, ascending, without repeats (e.g. [20, 22, 24, 26, 28]); got {layers}"
            )
        if cfg.inject_layer:
            return (
                f"adapter.inject_layer={cfg.inject_layer} places soft tokens; with adapter.kind=xattn the "
                "image enters at the blocks of adapter.xattn.layers: set adapter.inject_layer=0"
            )
        if cfg.xattn.resampler:
            return heads_problem("adapter.resampler", cfg.resampler.hidden_size, cfg.resampler.num_heads)
        return None

    @classmethod
    def entry_layer(cls, cfg: AdapterConfig) -> int:
        return min(cfg.xattn.layers)

    def __init__(
        self,
        cfg: AdapterConfig,
        vision_dim: int,
        lm_dim: int,
        output_std: float | None = None,
        vision_tokens: int | None = None,
    ) -> None:
        super().__init__(cfg, vision_dim, lm_dim, output_std, vision_tokens)
        resampler, cfg = cfg.resampler, cfg.xattn
        if lm_dim % cfg.num_heads:
            raise ValueError(
                f"adapter.xattn.num_heads={cfg.num_heads} must divide the LM's hidden size {lm_dim} (the "
                "blocks attend at the LM's width)"
            )
        if cfg.resampler:
            self.media = Resampler(resampler, vision_dim, lm_dim, output_std=None)
        else:
            self.media = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.LayerNorm(lm_dim))
        self.layers = list(cfg.layers)
        self.blocks = nn.ModuleDict(
            {
                str(k): GatedCrossAttentionBlock(lm_dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
                for k in self.layers
            }
        )
        #: image tokens per image the blocks read.
        self.num_media = resampler.num_queries if cfg.resampler else vision_tokens

    def describe(self) -> str:
        layers = ", ".join(map(str, self.layers))
        return f"gated cross-attention before LM layers {layers}, reading {self.num_media} image tokens"

    def forward(
        self,
        image_features: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The image tokens ``(B, M, D_lm)`` every block attends to."""
        return self.media(self.standardize(image_features))
