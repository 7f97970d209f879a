"""The ``timm`` vision family: any timm model as a frozen backbone (``vision.family: timm``).

Tokens come from ``forward_features`` (the last layer: a CNN's feature map becomes its ``H*W`` grid
cells, a ViT gives its tokens, prefix tokens included) or, for another ``feature_layer``, from timm's
``forward_intermediates``. ``extra_layers`` (CNNs) adds earlier stages average-pooled to the last grid, as
the torchvision family does. Preprocessing is the model's pretrained configuration (mean, std,
interpolation, crop) at ``vision.image_size``, through timm's own eval transform.

Weights (``vision.weights``): a local ``.pth`` / ``.safetensors`` state dict (read with
``weights_only=True``), ``embedded`` for the packaged ImageNet EfficientNet-Lite0
(``tf_efficientnet_lite0``), a timm pretrained tag (``pretrained`` for the default one; it needs the hub
or timm's cache) or ``random``. A state dict whose names differ from timm's (other ports of the same
network) loads when its tensors match timm's one for one, in order and shape; the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from adaptkit.backbones.vision_base import VisionBackbone, load_state_dict

if TYPE_CHECKING:
    from adaptkit.config import VisionConfig

log = logging.getLogger(__name__)

#: the timm model the embedded EfficientNet-Lite0 checkpoint loads into
EMBEDDED_TIMM = "tf_efficientnet_lite0"


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict:
    """``state`` under ``model``'s names: as it is when the names match, else matched one for one in order
    when every tensor's shape agrees (a port of the same network under other names). Raises naming the
    first difference otherwise."""
    own = model.state_dict()
    if set(state) == set(own):
        return state
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    ours = [(k, v) for k, v in own.items() if not k.endswith("num_batches_tracked")]
    if len(theirs) == len(ours):
        bad = next(((a, b) for (a, x), (b, y) in zip(theirs, ours) if tuple(x.shape) != tuple(y.shape)), None)
        if bad is None:
            log.info(
                "%s: names differ from timm's; its %d tensors matched in order and shape", source, len(ours)
            )
            out = {b: x for (_, x), (b, _) in zip(theirs, ours)}
            out.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked")})
            return out
        raise ValueError(
            f"vision.weights: {source} does not fit this timm model: {bad[0]} has shape "
            f"{tuple(state[bad[0]].shape)} where {bad[1]} needs {tuple(own[bad[1]].shape)}"
        )
    missing = sorted(set(own) - set(state))[:3]
    raise ValueError(
        f"vision.weights: {source} has {len(theirs)} tensors, the timm model {len(ours)} (e.g. missing "
        f"{missing}); is it a checkpoint of vision.name?"
    )


def _create(cfg: VisionConfig) -> tuple[nn.Module, str]:
    """The timm model with the recipe's weights, and a string naming them (for cache keys)."""
    import timm

    name, weights = cfg.name, cfg.weights
    if weights == "embedded":
        if name != EMBEDDED_TIMM:
            raise ValueError(
                f"vision.weights=embedded exists for vision.family=timm only with name={EMBEDDED_TIMM}"
            )
        from adaptkit import assets

        weights = str(assets.efficientnet_lite0_weights())
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        raise ValueError(f"vision.name: timm has no model '{name}' (close: {', '.join(close) or 'none'})")
    if weights in ("", "none", "random"):
        return timm.create_model(name, pretrained=False), "random"
    if Path(weights).suffix in (".pth", ".pt", ".bin", ".safetensors") or Path(weights).exists():
        model = timm.create_model(name, pretrained=False)
        state = match_state_dict(model, load_state_dict(weights), weights)
        model.load_state_dict(state, strict=True)
        return model, cfg.weights
    tagged = name if weights == "pretrained" else f"{name}.{weights}"
    try:
        return timm.create_model(tagged, pretrained=True), cfg.weights
    except Exception as err:  # the hub unreachable, an unknown tag: timm raises several kinds
        raise ValueError(
            f"vision.weights: timm could not load pretrained '{tagged}' ({type(err).__name__}: {err}); "
            "offline, give a local .pth/.safetensors file"
        ) from None


class TimmBackbone(VisionBackbone):
    """A timm model's tokens (see the module docstring)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from timm.data import create_transform, resolve_model_data_config

        model, weights = _create(cfg)
        embed = getattr(model, "patch_embed", None)
        strict = getattr(embed, "strict_img_size", False)
        fixed = tuple(getattr(embed, "img_size", None) or ()) if strict else ()
        if fixed and fixed != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"vision.image_size={cfg.image_size}: timm '{cfg.name}' takes {fixed[0]}x{fixed[1]} images "
                f"(its position embeddings are fixed); set vision.image_size={fixed[0]}"
            )
        self.model = model.eval()
        data = resolve_model_data_config(model)
        data["input_size"] = (3, cfg.image_size, cfg.image_size)
        self.transform = create_transform(**data, is_training=False)
        self.layer = cfg.feature_layer
        self.taps = sorted(set(cfg.extra_layers))
        if self.taps and self.layer != -1 and any(t >= self.layer for t in self.taps):
            raise ValueError(f"vision.extra_layers={cfg.extra_layers} must lie before feature_layer")
        if (self.layer != -1 or self.taps) and not hasattr(model, "forward_intermediates"):
            raise ValueError(
                f"vision.feature_layer / extra_layers: timm '{cfg.name}' has no forward_intermediates; "
                "use feature_layer=-1 and extra_layers=[]"
            )
        try:
            with torch.no_grad():
                probe = self.forward(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        except (AssertionError, IndexError) as err:  # timm's check of the indices asked for
            raise ValueError(
                f"vision.feature_layer={cfg.feature_layer} / extra_layers={cfg.extra_layers}: timm "
                f"'{cfg.name}' has no such stage ({err or type(err).__name__}); the recipe's torchvision "
                "layer numbers do not carry over (extra_layers=[] takes the last stage alone)"
            ) from None
        self.feature_dim = probe.shape[2]
        self.num_tokens = probe.shape[1]
        taps = "+".join(str(i) for i in [*self.taps, self.layer])
        self.identity = f"timm:{cfg.name}:{weights}:layer{taps}:size{cfg.image_size}:{sorted(data.items())}"
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(img.convert("RGB")) for img in images])

    def _maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if self.layer == -1 and not self.taps:
            return [self.model.forward_features(pixels)]
        wanted = [*self.taps, self.layer]
        maps = self.model.forward_intermediates(pixels, indices=wanted, intermediates_only=True)
        if self.layer == -1:  # the last stage through forward_features (its final norm / head conv)
            maps[-1] = self.model.forward_features(pixels)
        return list(maps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        maps = self._maps(pixels.to(param.device, param.dtype))
        if len(maps) == 1 and maps[0].dim() == 3:  # a ViT's tokens (B, N, D), prefix tokens included
            return maps[0]
        if any(m.dim() != 4 for m in maps):
            raise ValueError(
                "vision.extra_layers with timm needs a CNN (feature maps), or a ViT with feature_layer >= 0"
            )
        grid = maps[-1].shape[-2:]
        pooled = [nn.functional.adaptive_avg_pool2d(m, grid) for m in maps[:-1]] + [maps[-1]]
        return torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)
