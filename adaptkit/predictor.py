"""The base of every task's predictor: a loaded model, its recipe, image decoding and encoding.

A task's predictor (``Task.predictor``; VQA's :class:`adaptkit.tasks.vqa.VQAPredictor`) adds what the task
returns. ``predict(image, text)`` is the one call the CLI's ``predict`` and the demo make; its result has
``text``, ``score``, ``top`` (ranked ``(label, probability)`` pairs) and ``to_dict()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from adaptkit.data.images import ImageInput, to_image


class Predictor(ABC):
    """A trained model ready for inference (see the module docstring).

    Args:
        model: the loaded :class:`~adaptkit.model.multimodal.MultimodalModel`.
        recipe: its recipe.
        task: its task (``adaptkit.tasks``).
        info: the facts :meth:`facts` returns (``adaptkit.inference.describe``).
        device: where the model lives.
    """

    def __init__(self, model, recipe, task, info: dict, device) -> None:
        self.model = model.eval()
        self.recipe = recipe
        self.task = task
        self.info = info
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Frozen-backbone features ``(B, T, D)`` of the images."""
        decoded = [to_image(img, f"image {i}") for i, img in enumerate(images)]
        return self.model.encode_images(decoded)

    @abstractmethod
    def predict(self, image: ImageInput, text: str | None = None, top_k: int = 5):
        """The task's output for one image (and the text the task reads, e.g. a question)."""

    def facts(self) -> dict:
        """What the model is: backbones, adapter, parameter counts, its recorded metric."""
        return dict(self.info)
