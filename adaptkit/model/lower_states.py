"""Text-only hidden states below the image's entry layer, computed once per distinct text.

When the image enters the LM at decoder layer k > 0 (soft tokens at ``adapter.inject_layer``, or the first
cross-attention block), the layers below k see only a fixed lead (the attention-sink token and zero
placeholders, ``adaptkit.model.fusion``) and the text: a row's hidden states entering layer k depend on its
token ids alone, and no gradient flows below k (no LoRA there, the LM is frozen). Training therefore
computes them once per distinct text, keeps them in memory, and runs only layers k.. per step. The result
equals the full forward pass (tested).

Easy-VQA has 273 distinct question + answer texts in 38,575 training samples, so after the first
steps the layers below k cost nothing. A dataset whose texts rarely repeat gains little and pays the
memory, so training decides before its first step (:func:`plan`, recipe key ``lower_states``): keep
the states when most of the run's lookups would hit, else run the layers below k in each step's batch
(one batched pass without gradients, no memory kept). Beyond ``max_mb`` training keeps what it has and
computes the other texts each time (an epoch visits every text once, in a new order: least-recently-used
eviction would evict each text just before its next use); generation's prompt store evicts the least
recently used.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from adaptkit.model.decoder import cache_kwarg, decoder_slice


class LowerStateCache:
    """Hidden states entering decoder layer ``layer`` for lead + text sequences, by text token ids.

    Args:
        decoder: the LM's decoder (``base_lm.get_decoder()``).
        lead: ``(n_lead, D)`` input embeddings of the lead (sink token, zero placeholders).
        layer: the entry layer k.
        max_mb: memory budget of the stored text states.
        keep_kv: also keep each text's attention keys and values in the layers below k (generation:
            decoding a new token attends to them in every layer; about ``2k * kv_dim / D`` times the
            memory of the states alone).
        evict: beyond ``max_mb``, drop the least recently used texts (True) or keep what is kept and
            store nothing new (False: training, whose epochs revisit every text in a new order).
    """

    def __init__(
        self,
        decoder: nn.Module,
        lead: torch.Tensor,
        layer: int,
        max_mb: float,
        keep_kv: bool = False,
        evict: bool = True,
    ) -> None:
        self.decoder = decoder
        self.layer = layer
        self.keep_kv = keep_kv
        self.evict = evict
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        # text ids -> (states (T, D), keys and values below k (k, 2, kv_heads, T, head_dim) or None)
        self.store: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._lead_embeds = lead[None]
        states, kv = self._run(lead[None], torch.ones(1, lead.shape[0], dtype=torch.long, device=lead.device))
        self.lead = states[0]
        self.lead_kv = None if kv is None else kv[:, :, 0]

    @torch.no_grad()
    def _run(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States entering layer k, and with ``keep_kv`` the keys/values ``(k, 2, B, kv_heads, T, hd)``."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.decoder.config) if self.keep_kv else None
        with decoder_slice(self.decoder, 0, self.layer, final_norm=False):
            states = self.decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                **cache_kwarg(self.decoder, cache),
                use_cache=self.keep_kv,
            ).last_hidden_state
        if cache is None:
            return states, None
        layers = cache.layers[: self.layer]
        return states, torch.stack([torch.stack([c.keys, c.values]) for c in layers])

    def texts(self, sequences: list[tuple[int, ...]], embedding: nn.Module) -> list[torch.Tensor]:
        """``(len(seq), D)`` states entering layer k of each text token, the text following the lead."""
        return [states for states, _ in self.entries(sequences, embedding)]

    @torch.no_grad()
    def entries(
        self, sequences: list[tuple[int, ...]], embedding: nn.Module
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(states, kv)`` of each text: :meth:`texts`' states and, with ``keep_kv``, the text's keys and
        values below layer k, ``(k, 2, kv_heads, len(seq), head_dim)``."""
        missing = list(dict.fromkeys(s for s in sequences if s not in self.store))
        self.misses += len(missing)
        self.hits += len(sequences) - len(missing)
        computed: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        # One text per forward pass: a text's states then do not depend on what it was batched with (the
        # batch's size and padding change the kernels' blocking, and so the last bits), so a resumed run,
        # whose cache fills in another order, computes exactly what the uninterrupted one did.
        for seq in missing:
            computed[seq] = self._compute(seq, embedding)
        out = []
        for seq in sequences:
            entry = self.store.get(seq)
            if entry is None:
                entry = computed[seq]
                self._put(seq, entry)
            else:
                self.store.move_to_end(seq)
            out.append(entry)
        return out

    def _compute(
        self, seq: tuple[int, ...], embedding: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One text's states entering layer k (and, with ``keep_kv``, its keys/values below k), run alone."""
        ids = torch.tensor([seq], dtype=torch.long, device=self.lead.device)
        n_lead = self._lead_embeds.shape[1]
        mask = torch.ones(1, n_lead + len(seq), dtype=torch.long, device=ids.device)
        states, kv = self._run(
            torch.cat([self._lead_embeds, embedding(ids).to(self._lead_embeds.dtype)], dim=1), mask
        )
        return states[0, n_lead:].clone(), None if kv is None else kv[:, :, 0, :, n_lead:].clone()

    def fill(self, sequences, embedding: nn.Module, batch: int = 64) -> int:
        """Compute the states of the distinct ``sequences`` not yet kept, looked up ``batch`` texts at a time
        (each is computed alone, as the first steps of training do as they meet them); returns how many
        were computed."""
        todo = [s for s in dict.fromkeys(map(tuple, sequences)) if s not in self.store]
        for start in range(0, len(todo), batch):
            self.texts(todo[start : start + batch], embedding)
        return len(todo)

    def _put(self, key: tuple[int, ...], entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        size = _nbytes(entry)
        if size > self.max_bytes or (not self.evict and self.bytes + size > self.max_bytes):
            return
        self.store[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.store.popitem(last=False)
            self.bytes -= _nbytes(old)


@dataclass(frozen=True)
class LowerStatePlan:
    """What training does with the layers below the entry layer: ``keep`` their states per text, or
    ``recompute`` them in every step's batch; and why (``reason``, logged)."""

    keep: bool
    hit_rate: float
    reason: str


def plan(
    texts: list[tuple[int, ...]], lookups: int, max_mb: float, bytes_per_token: int, setting: str = "auto"
) -> LowerStatePlan:
    """Decide ``lower_states`` for a run that looks up ``lookups`` texts drawn from the training ``texts``
    (one per sample, epoch after epoch): the share of lookups that would hit a store of ``max_mb``
    (``bytes_per_token`` per kept token), assuming each text is computed on its first lookup and the store
    keeps the first texts that fit. ``auto`` keeps when at least half of the lookups would hit."""
    counts = Counter(texts)
    distinct_tokens = sum(len(t) for t in counts)
    need_mb = distinct_tokens * bytes_per_token / 2**20
    kept = 1.0 if need_mb <= max_mb else max_mb / need_mb
    epochs = lookups / max(len(texts), 1)
    # distinct texts met in the run: all of them after an epoch, else those drawn at least once
    seen = sum(1 - (1 - n / len(texts)) ** lookups for n in counts.values()) if epochs < 1 else len(counts)
    hit_rate = max(0.0, kept * (lookups - seen) / max(lookups, 1))
    facts = (
        f"{len(counts):,} distinct texts in {len(texts):,} samples, {epochs:.3g} epochs of lookups; their "
        f"states take {need_mb:,.0f} MB against lower_state_cache_mb={max_mb:g}"
    )
    if setting == "keep" or (setting == "auto" and hit_rate >= 0.5 and max_mb > 0):
        why = "kept per text" if setting == "keep" else "kept per text (auto: most lookups hit)"
        return LowerStatePlan(True, hit_rate, f"{why}; expected hit rate {hit_rate:.0%} ({facts})")
    why = "lower_states=recompute" if setting == "recompute" else "auto: too few lookups would hit"
    return LowerStatePlan(
        False,
        hit_rate,
        f"recomputed in each step's batch ({why}; a store's expected hit rate {hit_rate:.0%}: {facts})",
    )


def _nbytes(entry: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in entry if t is not None)


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
