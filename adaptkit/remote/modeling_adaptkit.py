"""An adaptkit run as a transformers model: frozen vision tower -> trained fusion adapter -> causal LM.

This file travels inside an ``adaptkit export --format hf-remote-code`` folder and needs torch and
transformers (plus torchvision, timm or open_clip for those towers), never adaptkit::

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

How the image reaches the LM (``config.adapter["fusion"]``):

- ``tokens``: the adapter's soft tokens take the places of the ``<image>`` tokens the processor puts in
  front of the prompt. With ``config.entry_layer`` k > 0 the LM's layers below k see a zero embedding
  there (behind a sink token, BOS or EOS) and the soft tokens replace those positions' states as they enter
  layer k; with k = 0 they are the LM's input (LLaVA).
- ``cross_attention``: no soft token enters the sequence; gated cross-attention blocks before the layers
  ``config.adapter["layers"]`` read the adapter's image tokens (Flamingo), for every generated token too.

The LM is a stock transformers causal LM (LoRA merged); what the image contributes travels to its layers
as the keyword argument ``adaptkit_image``, which transformers hands to every decoder layer, where the
hooks below read it. The adapters' feature standardisation is kept as it was trained (``feature_mean``,
``feature_std``).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)

IMAGE_KWARG = "adaptkit_image"


class AdaptkitConfig(PretrainedConfig):
    """``text_config``: the LM's config. ``vision``: the tower (``family``, ``name``, ``feature_layer``,
    ``extra_layers``, ``image_size``, and ``config``: a transformers tower's own config). ``adapter``: its
    kind, sizes and ``fusion``. ``entry_layer``: the first LM layer the image reaches. ``image_token_id``:
    the processor's ``<image>`` placeholder."""

    model_type = "adaptkit"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, vision=None, adapter=None, entry_layer=0, image_token_id=None, **kw):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.vision = vision or {}
        self.adapter = adapter or {}
        self.entry_layer = entry_layer
        self.image_token_id = image_token_id
        super().__init__(**kw)


# ---- the frozen vision tower: pixels -> (B, T, D) features ----------------------------------------------


