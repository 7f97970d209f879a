"""Image features from the frozen vision backbone: computed once per image, or on the fly.

A frozen backbone in eval mode maps an image to the same features every time, so each distinct image
(and each fixed augmented view of it) is encoded once (``FeatureBank``) instead of once per question per
epoch; easy-VQA asks about 10 questions per image. With a ``FeatureCache`` the features persist on disk
across runs and stay there: each batch reads its rows (see ``feature_cache.py``), so memory does not grow
with the number of images. Without one (``feature_cache_dir: none``) they are held in memory.
``cache_features: false`` encodes at every step instead (``pixels.py``).

Features are kept in a storage dtype (``feature_dtype``: float32 by default) and handed to the model as
float32; every path that gives the model features (the bank, the per-step encoder, and
:meth:`MultimodalModel.encode_images` for predict, export and the demo) rounds them the same way, so a
run sees the same numbers however its features were made.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from adaptkit.backbones.vision import VisionBackbone
from adaptkit.data.augment import view_choice, view_key
from adaptkit.data.encoding import BatchEncoder, encode_items
from adaptkit.data.feature_cache import SHARD_IMAGES, FeatureCache, StoredFeatures
from adaptkit.data.formats import DataError
from adaptkit.data.images import content_keys

if TYPE_CHECKING:
    from adaptkit.config import AugmentConfig
    from adaptkit.data.colour_names import Colour

log = logging.getLogger(__name__)

#: images the adapter's feature statistics are taken from at most (evenly spaced beyond that): plenty for a
#: per-dimension mean and std, and a one-time cost that does not grow with the store.
STATS_IMAGES = 8192


@dataclass
class _Encoding:
    """What a bank needs to encode more of its images' views later (:meth:`FeatureBank.add_views`)."""

    backbone: VisionBackbone
    origins: dict[str, str]
    device: torch.device
    batch_size: int
    skip_bad: bool
    desc: str
    disable_progress: bool
    cache: FeatureCache | None
    augment: AugmentConfig | None
    dtype: torch.dtype
    compile: bool
    colours: dict[str, Colour]
    keys: dict[str, str]
    encoder: BatchEncoder | None = None

    def batch_encoder(self, items: int) -> BatchEncoder:
        """One encoder for the bank's passes: compiled once, where a pass's size first calls for it (and
        never tried again once compiling failed)."""
        if self.encoder is None or (self.encoder.graph is None and not self.encoder.failed):
            self.encoder = BatchEncoder.for_work(
                self.backbone, self.device, self.batch_size, self.compile, items
            )
        return self.encoder


