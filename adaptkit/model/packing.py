"""Attention for packed rows: several questions about one image in one LM sequence (``pack_questions``)."""

from __future__ import annotations

import torch


def sliding_window(config) -> int | None:
    """The LM's sliding-window width where some of its layers attend within one (Gemma 2/3, Mistral, Qwen2
    with ``use_sliding_window``), else None."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and "sliding_attention" not in kinds:
        return None
    return getattr(config, "sliding_window", None) or None


def packed_attention(
    segment_ids: torch.Tensor, positions: torch.Tensor, n_soft: int, dtype: torch.dtype, config=None
) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """Additive attention mask ``(B, 1, T, T)`` and position ids ``(B, T)`` for packed rows: ``n_soft``
    soft tokens, then segments (``segment_ids`` > 0, 0 = padding) whose ``positions`` restart at 0.

    Every token sees the soft tokens and the earlier tokens of its own segment, at the positions it
    would have alone after the soft tokens: each question is computed as in a sequence of its own.

    A 4-D mask reaches every layer as it is, so where the LM's ``config`` has sliding-window layers and a
    row's positions reach past the window, the window is applied here, by position (as the question alone
    would see it): one mask for an LM whose layers all slide, else a mask per kind of layer
    (``{"full_attention": ..., "sliding_attention": ...}``, which transformers' decoders take as given).
    """
    batch, length = segment_ids.shape
    device = segment_ids.device
    seg = torch.cat([segment_ids.new_zeros(batch, n_soft), segment_ids], dim=1)
    soft_pos = torch.arange(n_soft, device=device).expand(batch, -1)
    position_ids = torch.cat([soft_pos, positions + n_soft], dim=1)
    idx = torch.arange(n_soft + length, device=device)
    causal = idx[:, None] >= idx[None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    allowed = causal & ((idx < n_soft)[None, None, :] | same)
    window = sliding_window(config)
    if window is None or int(position_ids.max()) < window:
        return _additive(allowed, dtype), position_ids
    near = (position_ids[:, :, None] - position_ids[:, None, :]) < window
    if getattr(config, "layer_types", None) is None:
        return _additive(allowed & near, dtype), position_ids
    return {
        "full_attention": _additive(allowed, dtype),
        "sliding_attention": _additive(allowed & near, dtype),
    }, position_ids


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
