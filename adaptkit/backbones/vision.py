"""Frozen vision backbones behind one interface: images in, token features ``(B, T, D)`` out.

Three families:

- ``torchvision``: a torchvision classification CNN with a ``features`` trunk (MobileNet, EfficientNet,
  ConvNeXt, ...); the spatial grid of a trunk layer becomes the tokens. ``weights: embedded`` loads the
  packaged ImageNet MobileNetV2; otherwise a local ``.pth`` (read with ``weights_only=True``) or
  ``.safetensors`` state dict.
- ``hf``: any Hugging Face vision model (ViT, or the vision tower of CLIP / SigLIP) from a hub id or
  a local folder; tokens are a hidden-state layer; preprocessing is the model's own image processor.
- ``open_clip``: an open_clip architecture name plus a local checkpoint path (or a pretrained tag,
  which needs the hub); tokens are the ViT's patch tokens.
- ``timm``: any timm model (CNN or ViT), tokens from ``forward_features`` (``timm_vision.py``).

Each backbone is frozen (``requires_grad=False``) and kept in eval mode, whatever the caller does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from adaptkit.config import VisionConfig


from adaptkit.backbones.vision_base import IMAGENET_MEAN, IMAGENET_STD, VisionBackbone, load_state_dict

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VisionBackbone", "build_vision_backbone", "load_state_dict"]


class TorchvisionBackbone(VisionBackbone):
    """A torchvision CNN trunk; the feature map at ``feature_layer`` becomes ``H*W`` tokens.

    ``extra_layers`` adds earlier trunk layers: their maps are average-pooled to the final grid and
    concatenated on channels, so each token also carries low-level cues (colour, edges) that the last,
    most semantic layer keeps only weakly.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        import torchvision

        from adaptkit import assets

        builder = getattr(torchvision.models, cfg.name, None)
        if builder is None:
            raise ValueError(f"vision.name: torchvision has no model '{cfg.name}'")
        model = builder(weights=None)
        if not hasattr(model, "features"):
            raise ValueError(
                f"vision.name: torchvision '{cfg.name}' has no `features` trunk; use a MobileNet, "
                "EfficientNet, ConvNeXt, VGG or similar"
            )
        if cfg.weights == "embedded":
            if cfg.name != "mobilenet_v2":
                raise ValueError("vision.weights=embedded exists only for vision.name=mobilenet_v2")
            path = str(assets.mobilenet_v2_weights())
        else:
            path = cfg.weights
        if cfg.weights not in ("", "none", "random"):
            model.load_state_dict(load_state_dict(path), strict=True)
        layers = list(model.features.children())
        index = cfg.feature_layer if cfg.feature_layer >= 0 else len(layers) + cfg.feature_layer
        if not 0 <= index < len(layers):
            raise ValueError(f"vision.feature_layer={cfg.feature_layer} is outside 0..{len(layers) - 1}")
        extra = sorted({i if i >= 0 else len(layers) + i for i in cfg.extra_layers})
        if any(not 0 <= i < index for i in extra):
            raise ValueError(
                f"vision.extra_layers={cfg.extra_layers} must lie before feature_layer ({index})"
            )
        self.trunk = nn.Sequential(*layers[: index + 1])
        self.taps = extra
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.image_size = cfg.image_size
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        self.feature_dim = probe.shape[2]
        self.num_tokens = probe.shape[1]
        taps = "+".join(str(i) for i in [*extra, index])
        self.identity = f"torchvision:{cfg.name}:{cfg.weights}:layer{taps}:size{cfg.image_size}"
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arrays = [
            torch.frombuffer(
                bytearray(img.convert("RGB").resize(size, Image.BICUBIC).tobytes()), dtype=torch.uint8
            )
            for img in images
        ]
        pixels = torch.stack(arrays).view(len(images), self.image_size, self.image_size, 3)
        return pixels.permute(0, 3, 1, 2).float().div_(255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(self.mean.device) - self.mean) / self.std
        maps = []
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in self.taps:
                maps.append(x)
        maps = [nn.functional.adaptive_avg_pool2d(m, x.shape[-2:]) for m in maps] + [x]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


class HFVisionBackbone(VisionBackbone):
    """A transformers vision model (ViT, CLIP/SigLIP vision tower) from a hub id or local folder."""

    def __init__(self, cfg: VisionConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        from adaptkit.backbones.language import quantization_config

        quant = quantization_config(cfg)
        kwargs = {"quantization_config": quant, "device_map": {"": str(device)}} if quant is not None else {}
        model = AutoModel.from_pretrained(cfg.name, **kwargs)
        self.model = getattr(model, "vision_model", model)
        self.processor = AutoImageProcessor.from_pretrained(cfg.name)
        config = self.model.config
        self.feature_dim = getattr(config, "hidden_size", None) or config.vision_config.hidden_size
        self.feature_layer = cfg.feature_layer
        quant_tag = "" if cfg.quant == "none" else f":{cfg.quant}-{cfg.compute_dtype}"
        self.identity = f"hf:{cfg.name}:layer{cfg.feature_layer}{quant_tag}"
        self.freeze()
        self.num_tokens = self.count_tokens()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [img.convert("RGB") for img in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(p for p in self.model.parameters() if p.is_floating_point())
        out = self.model(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


class OpenCLIPBackbone(VisionBackbone):
    """An open_clip ViT's patch tokens; ``weights`` is a local checkpoint file or a pretrained tag."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        import open_clip

        pretrained = cfg.weights if cfg.weights not in ("", "none", "random") else None
        if (
            pretrained
            and not Path(pretrained).is_file()
            and pretrained not in open_clip.list_pretrained_tags_by_model(cfg.name)
        ):
            raise FileNotFoundError(
                f"vision.weights: '{pretrained}' is neither a file nor a pretrained tag "
                f"of open_clip '{cfg.name}'"
            )
        model, _, transform = open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained)
        visual = model.visual
        if not hasattr(visual, "output_tokens") or not hasattr(visual, "transformer"):
            raise ValueError(
                f"vision.name: open_clip '{cfg.name}' is not a ViT; token features need a ViT tower"
            )
        visual.output_tokens = True
        self.visual = visual
        self.transform = transform
        self.feature_dim = visual.transformer.width
        self.identity = f"open_clip:{cfg.name}:{cfg.weights}"
        self.freeze()
        self.num_tokens = self.count_tokens()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(img.convert("RGB")) for img in images])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.visual.parameters())
        _, tokens = self.visual(pixels.to(param.device, param.dtype))
        return tokens


VISION_FAMILIES: dict[str, type[VisionBackbone]] = {
    "torchvision": TorchvisionBackbone,
    "hf": HFVisionBackbone,
    "open_clip": OpenCLIPBackbone,
}


def build_vision_backbone(cfg: VisionConfig, device: torch.device | str = "cpu") -> VisionBackbone:
    """Build the frozen vision backbone a recipe names, on ``device``.

    A quantized backbone (``vision.quant``: 8bit / 4bit, HF models only) is placed by its loader.
    """
    if cfg.quant != "none":
        if cfg.family != "hf":
            raise ValueError(f"vision.quant={cfg.quant} needs vision.family=hf")
        return HFVisionBackbone(cfg, device)
    if cfg.family == "timm":
        from adaptkit.backbones.timm_vision import TimmBackbone

        return TimmBackbone(cfg).to(device)
    return VISION_FAMILIES[cfg.family](cfg).to(device)
