"""LLaVA-1.5's MLP projector: every image token through a 2-layer GELU MLP into the LM's width.

The LM then sees one soft token per image token (16 for MobileNetV2 at 128 px), or, with
``adapter.projector.pool_tokens`` n > 0, n tokens: neighbouring image tokens averaged before the MLP (a
square grid is pooled in 2-D to a sqrt(n) x sqrt(n) grid when n is a square, else the token sequence in
1-D). Fewer
tokens make every LM step cheaper; the projector keeps no query or attention of its own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from adaptkit.adapters.base import FusionAdapter

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig


def pool_tokens(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, T, D)`` -> ``(B, n, D)`` by averaging neighbours: in 2-D when T and n are both square, else
    along the sequence."""
    batch, count, dim = tokens.shape
    side, out_side = math.isqrt(count), math.isqrt(n)
    if side * side == count and out_side * out_side == n:
        grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
        return F.adaptive_avg_pool2d(grid, out_side).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), n).transpose(1, 2)


class Projector(FusionAdapter):
    """Maps image features ``(B, T, D_v)`` to ``(B, T or pool_tokens, D_lm)`` soft tokens.

    Args: as :class:`~adaptkit.adapters.base.FusionAdapter`; ``vision_tokens`` (T) is required, sizes from
    ``adapter.projector.*``: ``pool_tokens`` (0: keep all T), ``hidden_size`` (0: D_lm) and ``dropout``.
    """

    def __init__(
        self,
        cfg: AdapterConfig,
        vision_dim: int,
        lm_dim: int,
        output_std: float | None = None,
        vision_tokens: int | None = None,
    ) -> None:
        super().__init__(cfg, vision_dim, lm_dim, output_std, vision_tokens)
        cfg = cfg.projector
        if vision_tokens is None:
            raise ValueError("the projector needs the vision backbone's number of image tokens")
        if cfg.pool_tokens > vision_tokens:
            raise ValueError(
                f"adapter.projector.pool_tokens={cfg.pool_tokens} is more than the {vision_tokens} image "
                "tokens the vision backbone gives; use 0 (all of them) or fewer"
            )
        self.pool = cfg.pool_tokens
        self.num_tokens = cfg.pool_tokens or vision_tokens
        hidden = cfg.hidden_size or lm_dim
        self.mlp = nn.Sequential(
            nn.Linear(vision_dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, lm_dim)
        )
        # Standardized inputs and first-layer weights of std 1/sqrt(D_v) give unit-variance pre-activations,
        # whose GELU has a root mean square of ~0.65; second-layer weights of std s / (0.65 sqrt(hidden))
        # then start the tokens at std s, where the LM expects its inputs.
        nn.init.normal_(self.mlp[0].weight, std=vision_dim**-0.5)
        nn.init.zeros_(self.mlp[0].bias)
        if output_std is not None:
            nn.init.normal_(self.mlp[3].weight, std=output_std / (0.65 * hidden**0.5))
            nn.init.zeros_(self.mlp[3].bias)

    def forward(
        self,
        image_features: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.standardize(image_features)
        if self.pool and self.pool != x.shape[1]:
            x = pool_tokens(x, self.pool)
        return self.mlp(x)
