"""The base of every task's predictor: a loaded model, its recipe, image decoding and encoding.

A task's predictor (``Task.predictor``; VQA's :class:`adaptkit.tasks.vqa.VQAPredictor`) adds what the task
returns. ``predict(image, text)`` is the one call the CLI's ``predict`` and the demo make; its result has
``text``, ``score``, ``top`` (ranked ``(label, probability)`` pairs) and ``to_dict()``.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adaptkit.data.features import UnusableImage, decode_image, encode_images, open_image, to_rgb
from adaptkit.data.formats import DataError

ImageInput = str | Path | bytes | Image.Image | np.ndarray


def to_image(image: ImageInput, name: str = "image") -> Image.Image:
    """Decode any supported image input to RGB, exactly as training images are (:func:`decode_image`).

    Raises:
        DataError: the input is not an image PIL can decode (message names ``name`` or the file).
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        try:
            return to_rgb(Image.fromarray(image))
        except (TypeError, ValueError) as err:
            raise DataError(f"{name}: array of shape {image.shape} is not an image ({err})") from None
    if isinstance(image, bytes | bytearray):
        try:
            if not image:
                raise UnusableImage("is empty (0 bytes)")
            return decode_image(io.BytesIO(image))
        except UnusableImage as err:
            raise DataError(
                f"{name}: the bytes are not an image PIL can decode (the data {err.reason})"
            ) from None
    if isinstance(image, str | Path):
        return open_image(str(image))
    raise DataError(f"{name}: expected a path, bytes, PIL image or array, got {type(image).__name__}")


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
        return encode_images(self.model.vision, decoded, self.device)

    @abstractmethod
    def predict(self, image: ImageInput, text: str | None = None, top_k: int = 5):
        """The task's output for one image (and the text the task reads, e.g. a question)."""

    def facts(self) -> dict:
        """What the model is: backbones, adapter, parameter counts, its recorded metric."""
        return dict(self.info)