class TorchvisionTower(nn.Module):
    """A torchvision CNN trunk up to ``feature_layer``; earlier ``extra_layers`` pooled to its grid and
    concatenated on channels; ImageNet normalisation inside (the processor gives pixels in [0, 1])."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        import torchvision

        layers = list(getattr(torchvision.models, spec["name"])(weights=None).features.children())
        last = spec["feature_layer"] % len(layers)
        self.trunk = nn.Sequential(*layers[: last + 1])
        self.taps = sorted(i % len(layers) for i in spec["extra_layers"])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # constants, not buffers: transformers builds the model on the meta device, then loads saved tensors
        mean = pixels.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        x, maps = (pixels - mean) / pixels.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), []
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in self.taps:
                maps.append(x)
        maps = [F.adaptive_avg_pool2d(m, x.shape[-2:]) for m in maps] + [x]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


class TimmTower(nn.Module):
    """A timm model's ``forward_features`` tokens (or ``forward_intermediates`` for other stages)."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(spec["name"], pretrained=False)
        self.layer, self.taps = spec["feature_layer"], sorted(set(spec["extra_layers"]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.layer == -1 and not self.taps:
            maps = [self.model.forward_features(pixels)]
        else:
            wanted = [*self.taps, self.layer]
            maps = list(self.model.forward_intermediates(pixels, indices=wanted, intermediates_only=True))
            if self.layer == -1:
                maps[-1] = self.model.forward_features(pixels)
        if len(maps) == 1 and maps[0].dim() == 3:  # a ViT's tokens
            return maps[0]
        maps = [F.adaptive_avg_pool2d(m, maps[-1].shape[-2:]) for m in maps[:-1]] + [maps[-1]]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


class HFTower(nn.Module):
    """A transformers vision model (ViT, CLIP / SigLIP vision tower): hidden state ``feature_layer``."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        model = AutoModel.from_config(AutoConfig.for_model(**spec["config"]))
        self.model = getattr(model, "vision_model", model)
        self.layer = spec["feature_layer"]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]


class OpenClipTower(nn.Module):
    """An open_clip ViT's tokens; only the visual tower is built, from the architecture's own config."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        from open_clip.model import _build_vision_tower  # what open_clip's CLIP builds its visual tower with

        cfg = spec["open_clip"]
        self.visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
        self.visual.output_tokens = True

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)[1]


def tower_features(tower: nn.Module, spec: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen tower's features, rounded through the run's 16-bit storage dtype, if it had one."""
    param = next(tower.parameters())
    features = tower(pixel_values.to(param.device, param.dtype))
    stored = spec.get("feature_dtype", "float32")
    return features if stored == "float32" else features.to(getattr(torch, stored)).to(param.dtype)


TOWERS = {"torchvision": TorchvisionTower, "timm": TimmTower, "hf": HFTower, "open_clip": OpenClipTower}


# ---- the trained adapters (module names as adaptkit saves them) ------------------------------------------


def feed_forward(dim: int, ratio: float, norm: bool = True) -> nn.Sequential:
    inner = int(dim * ratio)
    parts = [nn.Linear(dim, inner), nn.GELU(), nn.Identity(), nn.Linear(inner, dim), nn.Identity()]
    return nn.Sequential(*([nn.LayerNorm(dim)] if norm else []), *parts)


def attention(dim: int, heads: int) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(dim, heads, batch_first=True)


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: float) -> None:
        super().__init__()
        self.norm_self, self.self_attn = nn.LayerNorm(dim), attention(dim, heads)
        self.norm_cross, self.cross_attn = nn.LayerNorm(dim), attention(dim, heads)
        self.norm_ffn, self.ffn = nn.LayerNorm(dim), feed_forward(dim, ratio, norm=False)

    def forward(self, queries, image, text=None, text_pad=None):
        x = self.norm_self(queries)
        if text is None:
            queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        else:  # InstructBLIP: the queries also read the prompt
            memory = torch.cat([x, self.norm_self(text)], dim=1)
            pad = torch.cat([text_pad.new_zeros(x.shape[:2]), text_pad], dim=1)
            queries = queries + self.self_attn(x, memory, memory, key_padding_mask=pad, need_weights=False)[0]
        x = self.norm_cross(queries)
        queries = queries + self.cross_attn(x, image, image, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class Resampler(nn.Module):
    """Perceiver resampler: latents attend to [image tokens; latents], then a feed-forward block."""

    def __init__(self, cfg: dict, vision_dim: int, out_dim: int) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.latents = nn.Parameter(torch.zeros(1, cfg["num_queries"], dim))
        self.media_proj = nn.Linear(vision_dim, dim)
        self.layers = nn.ModuleList(nn.Module() for _ in range(cfg["num_layers"]))
        for layer in self.layers:
            layer.norm_media, layer.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
            layer.attn, layer.ffn = attention(dim, cfg["num_heads"]), feed_forward(dim, cfg["mlp_ratio"])
        self.norm_out, self.out_proj = nn.LayerNorm(dim), nn.Linear(dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.media_proj(features)
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            q = layer.norm_latents(latents)
            kv = torch.cat([layer.norm_media(media), q], dim=1)
            latents = latents + layer.attn(q, kv, kv, need_weights=False)[0]
            latents = latents + layer.ffn(latents)
        return self.out_proj(self.norm_out(latents))


class GatedBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: tanh-gated cross-attention and feed-forward residuals."""

    def __init__(self, dim: int, heads: int, ratio: float) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), attention(dim, heads)
        self.attn_gate, self.ffn_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.ffn = feed_forward(dim, ratio)

    def forward(self, hidden: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        x, media = hidden.to(self.attn_gate.dtype), media.to(self.attn_gate.dtype)
        x = x + self.attn_gate.tanh() * self.attn(self.norm(x), media, media, need_weights=False)[0]
        return (x + self.ffn_gate.tanh() * self.ffn(x)).to(hidden.dtype)


class Adapter(nn.Module):
    """Standardised features -> soft tokens (``qformer``, ``projector``, ``resampler``) or the image tokens
    that the gated blocks read (``xattn``, whose blocks live here too)."""

    def __init__(self, cfg: dict, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.kind, self.cfg = cfg["kind"], cfg
        self.register_buffer("feature_mean", torch.zeros(vision_dim))
        self.register_buffer("feature_std", torch.ones(vision_dim))
        sub = cfg[self.kind]
        if self.kind == "qformer":
            dim = sub["hidden_size"]
            self.queries = nn.Parameter(torch.zeros(1, sub["num_queries"], dim))
            self.image_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, dim))
            self.layers = nn.ModuleList(
                QFormerLayer(dim, sub["num_heads"], sub["mlp_ratio"]) for _ in range(sub["num_layers"])
            )
            if sub["text_conditioned"]:
                self.text_proj = nn.Sequential(nn.LayerNorm(lm_dim), nn.Linear(lm_dim, dim))
            self.norm_out, self.out_proj = nn.LayerNorm(dim), nn.Linear(dim, lm_dim)
        elif self.kind == "projector":
            hidden = sub["hidden_size"] or lm_dim
            self.mlp = nn.Sequential(
                nn.Linear(vision_dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, lm_dim)
            )
        elif self.kind == "resampler":
            self.resampler = Resampler(sub, vision_dim, lm_dim)
        elif self.kind == "xattn":
            if sub["resampler"]:
                self.media = Resampler(cfg["resampler"], vision_dim, lm_dim)
            else:
                self.media = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.LayerNorm(lm_dim))
            self.blocks = nn.ModuleDict(
                {str(k): GatedBlock(lm_dim, sub["num_heads"], sub["mlp_ratio"]) for k in sub["layers"]}
            )
        else:
            raise ValueError(f"adapter kind {self.kind!r} is not one this file builds")

    def forward(self, features, text=None, text_mask=None) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std
        if self.kind == "projector":
            pool = self.cfg["projector"]["pool_tokens"]
            if pool and pool != x.shape[1]:
                side, out_side = math.isqrt(x.shape[1]), math.isqrt(pool)
                if side * side == x.shape[1] and out_side * out_side == pool:
                    grid = x.transpose(1, 2).reshape(x.shape[0], -1, side, side)
                    x = F.adaptive_avg_pool2d(grid, out_side).flatten(2).transpose(1, 2)
                else:
                    x = F.adaptive_avg_pool1d(x.transpose(1, 2), pool).transpose(1, 2)
            return self.mlp(x)
        if self.kind == "resampler":
            return self.resampler(x)
        if self.kind == "xattn":
            return self.media(x)
        image = self.image_proj(x)
        queries, text_pad = self.queries.expand(image.shape[0], -1, -1), None
        if hasattr(self, "text_proj") and text is not None:
            text, text_pad = self.text_proj(text.to(image.dtype)), text_mask == 0
        else:
            text = None
        for layer in self.layers:
            queries = layer(queries, image, text, text_pad)
        return self.out_proj(self.norm_out(queries))


