"""How the image reaches the LM: one :class:`Fusion` per model, chosen by the adapter's ``fusion`` kind.

- :class:`SoftTokens` (Q-Former, projector, resampler): the adapter's soft tokens take places in the
  LM's sequence, in front of the text. At entry layer 0 they are the LM's input (LLaVA, BLIP-2). At
  entry layer k > 0 (``adapter.inject_layer``) the input carries a fixed *lead* in front of the text
  instead, a sink token (BOS, else EOS: the LM's attention sink, whose outsized hidden state the LM relies
  on) and one zero placeholder per soft token, and the soft tokens replace the placeholders' states as
  they enter layer k.
- :class:`CrossAttention` (``xattn``): no soft token enters the sequence; gated blocks before the layers
  of ``adapter.xattn.layers`` read the adapter's image tokens (Flamingo). With the first block at k > 0
  the lead is the sink token alone.

Whatever the strategy, the layers below the entry layer k see only the lead and the text: they carry no
LoRA and take no gradient, and a text's states entering layer k depend on its token ids alone. Training
therefore looks them up per distinct text (:meth:`Fusion.use_lower_states`), generation per prompt with
their keys and values (:meth:`Fusion.prompt_store`), and both run only layers k.. on the image.

The image reaches the layers explicitly: :meth:`Fusion.lm_input` returns the pass's :class:`LMInput`,
whose ``image`` travels as a keyword argument of the decoder call (``adaptkit.model.decoder``); the hooks
this module puts on the LM's layers read it from there. A call without it runs the stock LM. The LM's
modules and parameter names stay as transformers made them, so peft's LoRA, 4/8-bit layers,
``torch.compile`` and export all see a stock LM.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adaptkit.model import last_layer
from adaptkit.model.decoder import IMAGE_KWARG, DecoderRun, LMInput
from adaptkit.model.lower_states import LowerStateCache, states_at_layer
from adaptkit.model.packing import sliding_window


def _replace_hidden(args, kwargs, hidden):
    """A forward pre-hook's return value that hands the layer ``hidden`` instead of its input states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def plain_kv_cache(config) -> bool:
    """Whether the LM's key/value cache keeps every layer's keys whole (no sliding-window layers), as the
    prompt store, which splices kept keys in front of new ones, needs."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


class Fusion:
    """What every strategy shares: the entry layer, the lead, the layers below it looked up per text.

    Args:
        lm: the transformers causal LM (peft's wrapper unwrapped).
        adapter: the fusion adapter (``adaptkit.adapters``).
        entry: the first decoder layer whose input depends on the image.
        sink_id: the token id of the lead's first token.
    """

    #: the adapters' ``fusion`` attribute this strategy serves.
    kind: ClassVar[str]

    def __init__(self, lm: nn.Module, adapter: nn.Module, entry: int, sink_id: int) -> None:
        layers = lm.get_decoder().layers
        if not 0 <= entry < len(layers):
            raise ValueError(f"the image's entry layer {entry} is outside this LM's decoder layers")
        self.lm, self.entry, self.sink_id = lm, entry, sink_id
        #: the decoder layers each pass runs (and the answer-only last layer).
        self.run = DecoderRun(lm)
        #: training's states entering the entry layer, by text (:meth:`use_lower_states`), or None.
        self.lower: LowerStateCache | None = None
        #: generation's memory budget for prompts' lower states and keys/values (0: prompts run whole).
        self.prompt_mb = 256.0
        self._prompts: LowerStateCache | None = None
        self._prompts_on: tuple | None = None  # the LM's (device, dtype) the prompt store was made for
        self.handles: list = []  # the hooks this strategy put on the LM's layers

    @property
    def n_soft(self) -> int:
        """Soft tokens in the sequence (placeholders in the lead when entering above layer 0)."""
        return 0

    def in_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """The part of the adapter's output that takes places in the sequence, ``(B, n_soft, D)``."""
        return out[:, :0]

    def carried(self, out: torch.Tensor, in_states: bool) -> torch.Tensor | None:
        """What the layer hooks read from a pass whose soft tokens are (``in_states``) or are not yet in
        the states it starts from."""
        raise NotImplementedError

    def step_image(self, out: torch.Tensor) -> torch.Tensor | None:
        """What the layer hooks read while a generated token runs through the LM alone."""
        return None

    # ---- the sequence ------------------------------------------------------------------------------

    def lead(self, embedding: nn.Module, batch: int, device) -> torch.Tensor:
        """``(batch, 1 + n_soft, D)`` input embeddings in front of the text when entering above layer 0: the
        sink token and zero placeholders."""
        sink = embedding(torch.tensor([[self.sink_id]], device=device))
        placeholders = sink.new_zeros(1, self.n_soft, sink.shape[-1])
        return torch.cat([sink, placeholders], dim=1).expand(batch, -1, -1)

    def lm_input(
        self,
        embedding: nn.Module,
        text: torch.Tensor,
        out: torch.Tensor,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        lookup: bool = True,
    ) -> LMInput:
        """The pass's input for right-padded (or packed, ``segment_ids``) texts: their embeddings ``text``
        behind the lead, or, when ``lookup`` and the states below the entry layer are kept
        (:meth:`use_lower_states`), those states, the pass starting at the entry layer."""
        soft = self.in_sequence(out).to(text.dtype)
        if self.lower is not None and lookup:
            embeds, mask = states_at_layer(
                self.lower, embedding, text, soft, input_ids, attention_mask, segment_ids
            )
            n_lead = embeds.shape[1] - text.shape[1]
            return LMInput(embeds, mask, n_lead, self.entry, self.carried(out, in_states=True))
        lead = soft if not self.entry else self.lead(embedding, text.shape[0], text.device)
        ones = torch.ones(lead.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        embeds = torch.cat([lead, text], dim=1)
        return LMInput(embeds, mask, lead.shape[1], 0, self.carried(out, in_states=not self.entry))

    # ---- the layers below the entry layer, by text ------------------------------------------------

    def _store(self, max_mb: float, keep_kv: bool, evict: bool = True) -> LowerStateCache:
        embedding = self.lm.get_input_embeddings()
        lead = self.lead(embedding, 1, embedding.weight.device)[0]
        return LowerStateCache(self.lm.get_decoder(), lead, self.entry, max_mb, keep_kv=keep_kv, evict=evict)

    def use_lower_states(self, max_mb: float) -> LowerStateCache:
        """From now on, training and scoring compute the layers below the entry layer once per distinct text
        (the first ones that fit in ``max_mb`` kept) and run only the layers from the entry layer on each
        pass."""
        if not self.entry:
            raise ValueError("the lower-state cache needs an entry layer > 0 (adapter.inject_layer)")
        self.lower = self._store(max_mb, keep_kv=False, evict=False)
        return self.lower

    def prompt_store(self) -> LowerStateCache | None:
        """Generation's store of prompts' states entering the entry layer and their keys/values below it,
        made on first use and again when the LM's device or dtype changes. None where prompts run through
        the whole model: entry layer 0, no budget (``prompt_mb`` 0), or cache layers that are not plain
        full-attention ones (sliding windows)."""
        if not self.entry or self.prompt_mb <= 0:
            return None
        weight = self.lm.get_input_embeddings().weight
        where = (weight.device, weight.dtype, self.prompt_mb)
        if self._prompts_on != where:
            plain = plain_kv_cache(self.lm.config)
            self._prompts = self._store(self.prompt_mb, keep_kv=True) if plain else None
            self._prompts_on = where
        return self._prompts

    def paths(self) -> str:
        """One line on which of the LM's fast paths this model takes and which it leaves off, and why."""
        config = self.lm.config
        why = last_layer.why_not(config, self.lm.get_decoder().layers[-1])
        if not self.run.answer_only_last_layer:
            why = "turned off"
        parts = [f"answer-only last layer {f'off ({why})' if why else 'on'}"]
        if self.entry:
            why = "on" if plain_kv_cache(config) else "off (sliding-window key/value cache layers)"
            parts.append(f"generation's prompt store {why if self.prompt_mb > 0 else 'off (no budget)'}")
        window = sliding_window(config)
        if window:
            parts.append(f"packed rows keep the {window}-token sliding window of the layers that have one")
        return f"LM paths ({config.model_type}): " + "; ".join(parts)

    def attach(self, layers: nn.ModuleList) -> None:
        """Put this strategy's hooks on the LM's decoder ``layers`` (kept in ``handles``)."""

    def remove(self) -> None:
        """Take the hooks off the LM's layers (the LM then computes as it did before)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


class SoftTokens(Fusion):
    """The adapter's soft tokens in the LM's sequence, at its input or entering layer k (module docstring)."""

    kind = "tokens"

    def __init__(self, lm: nn.Module, adapter: nn.Module, entry: int, sink_id: int) -> None:
        super().__init__(lm, adapter, entry, sink_id)
        self.adapter_tokens = adapter.num_tokens
        if entry:
            self.attach(lm.get_decoder().layers)

    @property
    def n_soft(self) -> int:
        return self.adapter_tokens

    def in_sequence(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def carried(self, out: torch.Tensor, in_states: bool) -> torch.Tensor | None:
        return None if in_states else out

    def attach(self, layers: nn.ModuleList) -> None:
        self.handles.append(layers[self.entry].register_forward_pre_hook(self._splice, with_kwargs=True))

    def _splice(self, module, args, kwargs):
        """Forward pre-hook on the entry layer: the pass's soft tokens replace the placeholders (positions
        1..n) of the states entering it. A generated token's step (shorter than the lead) passes through."""
        soft = kwargs.get(IMAGE_KWARG)
        if soft is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        n = soft.shape[1]
        if hidden.shape[1] < n + 1:
            return None
        hidden = torch.cat([hidden[:, :1], soft.to(hidden.dtype), hidden[:, n + 1 :]], dim=1)
        return _replace_hidden(args, kwargs, hidden)


class CrossAttention(Fusion):
    """Gated cross-attention blocks before chosen decoder layers read the adapter's image tokens."""

    kind = "cross_attention"

    def __init__(self, lm: nn.Module, adapter: nn.Module, entry: int, sink_id: int) -> None:
        super().__init__(lm, adapter, entry, sink_id)
        layers = lm.get_decoder().layers
        bad = [int(k) for k in adapter.blocks if not 0 <= int(k) < len(layers)]
        if bad:
            raise ValueError(
                f"adapter.xattn.layers {bad} are outside this LM's decoder layers (0..{len(layers) - 1})"
            )
        self.blocks = adapter.blocks
        self.attach(layers)

    def carried(self, out: torch.Tensor, in_states: bool) -> torch.Tensor | None:
        return out

    def step_image(self, out: torch.Tensor) -> torch.Tensor | None:
        return out  # every generated token attends to the image again

    def attach(self, layers: nn.ModuleList) -> None:
        for key, block in self.blocks.items():
            hook = partial(self._block, block)
            self.handles.append(layers[int(key)].register_forward_pre_hook(hook, with_kwargs=True))

    @staticmethod
    def _block(block: nn.Module, module, args, kwargs):
        media = kwargs.get(IMAGE_KWARG)
        if media is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] != media.shape[0]:
            raise RuntimeError(
                f"the LM runs a batch of {hidden.shape[0]} rows but was given image tokens for "
                f"{media.shape[0]}: pass each row's image tokens"
            )
        return _replace_hidden(args, kwargs, block(hidden, media))


STRATEGIES: dict[str, type[Fusion]] = {SoftTokens.kind: SoftTokens, CrossAttention.kind: CrossAttention}


def make_fusion(lm: nn.Module, adapter: nn.Module, tokenizer, entry: int) -> Fusion:
    """The strategy the adapter's ``fusion`` kind names, wired into ``lm`` (peft's wrapper unwrapped)."""
    kind = getattr(adapter, "fusion", None)
    if kind not in STRATEGIES:
        raise ValueError(
            f"{type(adapter).__name__}: fusion={kind!r}; the model wires {', '.join(map(repr, STRATEGIES))} "
            "(see adaptkit/adapters/base.py)"
        )
    sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return STRATEGIES[kind](lm, adapter, entry, sink)
