"""BLIP-2 style Q-Former: learned queries that read image features through cross-attention.

Each layer is pre-norm: self-attention among the queries, cross-attention from the queries to the
(projected) image tokens, then a feed-forward block. The final queries are projected to the language
model's hidden size and prepended to the prompt embeddings, so the LM sees ``num_queries`` soft
visual tokens whatever the number of image tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptkit.adapters.base import FusionAdapter, heads_problem

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig


class QFormerLayer(nn.Module):
    """Self-attention over queries (and the prompt's tokens, when given), cross-attention to image
    tokens, feed-forward; all pre-norm."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(hidden)
        inner = int(hidden * mlp_ratio)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, inner),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(inner, hidden),
            nn.Dropout(dropout),
        )

    def forward(
        self,
        queries: torch.Tensor,
        image: torch.Tensor,
        text: torch.Tensor | None = None,
        text_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.norm_self(queries)
        if text is None:
            queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        else:
            # InstructBLIP: queries attend to themselves and to the prompt, so what they extract from
            # the image can depend on the question. The prompt tokens are read, not updated.
            memory = torch.cat([x, self.norm_self(text)], dim=1)
            pad = torch.cat([text_pad.new_zeros(x.shape[:2]), text_pad], dim=1)
            queries = queries + self.self_attn(x, memory, memory, key_padding_mask=pad, need_weights=False)[0]
        x = self.norm_cross(queries)
        queries = queries + self.cross_attn(x, image, image, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class QFormer(FusionAdapter):
    """Maps image features ``(B, T, D_v)`` to ``(B, num_queries, D_lm)`` soft tokens for the LM.

    Args: as :class:`~adaptkit.adapters.base.FusionAdapter`; sizes from ``adapter.qformer.*``.
    """

    @classmethod
    def config_problem(cls, cfg: AdapterConfig) -> str | None:
        return heads_problem("adapter.qformer", cfg.qformer.hidden_size, cfg.qformer.num_heads)

    @classmethod
    def reads_prompt(cls, cfg: AdapterConfig) -> str | None:
        return "adapter.qformer.text_conditioned" if cfg.qformer.text_conditioned else None

    def __init__(
        self,
        cfg: AdapterConfig,
        vision_dim: int,
        lm_dim: int,
        output_std: float | None = None,
        vision_tokens: int | None = None,
    ) -> None:
        super().__init__(cfg, vision_dim, lm_dim, output_std, vision_tokens)
        cfg = cfg.qformer
        hidden = cfg.hidden_size
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, hidden) * 0.02)
        self.image_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden))
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.text_proj = (
            nn.Sequential(nn.LayerNorm(lm_dim), nn.Linear(lm_dim, hidden)) if cfg.text_conditioned else None
        )
        self.norm_out = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, lm_dim)
        if output_std is not None:
            # norm_out gives unit-variance inputs, so weight std s yields output std s * sqrt(hidden).
            nn.init.normal_(self.out_proj.weight, std=output_std / hidden**0.5)
            nn.init.zeros_(self.out_proj.bias)
        self.num_queries = self.num_tokens = cfg.num_queries
        self.text_conditioned = cfg.text_conditioned

    def forward(
        self,
        image_features: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Soft tokens for the LM.

        Args:
            image_features: ``(B, T, D_v)`` frozen image features.
            text_embeds: ``(B, L, D_lm)`` the prompt's token embeddings (used when ``text_conditioned``).
            text_mask: ``(B, L)`` 1 for prompt tokens the queries may read; answers and padding are 0.
        """
        image = self.image_proj(self.standardize(image_features))
        queries = self.queries.expand(image.shape[0], -1, -1)
        text = text_pad = None
        if self.text_proj is not None and text_embeds is not None:
            text = self.text_proj(text_embeds.to(image.dtype))
            if text_mask is None:
                text_pad = torch.zeros(text.shape[:2], dtype=torch.bool, device=text.device)
            else:
                text_pad = text_mask == 0
        for layer in self.layers:
            queries = layer(queries, image, text, text_pad)
        return self.out_proj(self.norm_out(queries))
