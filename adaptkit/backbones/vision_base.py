"""What every frozen vision backbone is: ``preprocess(images) -> pixels``, ``forward(pixels) -> (B, T, D)``,
frozen and in eval mode (``VisionBackbone``), and how their state dicts are read (``load_state_dict``:
safetensors, or torch files with ``weights_only=True``). The families live in ``vision.py`` and
``timm_vision.py``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionBackbone(nn.Module):
    """Base class: ``preprocess(images) -> pixels`` and ``forward(pixels) -> (B, T, D)``.

    Attributes:
        feature_dim: D, the width of each token feature.
        num_tokens: T, the tokens per image (what adapters that keep every token are sized by).
        identity: a string that names the weights and preprocessing (used to key feature caches).
    """

    feature_dim: int
    num_tokens: int
    identity: str

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def count_tokens(self) -> int:
        """T, from one probe image through ``preprocess`` and ``forward``."""
        return int(self.forward(self.preprocess([Image.new("RGB", (64, 64), (128, 128, 128))])).shape[1])

    def train(self, mode: bool = True) -> VisionBackbone:
        # Frozen backbones stay in eval mode (batch-norm statistics and dropout never change).
        return super().train(False)

    def freeze(self) -> VisionBackbone:
        for param in self.parameters():
            param.requires_grad_(False)
        return self.eval()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"vision.weights: {file} does not exist (give a .pth or .safetensors state dict)"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state
