"""The interface every fusion adapter implements, and what the model asks of it.

A fusion adapter is the trainable part between the frozen vision backbone and the frozen LM. The model
wires it by its ``fusion`` attribute (``adaptkit.model.fusion``):

- ``"tokens"``: ``forward`` returns ``(B, num_tokens, D_lm)`` soft tokens that take places in the LM's
  sequence, at its input or at decoder layer ``adapter.inject_layer`` (Q-Former, MLP projector, perceiver
  resampler): ``SoftTokens``. Everything downstream (packing, the lower-state cache, cached-prompt
  generation, export) works for any adapter of this kind.

- ``"cross_attention"``: ``forward`` returns ``(B, M, D_lm)`` image tokens that gated cross-attention
  blocks, inserted before the LM decoder layers ``adapter.xattn.layers``, read (Flamingo;
  ``adaptkit.adapters.xattn``): ``CrossAttention``. No soft token enters the sequence.

Whichever the kind, the layers below :meth:`FusionAdapter.entry_layer` never see the image: they carry no
LoRA, and training computes their states once per distinct text (``adaptkit.model.lower_states``).

Each kind reads its own section of the recipe (``adapter.<kind>.*``, documented in
``adaptkit/config/adapters.py``; a kind registered from outside reads ``adapter.options``) and checks it in
:meth:`FusionAdapter.config_problem`.

Every adapter standardizes the frozen features with per-dimension statistics of the training data
(``set_feature_stats``, saved with its weights): the component all images share otherwise dominates
what the adapter reads.

Adding one: ``docs/extending.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig


def heads_problem(section: str, hidden: int, heads: int) -> str | None:
    """The problem with an attention width that ``heads`` does not divide, or None."""
    if hidden % heads:
        return f"{section}.hidden_size ({hidden}) must be divisible by {section}.num_heads ({heads})"
    return None


class FusionAdapter(nn.Module):
    """Base class of the fusion adapters (see the module docstring).

    Args:
        cfg: the recipe's ``adapter`` section.
        vision_dim: D_v, the width of the vision backbone's token features.
        lm_dim: D_lm, the language model's hidden size.
        output_std: the scale the adapter's initial output should have (the std of the LM's token
            embeddings, or of the hidden states entering ``entry_layer``): soft tokens then start where
            the LM expects its inputs.
        vision_tokens: T, the number of image tokens per image (None where unknown).
    """

    #: how the adapter's output reaches the LM: "tokens" (soft tokens in its sequence) or
    #: "cross_attention" (image tokens read by gated blocks inserted into the LM).
    fusion: ClassVar[str] = "tokens"

    @classmethod
    def config_problem(cls, cfg: AdapterConfig) -> str | None:
        """What is wrong with the recipe's ``adapter`` section for this kind (``load_recipe`` raises it
        with the recipe's name), or None."""
        return None

    @classmethod
    def reads_prompt(cls, cfg: AdapterConfig) -> str | None:
        """The recipe key (set true) that makes ``forward`` read the prompt with these settings, or None:
        its soft tokens then differ per question, and several questions cannot share one copy of them
        (``pack_questions``)."""
        return None

    @classmethod
    def entry_layer(cls, cfg: AdapterConfig) -> int:
        """The first LM decoder layer whose input depends on the image (0: the LM's input)."""
        return cfg.inject_layer

    def __init__(
        self,
        cfg: AdapterConfig,
        vision_dim: int,
        lm_dim: int,
        output_std: float | None = None,
        vision_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(vision_dim))
        self.register_buffer("feature_std", torch.ones(vision_dim))
        #: soft tokens given to the LM per image.
        self.num_tokens = 0
        #: whether ``forward`` reads the prompt (then packing several questions per sequence is impossible).
        self.text_conditioned = False
        #: the first LM decoder layer whose input depends on the image.
        self.entry = self.entry_layer(cfg)

    def describe(self) -> str:
        """What reaches the LM and where, for listings and model cards."""
        where = f"LM layer {self.entry}" if self.entry else "the LM's input"
        return f"{self.num_tokens} soft tokens into {where}"

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardize image features with these per-dimension statistics from now on."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-4))

    def standardize(self, image_features: torch.Tensor) -> torch.Tensor:
        return (image_features - self.feature_mean) / self.feature_std

    def forward(
        self,
        image_features: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the LM receives from the image.

        Args:
            image_features: ``(B, T, D_v)`` frozen image features.
            text_embeds: ``(B, L, D_lm)`` the prompt's token embeddings (read by text-conditioned adapters).
            text_mask: ``(B, L)`` 1 for prompt tokens the adapter may read; answers and padding are 0.
        """
        raise NotImplementedError
