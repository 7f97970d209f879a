"""Encoding images with the frozen vision backbone: one list at a time (``encode_images``), or batches of
``(path, view)`` items through an eager or compiled backbone (``BatchEncoder``, ``encode_items``), as the
feature bank (``features.py``) fills its store."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from adaptkit.backbones.vision import VisionBackbone
from adaptkit.data.augment import make_view
from adaptkit.data.formats import DataError
from adaptkit.data.images import open_image

if TYPE_CHECKING:
    from adaptkit.config import AugmentConfig
    from adaptkit.data.colour_names import Colour

log = logging.getLogger(__name__)

#: images and views to encode from which ``vision.compile`` compiles the backbone: below it compiling (6-19 s
#: for MobileNetV2 on 2 CPU cores, less when inductor's cache has it) costs about what it saves (~9 ms per
#: image; ``benchmarks/encoding.py``).
COMPILE_MIN_IMAGES = 2048


@torch.no_grad()
def encode_images(
    backbone: VisionBackbone,
    images: list[Image.Image],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Preprocess and encode a list of PIL images to ``(B, T, D)`` float32 features on ``device``, rounded
    through the storage ``dtype`` (float32: as computed)."""
    pixels = backbone.preprocess(images).to(device)
    return backbone(pixels).to(dtype).float()


class BatchEncoder:
    """Encodes lists of images with the frozen backbone, eager or (``compiled``) through ``torch.compile``
    with inductor's freezing: the weights become constants of the graph and batch norm folds into the
    convolutions, which on 2 CPU cores makes MobileNetV2 at 224 px 1.7x faster (docs/benchmarks.md,
    "Encoding"). The graph is compiled once, for ``batch_size`` images; a shorter batch is padded to it
    (each image's features depend on its own pixels only). Compiled kernels round differently: features
    differ from eager ones by ~2e-5 of their scale (eager batches of different sizes differ too, less).
    Where compiling fails (no C++ compiler, an op inductor lacks) the log says so once and encoding goes on
    eager.

    Attributes:
        compile_s: what compiling took (the first compiled batch's time), 0 when eager.
        failed: compiling was tried and failed (the encoder went on eager).
    """

    def __init__(
        self,
        backbone: VisionBackbone,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        compiled: bool = False,
    ) -> None:
        self.backbone, self.device, self.dtype, self.batch_size = backbone, device, dtype, batch_size
        self.graph = None
        if compiled:
            self.graph = torch.compile(backbone, dynamic=False, options={"freezing": True})
        self.compile_s = 0.0
        self.failed = False
        self._calls = 0

    @classmethod
    def for_work(cls, backbone, device, batch_size: int, compile: bool, images: int) -> BatchEncoder:
        """An encoder for ``images`` images and views, compiled where ``compile`` asks and it pays: on
        CPU (CUDA untried), from ``COMPILE_MIN_IMAGES`` images."""
        worth = compile and torch.device(device).type == "cpu" and images >= COMPILE_MIN_IMAGES
        return cls(backbone, torch.device(device), batch_size=batch_size, compiled=worth)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, T, D)`` float32 features of ``images`` on ``device``, rounded through the storage dtype."""
        pixels = self.backbone.preprocess(images).to(self.device)
        count = len(pixels)
        if self.graph is None or count > self.batch_size:
            return self.backbone(pixels).to(self.dtype).float()
        batch = pixels
        if count < self.batch_size:
            batch = torch.cat([pixels, pixels.new_zeros(self.batch_size - count, *pixels.shape[1:])])
        batch = batch.contiguous()  # one layout for every batch: the graph's guards check strides
        start = time.perf_counter()
        try:
            feats = self.graph(batch)[:count]
        except Exception as err:  # torch.compile's failures have no common base class
            if self._calls:
                raise
            log.warning("compiling the vision backbone failed, encoding eager instead: %s", err)
            self.graph, self.failed = None, True
            return self.backbone(pixels).to(self.dtype).float()
        if not self._calls:
            self.compile_s = time.perf_counter() - start
            what = "compiled the vision backbone for batches of %d images in %.1f s"
            log.info(what, self.batch_size, self.compile_s)
        self._calls += 1
        return feats.to(self.dtype).float()


def encode_items(
    encoder: BatchEncoder,
    items: Sequence[tuple[str, int]],
    origins: dict[str, str],
    batch_size: int,
    skip_bad: bool,
    bad: dict[str, str],
    bar: tqdm,
    augment: AugmentConfig | None = None,
    image_keys: dict[str, str] | None = None,
    colours: dict[str, Colour] | None = None,
) -> tuple[list[tuple[str, int]], list[torch.Tensor]]:
    """Encode ``(path, view)`` items in batches (view 0: the image itself, v >= 1: augmented view v, see
    ``augment.py``; ``colours``: image → the colour name its answers give it); returns the decodable items
    and their feature chunks, in order."""
    good: list[tuple[str, int]] = []
    chunks: list[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        batch_items, images = [], []
        for path, view in items[start : start + batch_size]:
            if path in bad:
                continue
            try:
                img = open_image(path, origins.get(path, ""))
            except DataError as err:
                if not skip_bad:
                    raise
                bad[path] = str(err)
                continue
            colour = (colours or {}).get(path)
            images.append(make_view(img, (image_keys or {}).get(path, ""), augment, view, colour))
            batch_items.append((path, view))
        if images:
            chunks.append(encoder(images))
            good += batch_items
        bar.update(min(batch_size, len(items) - start))
    return good, chunks