class FeatureBank:
    """Features of a fixed set of images, looked up by row: read from the disk cache per lookup, or held
    in memory when there is no cache.

    With augmented views (``augment.views = K``), each image row has K + 1 entries: view 0 is the image
    itself, views 1..K its fixed augmented copies (``augment.py``). ``slots[v, r]`` is where view ``v`` of
    row ``r`` sits in ``source``, -1 where it was not encoded: training encodes only the views its
    schedule of steps shows (:meth:`add_views`).

    Attributes:
        rows: image path → row.
        source: the encoded features in the storage dtype: a tensor in memory, or
            :class:`~adaptkit.data.feature_cache.StoredFeatures` read on demand.
        slots: ``(K + 1, N)`` int64, view and row → index into ``source`` (-1: not encoded).
        bad: image path → reason, for images that could not be decoded (only with ``skip_bad``).
        views: K, the augmented views per image (0: none).
        device: where lookups put their float32 features.
    """

    def __init__(
        self,
        source: torch.Tensor | StoredFeatures | None,
        rows: dict[str, int],
        bad: dict[str, str],
        views: int = 0,
        seed: int = 0,
        device: torch.device | None = None,
        slots: torch.Tensor | None = None,
    ) -> None:
        """``slots`` None: ``source`` holds every view of every row, view-major (``v * N + r``)."""
        self.source = source
        self.rows = rows
        self.bad = bad
        self.views = views
        self.seed = seed
        self.device = device or torch.device("cpu")
        if slots is None and source is not None:
            slots = torch.arange(len(source)).view(views + 1, -1)
        self.slots = slots
        self._encoding: _Encoding | None = None
        self._stored_keys: list[str] = []  # the cache's item keys, in ``source`` order

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
        colours: dict[str, Colour] | None = None,
        defer_views: bool = False,
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
            defer_views: encode the images themselves now and their augmented views later, those
                :meth:`add_views` is given (the ones a run's steps show).
        """
        unique = list(dict.fromkeys(paths))
        views = augment.views if augment is not None else 0
        bad: dict[str, str] = {}
        keys = content_keys(unique, origins, skip_bad, bad) if cache is not None or views else {}
        bank = cls(None, {}, bad, views, seed, device)
        bank._encoding = _Encoding(
            backbone, origins, torch.device(device), batch_size, skip_bad, desc, disable_progress, cache,
            augment, dtype, compile, colours or {}, keys,
        )  # fmt: skip
        readable = [p for p in (keys if cache is not None else unique) if p not in bad]
        now = 1 if defer_views else views + 1
        good = bank._encode([(p, v) for v in range(now) for p in readable])
        bank.rows = {path: i for i, path in enumerate(p for p, v in good if v == 0)}
        if not bank.rows:
            raise DataError("no image could be decoded")
        bank.slots = torch.full((views + 1, len(bank.rows)), -1, dtype=torch.int64)
        bank._place(good, 0)
        return bank

    def _place(self, items: list[tuple[str, int]], start: int) -> None:
        """Record that ``items`` sit at ``source[start:]``, in order."""
        views = torch.tensor([v for _, v in items], dtype=torch.int64)
        rows = torch.tensor([self.rows[p] for p, _ in items], dtype=torch.int64)
        self.slots[views, rows] = torch.arange(start, start + len(items))

    def _encode(self, items: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Encode (or, with a cache, read) ``(path, view)`` items and append them to ``source``; returns
        the decodable ones, in their new order in ``source``."""
        enc = self._encoding
        desc = enc.desc if any(v == 0 for _, v in items) else "encoding augmented views"
        common = (enc.origins, enc.batch_size, enc.skip_bad, self.bad)
        extra = (enc.augment, enc.keys, enc.colours)
        if enc.cache is None:
            with tqdm(total=len(items), desc=desc, unit="img", disable=enc.disable_progress) as bar:
                good, feats = encode_items(enc.batch_encoder(len(items)), items, *common, bar, *extra)
            if feats:  # items run view-major: the chunks are in the order given
                new = torch.cat([f.to(enc.dtype) for f in feats])
                self.source = new if self.source is None else torch.cat([self.source, new])
            return good
        item_key = {(p, v): view_key(enc.keys[p], enc.augment, v, enc.colours.get(p)) for p, v in items}
        with enc.cache.lock():
            missing = set(enc.cache.missing(list(item_key.values())))
            todo = [item for item in items if item_key[item] in missing]
            with tqdm(
                total=len(todo), desc=desc, unit="img", disable=enc.disable_progress or not todo
            ) as bar:
                encoder = enc.batch_encoder(len(todo))
                for start in range(0, len(todo), SHARD_IMAGES):
                    done, feats = encode_items(
                        encoder, todo[start : start + SHARD_IMAGES], *common, bar, *extra
                    )
                    if done:
                        enc.cache.put([item_key[item] for item in done], torch.cat(feats))
            good = [item for item in items if item[0] not in self.bad]
            self._stored_keys += [item_key[item] for item in good]
            self.source = enc.cache.stored(self._stored_keys) if self._stored_keys else None
        shown = [v > 0 for _, v in items]
        kinds = "augmented views" if all(shown) else "images and views" if any(shown) else "images"
        log.info(
            "feature cache %s: %s: %d read, %d encoded and added",
            enc.cache.dir,
            kinds,
            len(items) - len(todo),
            len(todo) - sum(p in self.bad for p, _ in todo),
        )
        return good

    def add_views(self, shown: torch.Tensor | None = None) -> int:
        """Encode the augmented views ``shown`` (``(K + 1, N)`` bool, view and row; None: all of them) that
        the bank lacks; returns how many it encoded or read."""
        if not self.views:
            return 0
        wanted = torch.ones_like(self.slots, dtype=torch.bool) if shown is None else shown.clone()
        wanted[0] = False  # the images themselves are always there
        wanted &= self.slots < 0
        paths = list(self.rows)
        items = [
            (paths[r], v) for v in range(1, self.views + 1) for r in wanted[v].nonzero().flatten().tolist()
        ]
        if items:
            start = len(self.source)
            self._place(self._encode(items), start)
        return len(items)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source[index.to(self.source.device)]
        return self.source.read(index)

    def _read(self, index: torch.Tensor) -> torch.Tensor:
        return self.finish(self._gather(index))

    @property
    def loadable_elsewhere(self) -> bool:
        """Whether another process (a DataLoader worker) can read rows: from the disk store or CPU memory,
        not from a GPU."""
        return not isinstance(self.source, torch.Tensor) or self.source.device.type == "cpu"

    def load(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The stored rows :meth:`lookup` returns, as stored (storage dtype, where the source keeps them):
        what a DataLoader worker reads ahead of the step; :meth:`finish` makes them the step's features."""
        rows = rows.to(torch.int64).cpu()
        views = torch.zeros_like(rows)
        if step is not None and self.views:
            views = view_choice(self.seed, step, self.views, rows)
        index = self.slots[views, rows]
        if bool((index < 0).any()):
            lacking = int((index < 0).nonzero()[0, 0])
            raise RuntimeError(
                f"view {int(views[lacking])} of image row {int(rows[lacking])} (step {step}) was never "
                "encoded: the bank holds the views its run's schedule shows; this is a bug, please report it"
            )
        return self._gather(index)

    def finish(self, loaded: torch.Tensor) -> torch.Tensor:
        """Rows :meth:`load` read, as float32 features on the bank's device."""
        return loaded.to(self.device, torch.float32, non_blocking=True)

    def lookup(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Float32 features of image ``rows`` on the bank's device; with ``step`` (training) each row shows
        the view :func:`view_choice` picks for that step, otherwise the image itself."""
        return self.finish(self.load(rows, step))

    def all(self) -> torch.Tensor:
        """Every encoded row, view by view, as one float32 tensor in memory (for small sets and tests)."""
        return self._read(self.slots[self.slots >= 0])

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
            feats = self._read(self.slots[0, part])
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
