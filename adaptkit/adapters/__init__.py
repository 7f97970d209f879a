"""Trainable cross-modal fusion adapters, chosen by ``adapter.kind`` in a recipe."""

from __future__ import annotations

from torch import nn

from adaptkit.adapters.qformer import QFormer
from adaptkit.config import AdapterConfig

ADAPTERS: dict[str, type[nn.Module]] = {"qformer": QFormer}


def build_adapter(
    cfg: AdapterConfig, vision_dim: int, lm_dim: int, output_std: float | None = None
) -> nn.Module:
    """Build the fusion adapter a recipe names, mapping ``(B, T, vision_dim)`` to ``(B, Q, lm_dim)``.

    ``output_std`` (the LM's token-embedding std) sets the scale of the adapter's initial output.
    """
    return ADAPTERS[cfg.kind](cfg, vision_dim, lm_dim, output_std=output_std)
