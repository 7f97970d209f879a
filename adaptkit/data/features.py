"""Image features from the frozen vision backbone: computed once per image, or on the fly.

A frozen backbone in eval mode maps an image to the same features every time, so each distinct image
(and each fixed augmented view of it) is encoded once (``FeatureBank``) instead of once per question per
epoch; easy-VQA asks about 10 questions per image. With a ``FeatureCache`` the features persist on disk
across runs and stay there: each batch reads its rows (see ``feature_cache.py``), so memory does not grow
with the number of images. Without one (``feature_cache_dir: none``) they are held in memory.
``OnTheFlyFeatures`` encodes at every step and is what ``cache_features: false`` selects.

Features are kept in a storage dtype (``feature_dtype``: float32 by default) and handed to the model as
float32; every path that gives the model features (the bank, the per-step encoder, and
:meth:`MultimodalModel.encode_images` for predict, export and the demo) rounds them the same way, so a
run sees the same numbers however its features were made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from adaptkit.backbones.vision import VisionBackbone
from adaptkit.data.augment import make_view, view_choice, view_key
from adaptkit.data.feature_cache import SHARD_IMAGES, FeatureCache, StoredFeatures, file_key
from adaptkit.data.formats import DataError
from adaptkit.data.images import content_keys, open_image

if TYPE_CHECKING:
    from adaptkit.config import AugmentConfig

log = logging.getLogger(__name__)

#: images the adapter's feature statistics are taken from at most (evenly spaced beyond that): plenty for a
#: per-dimension mean and std, and a one-time cost that does not grow with the store.
STATS_IMAGES = 8192

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
            self.graph = None
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
    colours: dict[str, str] | None = None,
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


class FeatureBank:
    """Features of a fixed set of images, looked up by row: read from the disk cache per lookup, or held
    in memory when there is no cache.

    With augmented views (``augment.views = K``), row ``r`` of view ``v`` sits at ``v * len(rows) + r``:
    view 0 is the image itself, views 1..K its fixed augmented copies (``augment.py``).

    Attributes:
        rows: image path → row.
        source: the ``((K + 1) N, T, D)`` features in the storage dtype: a tensor in memory, or
            :class:`~adaptkit.data.feature_cache.StoredFeatures` read on demand.
        bad: image path → reason, for images that could not be decoded (only with ``skip_bad``).
        views: K, the augmented views per image (0: none).
        device: where lookups put their float32 features.
    """

    def __init__(
        self,
        source: torch.Tensor | StoredFeatures,
        rows: dict[str, int],
        bad: dict[str, str],
        views: int = 0,
        seed: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.source = source
        self.rows = rows
        self.bad = bad
        self.views = views
        self.seed = seed
        self.device = device or torch.device("cpu")

    @property
    def shape(self) -> tuple[int, ...]:
        """``(T, D)`` of one image's features."""
        return tuple(self.source.shape[1:])

    @classmethod
    def compute(
        cls,
        backbone: VisionBackbone,
        paths: Sequence[str],
        origins: dict[str, str],
        device: torch.device,
        batch_size: int = 64,
        skip_bad: bool = False,
        desc: str = "encoding images",
        disable_progress: bool = False,
        cache: FeatureCache | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        colours: dict[str, str] | None = None,
    ) -> FeatureBank:
        """Encode each distinct image (and each of its augmented views) once, with a progress bar; with
        ``cache``, only the ones it lacks.

        Args:
            origins: image path → the ``file:line`` of a sample that uses it (for errors).
            skip_bad: record undecodable images in ``bad`` instead of raising.
            cache: a disk cache for this backbone (its dtype wins): cached images read, others added.
            augment: with ``augment.views = K > 0``, also K fixed augmented views of every image;
                ``colours``: image → the colour name its answers give it (``augment.shades``).
            seed: the run's seed, which (with the step) picks the view each image shows.
            dtype: storage dtype of features held in memory (no ``cache``).
            compile: encode through a compiled backbone (:class:`BatchEncoder`) where it pays: on CPU, with
                at least ``COMPILE_MIN_IMAGES`` images and views to encode.
        """
        unique = list(dict.fromkeys(paths))
        views = augment.views if augment is not None else 0
        bad: dict[str, str] = {}
        keys = content_keys(unique, origins, skip_bad, bad) if cache is not None or views else {}
        source: torch.Tensor | StoredFeatures | None = None
        if cache is None:
            readable = [p for p in unique if p not in bad]
            items = [(p, v) for v in range(views + 1) for p in readable]
            with tqdm(total=len(items), desc=desc, unit="img", disable=disable_progress) as bar:
                encode = BatchEncoder.for_work(backbone, device, batch_size, compile, len(items))
                _, feats = encode_items(
                    encode, items, origins, batch_size, skip_bad, bad, bar, augment, keys, colours
                )
            done = [p for p in readable if p not in bad]
            # Items run view-major: the chunks are in the bank's order (view * len(done) + row).
            source = torch.cat([f.to(dtype) for f in feats]) if feats else None
        else:
            named = colours or {}
            item_key = {
                (p, v): view_key(keys[p], augment, v, named.get(p)) for v in range(views + 1) for p in keys
            }
            with cache.lock():
                missing = set(cache.missing(list(item_key.values())))
                todo = [item for item in item_key if item_key[item] in missing]
                with tqdm(
                    total=len(todo), desc=desc, unit="img", disable=disable_progress or not todo
                ) as bar:
                    encode = BatchEncoder.for_work(backbone, device, batch_size, compile, len(todo))
                    for start in range(0, len(todo), SHARD_IMAGES):
                        chunk = todo[start : start + SHARD_IMAGES]
                        good, feats = encode_items(
                            encode, chunk, origins, batch_size, skip_bad, bad, bar, augment, keys, colours
                        )
                        if good:
                            cache.put([item_key[item] for item in good], torch.cat(feats))
                done = [path for path in keys if path not in bad]
                wanted = [item_key[(p, v)] for v in range(views + 1) for p in done]
                source = cache.stored(wanted) if done else None
            log.info(
                "feature cache %s: %d images%s read, %d encoded and added",
                cache.dir,
                len(item_key) - len(todo),
                f" and views (x{views + 1})" if views else "",
                len(todo) - sum(p in bad for p, _ in todo),
            )
        if source is None:
            raise DataError("no image could be decoded")
        rows = {path: i for i, path in enumerate(done)}
        return cls(source, rows, bad, views, seed, device)

    def _read(self, index: torch.Tensor) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            picked = self.source[index.to(self.source.device)]
        else:
            picked = self.source.read(index)
        return picked.to(self.device, torch.float32, non_blocking=True)

    def lookup(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Float32 features of image ``rows`` on the bank's device; with ``step`` (training) each row shows
        the view :func:`view_choice` picks for that step, otherwise the image itself."""
        index = rows.to(torch.int64).cpu()
        if step is not None and self.views:
            index = index + view_choice(self.seed, step, self.views, index) * len(self.rows)
        return self._read(index)

    def all(self) -> torch.Tensor:
        """Every row, views included, as one float32 tensor in memory (for small sets and tests)."""
        return self._read(torch.arange(len(self.source)))

    def stats(self, chunk: int = 64, limit: int = STATS_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std over every token of the images themselves (not views): of all of them
        up to ``limit`` images, else of ``limit`` images evenly spaced over the set. Read ``chunk`` images
        at a time and merged in float64 (Chan et al.'s pairwise update), so memory stays flat and a store
        of any size costs at most ``limit`` images' reading."""
        n_images = len(self.rows)
        rows = torch.arange(n_images)
        if n_images > limit:
            rows = torch.linspace(0, n_images - 1, limit).round().to(torch.int64)
        count, mean, m2 = 0, None, None
        for part in rows.split(chunk):
            feats = self._read(part)
            flat = feats.reshape(-1, feats.shape[-1])
            var, m = torch.var_mean(flat, dim=0, correction=0)
            n, m, s = flat.shape[0], m.double(), var.double() * flat.shape[0]
            if mean is None:
                count, mean, m2 = n, m, s
                continue
            delta = m - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + s + delta**2 * (count * n / total)
            count = total
        std = (m2 / max(count - 1, 1)).sqrt()
        return mean.float(), std.float()


class OnTheFlyFeatures:
    """Encodes the images of each batch at every step (no caching); with augmented views, the same views
    a :class:`FeatureBank` would hold, made again at each lookup."""

    def __init__(
        self,
        backbone: VisionBackbone,
        paths: Sequence[str],
        device: torch.device,
        origins: dict[str, str] | None = None,
        skip_bad: bool = False,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        colours: dict[str, str] | None = None,
    ) -> None:
        """Every image is decoded once up front, so a bad one is known (skipped or raised) before training.
        ``dtype``: the storage dtype features are rounded through, as a bank would store them."""
        self.colours = colours or {}
        self.backbone = backbone
        self.device = device
        self.dtype = dtype
        self.augment = augment
        self.views = augment.views if augment is not None else 0
        self.seed = seed
        self.bad: dict[str, str] = {}
        self.paths = []
        for path in dict.fromkeys(paths):
            try:
                open_image(path, (origins or {}).get(path, ""))
                self.paths.append(path)
            except DataError as err:
                if not skip_bad:
                    raise
                self.bad[path] = str(err)
        if not self.paths:
            raise DataError("no image could be decoded")
        self.rows = {path: i for i, path in enumerate(self.paths)}
        self.keys = {path: file_key(path) for path in self.paths} if self.views else {}

    def lookup(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Encodes image ``rows`` (with ``step``: the views :func:`view_choice` picks, like FeatureBank)."""
        rows = rows.to(torch.int64).cpu()
        views = view_choice(self.seed, step, self.views, rows) if step is not None else torch.zeros_like(rows)
        images = []
        for r, v in zip(rows.tolist(), views.tolist()):
            path = self.paths[r]
            key, colour = self.keys.get(path, ""), self.colours.get(path)
            images.append(make_view(open_image(path), key, self.augment, v, colour))
        return encode_images(self.backbone, images, self.device, self.dtype)

    def stats(self, max_images: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std estimated from the first ``max_images`` images."""
        rows = torch.arange(min(max_images, len(self.paths)))
        feats = torch.cat([self.lookup(chunk) for chunk in rows.split(64)])
        flat = feats.reshape(-1, feats.shape[-1])
        return flat.mean(0), flat.std(0)
