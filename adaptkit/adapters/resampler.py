"""Flamingo's perceiver resampler: learned latents that read the image tokens through attention.

Each layer is pre-norm: the latents attend to the image tokens and to themselves together (keys and
values are the concatenation, as in Flamingo), then a feed-forward block. The final latents are projected
to the LM's width: ``num_queries`` soft tokens whatever the number of image tokens. Unlike the Q-Former
it never reads the prompt; it is also the front of the gated cross-attention adapter
(``adapter.xattn.resampler``), whose blocks then read its latents instead of every image token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptkit.adapters.base import FusionAdapter, heads_problem

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig, ResamplerConfig


def feed_forward(hidden: int, mlp_ratio: float, dropout: float) -> nn.Sequential:
    """Pre-norm transformer feed-forward block: LayerNorm, Linear, GELU, Linear."""
    inner = int(hidden * mlp_ratio)
    return nn.Sequential(
        nn.LayerNorm(hidden),
        nn.Linear(hidden, inner),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(inner, hidden),
        nn.Dropout(dropout),
    )


class ResamplerLayer(nn.Module):
    """Latents attend to [image tokens; latents], then a feed-forward block; pre-norm."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(hidden)
        self.norm_latents = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn = feed_forward(hidden, mlp_ratio, dropout)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ffn(latents)


class Resampler(nn.Module):
    """The resampler's trunk, ``(B, T, D_v)`` standardized features -> ``(B, num_queries, out_dim)``, sized by
    ``adapter.resampler.*``."""

    def __init__(self, cfg: ResamplerConfig, vision_dim: int, out_dim: int, output_std: float | None) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, hidden) * 0.02)
        self.media_proj = nn.Linear(vision_dim, hidden)
        self.layers = nn.ModuleList(
            ResamplerLayer(hidden, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, out_dim)
        if output_std is not None:
            nn.init.normal_(self.out_proj.weight, std=output_std / hidden**0.5)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.media_proj(features)
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.out_proj(self.norm_out(latents))


class PerceiverResampler(FusionAdapter):
    """Maps image features ``(B, T, D_v)`` to ``(B, num_queries, D_lm)`` soft tokens.

    Args: as :class:`~adaptkit.adapters.base.FusionAdapter`; sizes from ``adapter.resampler.*``.
    """

    @classmethod
    def config_problem(cls, cfg: AdapterConfig) -> str | None:
        return heads_problem("adapter.resampler", cfg.resampler.hidden_size, cfg.resampler.num_heads)

    def __init__(
        self,
        cfg: AdapterConfig,
        vision_dim: int,
        lm_dim: int,
        output_std: float | None = None,
        vision_tokens: int | None = None,
    ) -> None:
        super().__init__(cfg, vision_dim, lm_dim, output_std, vision_tokens)
        self.resampler = Resampler(cfg.resampler, vision_dim, lm_dim, output_std)
        self.num_tokens = cfg.resampler.num_queries

    def forward(
        self,
        image_features: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.resampler(self.standardize(image_features))
