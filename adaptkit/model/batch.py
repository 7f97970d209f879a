"""What the model reads (:class:`Batch`) and returns (:class:`Outputs`) in one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One batch as :meth:`MultimodalModel.forward <adaptkit.model.multimodal.MultimodalModel.forward>`
    reads it; every field but ``features`` is optional.

    Attributes:
        features: ``(B, T, D_v)`` frozen image features, one row per sample.
        input_ids: ``(B, L)`` right-padded prompt + target tokens.
        attention_mask: ``(B, L)`` 1 for real tokens.
        labels: ``(B, L)`` target tokens, ``-100`` elsewhere; without labels the LM does not run.
        segment_ids: ``(B, L)`` a packed batch's segments (``collate_packed``: several questions about
            one image per row; 0 = padding).
        positions: ``(B, L)`` each packed token's position within its segment.
        answer_class: ``(B,)`` the samples' classes for ``objectives.classify``.
        text_states: ``(B, L_t, D_t)`` the frozen text encoder's states of each sample's text (the
            image-text objectives).
        text_mask: ``(B, L_t)`` their mask.
        text_ids: ``(B, L_t)`` the texts' tokens instead of ``text_states``, encoded in the forward pass
            by a text encoder whose LoRA trains.
        groups: ``(B,)`` what each text describes (texts of one group are not negatives of each other).
    """

    features: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    answer_class: torch.Tensor | None = None
    text_states: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    @classmethod
    def of(cls, features: torch.Tensor, collated: dict, **extra) -> Batch:
        """The model's fields of a collated batch (a dict that may hold more, e.g. sample indices)."""
        names = {f.name for f in fields(cls)} - {"features"}
        return cls(features, **{k: v for k, v in {**collated, **extra}.items() if k in names})


@dataclass
class Outputs:
    """What a forward pass computed.

    Attributes:
        image: ``(B, tokens, D_lm)`` what the adapter made of the images: its soft tokens, or the image
            tokens a cross-attention adapter's blocks read (the image side of the image-text objectives).
        loss: the recipe's weighted objectives (``adaptkit.objectives``) on this batch.
        logits: ``(N, V)`` LM logits at the answer positions only (None without labels).
        targets: ``(N,)`` the answer tokens those logits predict.
    """

    image: torch.Tensor
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def for_objectives(self, batch: Batch) -> dict:
        """What ``adaptkit.objectives`` reads: these outputs (the image side as ``soft``) and the batch's
        labels beside the LM's (classes, text states, groups)."""
        return {
            "logits": self.logits,
            "targets": self.targets,
            "soft": self.image,
            "answer_class": batch.answer_class,
            "text_states": batch.text_states,
            "text_mask": batch.text_mask,
            "groups": batch.groups,
        }
