"""The LM's last decoder layer computed only where the training loss reads a logit.

Training scores the LM at answer positions alone (``MultimodalModel.answer_logits``, through
``DecoderRun.at``). Below the last
decoder layer every position matters (later positions attend to it), but the last layer's output is read
only at those positions; elsewhere it needs just the keys and values its queries attend to. So the last
layer runs its norm and key/value projections on the whole sequence and its query, attention, output
projection and MLP on the answer positions only. In SmolLM2 the key/value projections are 6% of a layer's
weights, and a question has 1-2 answer positions among its ~14 LM token slots (what that saves, measured:
docs/benchmarks.md, ``python benchmarks/last_layer.py``).

The arithmetic per position is the stock layer's (tested against it); it is written for the Llama layout
(pre-norm attention with rotary embeddings and grouped key/value heads, then a pre-norm MLP), which
``supported`` checks for; any other LM, or a last layer with hooks on it (the soft tokens' entry or a
cross-attention block), runs its stock forward on every position.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

#: model types whose decoder layers follow the Llama layout exactly (no sliding window checked below).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "num_key_value_groups")


def supported(config, layer: nn.Module) -> bool:
    """Whether ``last_layer_at`` computes exactly what ``layer`` (the LM's last decoder layer) would."""
    return why_not(config, layer) is None


def why_not(config, layer: nn.Module) -> str | None:
    """Why ``last_layer_at`` would not compute what ``layer`` does (None: it would)."""
    if getattr(config, "model_type", None) not in LLAMA_LAYOUT:
        return f"{getattr(config, 'model_type', None)} layers are not the Llama layout it is written for"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    sliding = getattr(config, "use_sliding_window", False)
    if sliding or (config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "a sliding-window last layer"
    layer_types = getattr(config, "layer_types", None)  # per-layer attention kinds (Qwen2: sliding ones)
    if layer_types and layer_types[-1] != "full_attention":
        return "a sliding-window last layer"
    if layer._forward_pre_hooks or any(_foreign(h) for h in layer._forward_hooks.values()):
        return "the image enters at the last layer"
    attention = getattr(layer, "self_attn", None)
    if not (all(hasattr(layer, p) for p in _PARTS) and all(hasattr(attention, a) for a in _ATTENTION)):
        return "its layer lacks the Llama layout's parts"
    return None


def _foreign(hook) -> bool:
    """Whether a forward hook is someone's other than transformers' output capture (idle unless a caller
    asks the decoder for its hidden states, which training does not)."""
    return getattr(hook, "__module__", "") != "transformers.utils.output_capturing"


def key_mask(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(N, S)`` booleans: which positions the query at ``(rows[i], cols[i])`` may attend to, from the
    decoder's mask: ``(B, S)`` keep-mask of right-padded causal rows, or ``(B, 1, S, S)`` additive mask
    (packed rows, ``adaptkit.model.packing``; of a mask per kind of layer, the full-attention one, which is
    the last layer's where :func:`supported`)."""
    if isinstance(mask, dict):
        mask = mask["full_attention"]
    if mask.dim() == 4:
        return mask[rows, 0, cols] == 0
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions[None, :] <= cols[:, None]) & (mask[rows] > 0)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def last_layer_at(
    layer: nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    allowed: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The output of the Llama-layout decoder ``layer`` at positions ``(rows, cols)`` only: ``(N, D)``.

    Args:
        hidden: ``(B, S, D)`` the states entering the layer at every position.
        allowed: ``(N, S)`` which positions each selected query attends to (:func:`key_mask`).
        position_embeddings: the decoder's rotary ``(cos, sin)``, each ``(B, S, head_dim)``.
    """
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    dim = attention.head_dim
    normed = layer.input_layernorm(hidden)
    keys = attention.k_proj(normed).view(batch, length, -1, dim)  # (B, S, kv heads, dim)
    values = attention.v_proj(normed).view(batch, length, -1, dim)
    cos, sin = position_embeddings
    keys = _rope(keys, cos[:, :, None], sin[:, :, None])
    heads = keys.shape[2]
    queries = attention.q_proj(normed[rows, cols]).view(len(rows), heads, attention.num_key_value_groups, dim)
    queries = _rope(queries, cos[rows, cols][:, None, None], sin[rows, cols][:, None, None])
    scores = torch.einsum("nhgd,nshd->nhgs", queries, keys[rows]) * attention.scaling
    scores = scores.masked_fill(~allowed[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
    mixed = torch.einsum("nhgs,nshd->nhgd", weights, values[rows]).reshape(len(rows), -1)
    out = hidden[rows, cols] + attention.o_proj(mixed)
    return out + layer.mlp(layer.post_attention_layernorm(out))
