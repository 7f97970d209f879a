"""An adaptkit retrieval run as a transformers model, with CLIP's interface (BLIP-2 stage 1's ITC).

The image side is ``modeling_adaptkit``'s frozen tower and trained adapter, whose tokens the embedding head
normalises and projects: ``(B, Q, E)``, one embedding per token. The text side is a frozen transformers text
encoder (its LoRA merged), its last states mean-pooled over the mask and projected: ``(N, E)``. An image and
a text score their best token's cosine similarity, times the trained temperature's inverse::

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[image], text=["a red circle", "a blue square"])
    probs = model(**inputs).logits_per_image.softmax(-1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .modeling_adaptkit import TOWERS, Adapter, tower_features

MAX_LOGIT_SCALE = 4.605170185988092  # log(100): CLIP's clamp, as in training


class AdaptkitRetrievalConfig(PretrainedConfig):
    """``text_config``: the text encoder's config. ``vision`` and ``adapter`` as in ``AdaptkitConfig``;
    ``image_dim``: the adapter tokens' width; ``embed_dim``: the shared space's."""

    model_type = "adaptkit_retrieval"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, vision=None, adapter=None, image_dim=0, embed_dim=0, **kw):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.vision, self.adapter = vision or {}, adapter or {}
        self.image_dim, self.embed_dim = image_dim, embed_dim
        super().__init__(**kw)


@dataclass
class RetrievalOutput(ModelOutput):
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class AdaptkitForRetrieval(PreTrainedModel):
    config_class = AdaptkitRetrievalConfig
    base_model_prefix = "adaptkit"
    main_input_name = "pixel_values"

    def __init__(self, config: AdaptkitRetrievalConfig) -> None:
        super().__init__(config)
        self.vision = TOWERS[config.vision["family"]](config.vision)
        self.adapter = Adapter(config.adapter, config.vision["feature_dim"], config.image_dim)
        self.text_model = AutoModel.from_config(config.text_config)
        self.embed = nn.Module()  # the run's embedding head, under its own names
        self.embed.image_norm = nn.LayerNorm(config.image_dim)
        self.embed.image_proj = nn.Linear(config.image_dim, config.embed_dim)
        self.embed.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.embed.logit_scale = nn.Parameter(torch.zeros(()))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, Q, E)`` normalised embeddings of each image's adapter tokens."""
        features = tower_features(self.vision, self.config.vision, pixel_values)
        tokens = self.adapter(features.to(self.embed.image_proj.weight.dtype))
        return F.normalize(self.embed.image_proj(self.embed.image_norm(tokens)), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(N, E)`` normalised text embeddings: the encoder's last states mean-pooled over the mask."""
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(self.embed.text_proj(pooled), dim=-1)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs) -> RetrievalOutput:
        """Every image against every text: the best token's cosine similarity, scaled by the trained
        temperature's inverse (``logits_per_image``: ``(B, N)``)."""
        images = self.get_image_features(pixel_values)
        texts = self.get_text_features(input_ids, attention_mask)
        scale = self.embed.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits = torch.einsum("iqe,te->iqt", images, texts.to(images.dtype)).max(dim=1).values * scale
        return RetrievalOutput(logits, logits.t(), images, texts)
