"""Attention for packed rows: several questions about one image in one LM sequence (``pack_questions``)."""

from __future__ import annotations

import torch


def packed_attention(
    segment_ids: torch.Tensor, positions: torch.Tensor, n_soft: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention mask ``(B, 1, T, T)`` and position ids ``(B, T)`` for packed rows: ``n_soft``
    soft tokens, then segments (``segment_ids`` > 0, 0 = padding) whose ``positions`` restart at 0.

    Every token sees the soft tokens and the earlier tokens of its own segment, at the positions it
    would have alone after the soft tokens: each question is computed as in a sequence of its own.
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
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None], position_ids