# ---- the model ---------------------------------------------------------------------------------------


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


class AdaptkitForImageTextToText(PreTrainedModel, GenerationMixin):
    """Tower, adapter and LM; ``forward`` and ``generate`` take the processor's ``input_ids``,
    ``attention_mask`` (left padding) and ``pixel_values``."""

    config_class = AdaptkitConfig
    base_model_prefix = "adaptkit"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: AdaptkitConfig) -> None:
        super().__init__(config)
        self.vision = TOWERS[config.vision["family"]](config.vision)
        lm_dim = config.text_config.hidden_size
        self.adapter = Adapter(config.adapter, config.vision["feature_dim"], lm_dim)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.fusion = config.adapter["fusion"]
        layers = self.language_model.get_decoder().layers
        if self.fusion == "tokens" and config.entry_layer:
            layers[config.entry_layer].register_forward_pre_hook(self._splice, with_kwargs=True)
        if self.fusion == "cross_attention":
            for key, block in self.adapter.blocks.items():
                hook = partial(self._cross_attend, block)
                layers[int(key)].register_forward_pre_hook(hook, with_kwargs=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @staticmethod
    def _splice(module, args, kwargs):
        """Entry layer k: the soft tokens replace the ``<image>`` positions' states."""
        image = kwargs.get(IMAGE_KWARG)
        if image is None:
            return None
        where, soft = image
        hidden = _hidden(args, kwargs).clone()
        hidden[where] = soft.reshape(-1, soft.shape[-1]).to(hidden.dtype)
        return _with_hidden(args, kwargs, hidden)

    @staticmethod
    def _cross_attend(block, module, args, kwargs):
        """Before each of ``adapter.xattn.layers``: its gated block reads the image tokens."""
        media = kwargs.get(IMAGE_KWARG)
        return None if media is None else _with_hidden(args, kwargs, block(_hidden(args, kwargs), media))

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        **kwargs,
    ):
        """The LM's output for ``input_ids`` (prefill: ``<image>`` placeholders and ``pixel_values``; later
        steps: new tokens, with ``pixel_values`` again for cross-attention)."""
        image_id = self.config.image_token_id
        where = (
            input_ids == image_id if image_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        )
        embedding = self.get_input_embeddings()
        if inputs_embeds is None:
            inputs_embeds = embedding(input_ids.masked_fill(where, 0))
        # generate() passes position ids (from the mask) and drops an all-ones mask: both then go on as given
        if position_ids is None and attention_mask is not None:  # left padding does not shift positions
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        tokens = self.fusion == "tokens"
        if pixel_values is not None and (where.any() or not tokens):
            features = tower_features(self.vision, self.config.vision, pixel_values).to(inputs_embeds.dtype)
            # a text-conditioned adapter reads the prompt: what follows the sink token and the placeholders
            lead = int(bool(self.config.entry_layer)) + int(where[0].sum())
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            read = mask[:, -input_ids.shape[1] :].long()
            read = read * (read.cumsum(-1) > lead)
            out = self.adapter(features, inputs_embeds, read).to(inputs_embeds.dtype)
            if not tokens:
                kwargs[IMAGE_KWARG] = out
            elif self.config.entry_layer:
                inputs_embeds = inputs_embeds.masked_fill(where[..., None], 0.0)
                kwargs[IMAGE_KWARG] = (where, out)
            else:
                inputs_embeds = inputs_embeds.clone()
                inputs_embeds[where] = out.reshape(-1, out.shape[-1])
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    def prepare_inputs_for_generation(self, *args, pixel_values=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, pixel_values=pixel_values, **kwargs)
        if self.fusion == "cross_attention":  # every new token reads the image again
            inputs["pixel_values"] = pixel_values
        return inputs
