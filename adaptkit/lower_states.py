"""Text-only hidden states below the injection layer, computed once per distinct text.

With ``adapter.inject_layer`` k > 0 the soft tokens enter the LM at decoder layer k, and the layers
below k see only a fixed lead (the attention-sink token and zero placeholders) and the text: a row's
hidden states entering layer k depend on its token ids alone, and no gradient flows below k (no
LoRA there, the LM is frozen). Training therefore computes them once per distinct text, keeps them in
memory, and runs only layers k.. per step. The result equals the full forward pass (tested).

Easy-VQA has 273 distinct question + answer texts in 38,575 training samples, so after the first
steps the layers below k cost nothing. A dataset whose texts rarely repeat gains little and pays the
memory: entries beyond ``max_mb`` are evicted, least recently used first.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn


@contextlib.contextmanager
def decoder_slice(decoder: nn.Module, start: int, stop: int | None, final_norm: bool):
    """Make ``decoder`` run only its layers ``start:stop`` (and its final norm only if ``final_norm``).

    transformers' decoders run ``self.layers`` in order between the embedding lookup (skipped when
    ``inputs_embeds`` is given) and the final norm; swapping the list in for one call reuses the
    model's own mask, rotary-embedding and attention code. The same layer objects run (LoRA, compiled
    graphs and all); the full list and the norm are restored on exit.
    """
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = layers[start:stop]
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers = layers
        decoder.norm = norm


class LowerStateCache:
    """Hidden states entering decoder layer ``layer`` for lead + text sequences, by text token ids.

    Args:
        decoder: the LM's decoder (``base_lm.get_decoder()``).
        lead: ``(n_lead, D)`` input embeddings of the lead (sink token, zero placeholders).
        layer: the injection layer k.
        max_mb: memory budget of the stored text states.
    """

    def __init__(self, decoder: nn.Module, lead: torch.Tensor, layer: int, max_mb: float) -> None:
        self.decoder = decoder
        self.layer = layer
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self.store: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._lead_embeds = lead[None]
        self.lead = self._run(lead[None], torch.ones(1, lead.shape[0], dtype=torch.long, device=lead.device))[
            0
        ]

    @torch.no_grad()
    def _run(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with decoder_slice(self.decoder, 0, self.layer, final_norm=False):
            return self.decoder(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state

    @torch.no_grad()
    def texts(self, sequences: list[tuple[int, ...]], embedding: nn.Module) -> list[torch.Tensor]:
        """``(len(seq), D)`` states entering layer k of each text token, the text following the lead."""
        missing = list(dict.fromkeys(s for s in sequences if s not in self.store))
        self.misses += len(missing)
        self.hits += len(sequences) - len(missing)
        computed: dict[tuple[int, ...], torch.Tensor] = {}
        if missing:
            device = self.lead.device
            n_lead, longest = self.lead.shape[0], max(len(s) for s in missing)
            ids = torch.zeros(len(missing), longest, dtype=torch.long, device=device)
            mask = torch.zeros(len(missing), n_lead + longest, dtype=torch.long, device=device)
            for i, seq in enumerate(missing):
                ids[i, : len(seq)] = torch.tensor(seq, device=device)
                mask[i, : n_lead + len(seq)] = 1
            lead = self._lead_embeds.expand(len(missing), -1, -1)
            states = self._run(torch.cat([lead, embedding(ids).to(lead.dtype)], dim=1), mask)
            for i, seq in enumerate(missing):
                computed[seq] = states[i, n_lead : n_lead + len(seq)].clone()
        out = []
        for seq in sequences:
            state = self.store.get(seq)
            if state is None:
                state = computed[seq]
                self._put(seq, state)
            else:
                self.store.move_to_end(seq)
            out.append(state)
        return out

    def fill(self, sequences, embedding: nn.Module, batch: int = 64) -> int:
        """Compute the states of the distinct ``sequences`` not yet kept, ``batch`` texts at a time (what
        the first steps of training do as they meet them); returns how many were computed."""
        todo = [s for s in dict.fromkeys(map(tuple, sequences)) if s not in self.store]
        for start in range(0, len(todo), batch):
            self.texts(todo[start : start + batch], embedding)
        return len(todo)

    def _put(self, key: tuple[int, ...], state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.max_bytes:
            return
        self.store[key] = state
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
