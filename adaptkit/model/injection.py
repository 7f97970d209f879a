"""Soft tokens at a middle LM layer (``adapter.inject_layer`` k > 0).

The LM's input carries a fixed *lead* in front of the text: a sink token (BOS, else EOS: the LM's
attention sink, whose outsized hidden state the LM relies on) and one zero placeholder per soft token.
A forward pre-hook on decoder layer k puts the adapter's soft tokens in place of the placeholders'
hidden states. The layers below k therefore see text only: they carry no LoRA, take no gradient, and a
text's states entering layer k depend on its token ids alone, so training looks them up per distinct
text (:class:`adaptkit.model.lower_states.LowerStateCache`) and runs only layers k.. on every step.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptkit.model.lower_states import LowerStateCache


class LayerInjection:
    """Puts soft tokens into the hidden states entering decoder layer ``layer`` (see the module docstring).

    Args:
        layers: the LM decoder's layer list.
        layer: k, the layer whose input receives the soft tokens (1 <= k < len(layers)).
        sink_id: the token id of the lead's first token.
    """

    def __init__(self, layers: nn.ModuleList, layer: int, sink_id: int) -> None:
        if not 0 < layer < len(layers):
            raise ValueError(
                f"adapter.inject_layer={layer} is outside this LM's decoder layers (0..{len(layers) - 1})"
            )
        self.layer = layer
        self.sink_id = sink_id
        self.pending: torch.Tensor | None = None
        layers[layer].register_forward_pre_hook(self._hook, with_kwargs=True)

    def lead(self, embedding: nn.Module, batch: int, n_soft: int, device) -> torch.Tensor:
        """``(batch, 1 + n_soft, D)`` input embeddings in front of the text: the sink token and zero
        placeholders where layer k's input gets the soft tokens."""
        sink = embedding(torch.tensor([[self.sink_id]], device=device))
        placeholders = sink.new_zeros(1, n_soft, sink.shape[-1])
        return torch.cat([sink, placeholders], dim=1).expand(batch, -1, -1)

    def lower_state_cache(
        self, decoder: nn.Module, embedding: nn.Module, n_soft: int, max_mb: float, keep_kv: bool = False
    ) -> LowerStateCache:
        """A cache of the hidden states entering layer k (and with ``keep_kv`` the keys/values below k)
        of lead + text sequences, by text."""
        lead = self.lead(embedding, 1, n_soft, embedding.weight.device)[0]
        return LowerStateCache(decoder, lead, self.layer, max_mb, keep_kv=keep_kv)

    def _hook(self, module, args, kwargs):
        """Forward pre-hook on layer k: the pending soft tokens replace the placeholders (positions 1..Q)
        of the hidden states, once per prompt forward pass (generation's later one-token steps pass
        through unchanged)."""
        soft, self.pending = self.pending, None
        if soft is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        n = soft.shape[1]
        if hidden.shape[1] < n + 1:
            return None
        hidden = torch.cat([hidden[:, :1], soft.to(hidden.dtype), hidden[:, n + 1 :]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def text_spans(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every text of a right-padded batch: one per row, or one per segment of a
    packed row (``segment_ids`` > 0; each segment sees only the lead and itself)."""
    spans: list[tuple[int, int, int]] = []
    if segment_ids is None:
        for row, length in enumerate(attention_mask.sum(-1).tolist()):
            spans.append((row, 0, length))
        return spans
    for row, segs in enumerate(segment_ids.tolist()):
        start = 0
        for j in range(1, len(segs) + 1):
            if j == len(segs) or segs[j] != segs[start]:
                if segs[start] > 0:
                    spans.append((row, start, j))
                start = j
    return spans


def states_at_layer(
    cache: LowerStateCache,
    embedding: nn.Module,
    text: torch.Tensor,
    soft: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence as layer k sees it, ``(hidden, mask)``: the sink's cached state, the soft tokens, and
    each text's cached states entering layer k (looked up per text, computed on a miss)."""
    ids = input_ids.tolist()
    spans = text_spans(attention_mask, segment_ids)
    states = cache.texts([tuple(ids[r][a:b]) for r, a, b in spans], embedding)
    hidden = text.new_zeros(text.shape)
    for (row, start, end), state in zip(spans, states):
        hidden[row, start:end] = state.to(text.dtype)
    sink = cache.lead[:1].to(text.dtype).expand(text.shape[0], 1, -1)
    ones = torch.ones(
        soft.shape[0], soft.shape[1] + 1, dtype=attention_mask.dtype, device=attention_mask.device
    )
    return torch.cat([sink, soft, hidden], dim=1), torch.cat([ones, attention_mask], dim=1)
