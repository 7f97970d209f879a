"""Which LM decoder layers a pass runs, and how: the one place that decides it.

Every pass of the model through the LM (training and scoring, export verification, a generated answer's
prompt) runs the decoder's layers ``start:`` on an :class:`LMInput`: from layer 0 on input embeddings,
or from the fusion's entry layer on states looked up per text (``adaptkit.model.lower_states``). Where
only some positions' outputs are read (training's answer positions), the last layer runs at those
positions alone when ``last_layer.supported`` says it computes exactly what the stock layer would.

The layers are transformers' own and run inside the decoder's own forward (its mask, rotary and
attention code), over a slice of its layer list: the same layer objects run (LoRA, compiled graphs and
all), whatever the LM family. What the image contributes travels as a keyword argument of that call
(:data:`IMAGE_KWARG`), which transformers hands to every decoder layer; the fusion's layer hooks read it
there (``adaptkit.model.fusion``).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from adaptkit.model import last_layer

#: the keyword under which a pass carries the image to the decoder layers (transformers passes a decoder's
#: extra keyword arguments to each layer; activation checkpointing re-runs a layer with the same ones).
IMAGE_KWARG = "adaptkit_image"


@dataclass
class LMInput:
    """What one pass feeds the decoder.

    Attributes:
        embeds: ``(B, S, D)`` input embeddings, or, with ``start`` > 0, the states entering layer ``start``.
        mask: ``(B, S)`` 1 where a position is real, 0 for padding.
        n_lead: positions in front of the text (soft tokens, or the sink token and placeholders).
        start: the first decoder layer to run.
        image: what the fusion's layer hooks read (:data:`IMAGE_KWARG`), or None.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    n_lead: int
    start: int = 0
    image: torch.Tensor | None = None

    def kwargs(self) -> dict:
        return {} if self.image is None else {IMAGE_KWARG: self.image}


@contextlib.contextmanager
def decoder_slice(decoder: nn.Module, start: int, stop: int | None, final_norm: bool):
    """Make ``decoder`` run only its layers ``start:stop`` (and its final norm only if ``final_norm``).

    transformers' decoders run ``self.layers`` in order between the embedding lookup (skipped when
    ``inputs_embeds`` is given) and the final norm; swapping the list in for one call reuses the model's
    own mask, rotary-embedding and attention code. The full list and the norm are restored on exit.

    Decoders with several kinds of layer (Gemma 2/3 and Qwen2 with sliding-window layers) pick each layer's
    mask and rotary embedding by its index in ``config.layer_types``; the list is sliced alike for the call,
    so layer ``start`` keeps its own kind.
    """
    layers, norm = decoder.layers, decoder.norm
    config = decoder.config
    kinds = getattr(config, "layer_types", None)
    decoder.layers = layers[start:stop]
    if kinds is not None:
        config.layer_types = list(kinds)[start:stop]
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers = layers
        decoder.norm = norm
        if kinds is not None:
            config.layer_types = kinds


def cache_kwarg(module: nn.Module, cache) -> dict:
    """``{name: cache}`` under the name ``module.forward`` takes a KV cache by: ``cache`` in recent
    transformers (which deprecated ``past_key_values``), ``past_key_values`` before."""
    params = inspect.signature(module.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


class DecoderRun:
    """Runs the LM's decoder layers for the model's passes (see the module docstring).

    Args:
        lm: the transformers causal LM (peft's wrapper unwrapped).
    """

    def __init__(self, lm: nn.Module) -> None:
        self.lm = lm
        #: True: where only some positions are read, the last layer runs at those alone where
        #: ``last_layer.supported`` (exact); False: at every position.
        self.answer_only_last_layer = True

    @property
    def decoder(self) -> nn.Module:
        return self.lm.get_decoder()

    def layers(
        self, inp: LMInput, mask, position_ids, stop: int | None = None, final_norm: bool = True, **kw
    ):
        """The decoder's states after layers ``inp.start:stop`` (``mask``: the keep-mask or a packed additive
        mask, ``kw``: e.g. a KV cache)."""
        decoder = self.decoder
        with decoder_slice(decoder, inp.start, stop, final_norm):
            return decoder(
                inputs_embeds=inp.embeds, attention_mask=mask, position_ids=position_ids, **kw, **inp.kwargs()
            ).last_hidden_state

    def at(self, inp: LMInput, mask, position_ids, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The decoder's final states at positions ``(rows, cols)`` only, ``(N, D)``: the last layer runs at
        those positions alone where that is exact."""
        decoder = self.decoder
        last = decoder.layers[-1]
        exact = self.answer_only_last_layer and last_layer.supported(self.lm.config, last)
        if not exact:
            return self.layers(inp, mask, position_ids, use_cache=False)[rows, cols]
        hidden = self.layers(
            inp, mask, position_ids, len(decoder.layers) - 1, final_norm=False, use_cache=False
        )
        allowed = last_layer.key_mask(mask, rows, cols)
        rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
        return decoder.norm(last_layer.last_layer_at(last, hidden, rows, cols, allowed, rotary))

    def everywhere(self, inp: LMInput) -> torch.Tensor:
        """The LM's logits at every position of right- or left-padded rows, ``(B, S, V)``."""
        positions = (inp.mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.layers(inp, inp.mask, positions, use_cache=False)
        return self.lm.get_output_embeddings()(hidden)
