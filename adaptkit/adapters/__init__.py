"""Trainable cross-modal fusion adapters, chosen by ``adapter.kind`` in a recipe.

``ADAPTERS`` maps each kind to its class, one family per file of this folder; every class implements
:class:`adaptkit.adapters.base.FusionAdapter`. Adding one: ``docs/extending.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.adapters.base import FusionAdapter
from adaptkit.adapters.projector import Projector
from adaptkit.adapters.qformer import QFormer
from adaptkit.adapters.resampler import PerceiverResampler
from adaptkit.adapters.xattn import GatedCrossAttention

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig

ADAPTERS: dict[str, type[FusionAdapter]] = {
    "qformer": QFormer,
    "projector": Projector,
    "resampler": PerceiverResampler,
    "xattn": GatedCrossAttention,
}


def build_adapter(
    cfg: AdapterConfig,
    vision_dim: int,
    lm_dim: int,
    output_std: float | None = None,
    vision_tokens: int | None = None,
) -> FusionAdapter:
    """Build the fusion adapter a recipe names, mapping ``(B, vision_tokens, vision_dim)`` image features
    to what the LM receives (soft tokens or image tokens of width ``lm_dim``). ``output_std`` sets the
    scale of its initial output."""
    if cfg.kind not in ADAPTERS:
        raise ValueError(f"adapter.kind={cfg.kind!r} is not one of {', '.join(ADAPTERS)}")
    return ADAPTERS[cfg.kind](cfg, vision_dim, lm_dim, output_std=output_std, vision_tokens=vision_tokens)
