"""A disk cache of frozen-backbone image features, shared by every run that uses the same backbone.

A frozen vision backbone in eval mode, with no image augmentation, maps an image to the same
features every time; computing them once per image and keeping them on disk means the second run
of a recipe (or an eval, or a sweep) never touches the backbone again.

Layout: ``ROOT/<backbone key>/shard-*.safetensors`` plus ``info.json`` (what the key stands for).
Each shard holds one ``features`` tensor ``(N, T, D)`` in the storage dtype (recipe key
``feature_dtype``) and, in its metadata, the N image keys.

The store does not live in memory: :meth:`FeatureCache.stored` indexes the rows a run needs, and each
batch's rows are read with positioned reads (``os.preadv``) straight into the batch tensor, so a run's
memory does not grow with the number of images (the operating system's page cache keeps hot shards
without counting against the process). Several processes may read one store at once.

- The **backbone key** hashes the backbone's identity, every parameter and buffer byte, the pixels
  its preprocessing makes of a fixed probe image (so any change of size, resize filter or
  normalisation shows), the storage dtype, the device type and the torch version.
- The **image key** hashes the image file's bytes, so an edited image is a new key.

Any change therefore lands in another folder or misses; nothing is ever invalidated in place.
Shards are written to a temporary name and renamed, under a file lock, so an interrupted fill
leaves only complete shards; a damaged shard is reported and ignored (its images are recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

FORMAT_VERSION = "1"
SHARD_IMAGES = 1024  # images per shard written during a fill (a crash loses at most one shard's work)


def file_key(path: str | Path) -> str:
    """The cache key of an image file: a digest of its bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _probe_image() -> Image.Image:
    """A fixed, non-square, colourful test image: preprocessing changes change its pixels."""
    ramp = torch.arange(97 * 61 * 3, dtype=torch.int64).remainder(251).to(torch.uint8)
    return Image.frombytes("RGB", (97, 61), bytes(ramp.tolist()))


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A blake2b digest of named tensors' names and bytes (weights, buffers)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_key(backbone, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """Describe and hash everything that decides a backbone's features; returns ``info`` with ``key``."""
    weights = tensor_digest(list(backbone.named_parameters()) + list(backbone.named_buffers()))
    pixels = backbone.preprocess([_probe_image()]).float().contiguous()
    preprocessing = hashlib.blake2b(pixels.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16)
    info = {
        "format": FORMAT_VERSION,
        "backbone": backbone.identity,
        "weights_digest": weights,
        "preprocessing_digest": preprocessing.hexdigest(),
        "dtype": str(dtype).removeprefix("torch."),  # the storage dtype
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
    }
    info["key"] = hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=12).hexdigest()
    return info


def unwritable(root: str | Path, err: OSError):
    """The error for a feature cache folder that cannot be written (read-only, full disk)."""
    from adaptkit.data.records import DataError

    return DataError(
        f"feature_cache_dir {root}: cannot write there ({err.strerror or err}); set feature_cache_dir to a "
        "writable folder with room, or to none to keep the features in memory only"
    )


class FeatureCache:
    """The cache folder of one backbone. ``stored`` looks up image keys, ``put`` appends a shard."""

    def __init__(self, root: str | Path, info: dict) -> None:
        self.info = info
        self.dir = Path(root).expanduser() / info["key"]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            info_file = self.dir / "info.json"
            if not info_file.exists():
                tmp = info_file.with_name(f".info.{uuid.uuid4().hex}.tmp")
                tmp.write_text(json.dumps(info, indent=2) + "\n")
                tmp.replace(info_file)
            probe = self.dir / f".writable.{uuid.uuid4().hex}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise unwritable(root, err) from None
        self.dtype = STORAGE_DTYPES[info["dtype"]]
        self._index: dict[str, tuple[int, int]] = {}  # image key -> (shard number, row)
        self._shards: list[_Shard] = []
        self._seen: set[Path] = set()

    @classmethod
    def for_backbone(
        cls, root: str | Path, backbone, device, dtype: torch.dtype = torch.float32
    ) -> FeatureCache:
        """The cache folder of ``backbone`` whose shards store features as ``dtype`` (one of
        :data:`STORAGE_DTYPES`)."""
        return cls(root, backbone_key(backbone, device, dtype))

    def lock(self):
        from filelock import FileLock

        return FileLock(str(self.dir / ".lock"))

    def _refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            if path in self._seen:
                continue
            self._seen.add(path)
            try:
                shard, keys = _Shard.open(path, self.dtype)
            except Exception as err:  # a damaged shard must not stop a run: recompute its images
                log.warning(
                    "feature cache: ignoring unreadable shard %s (%s); delete it to stop this", path, err
                )
                continue
            number = len(self._shards)
            self._shards.append(shard)
            for row, key in enumerate(keys):
                self._index.setdefault(key, (number, row))

    def missing(self, keys: list[str]) -> list[str]:
        self._refresh()
        return [k for k in keys if k not in self._index]

    def stored(self, keys: list[str]) -> StoredFeatures:
        """The features of ``keys`` (all must be cached) as rows ``0..len(keys)-1`` read on demand."""
        self._refresh()
        if not keys:
            raise ValueError("no keys requested")
        where = np.array([self._index[key] for key in keys], dtype=np.int64)
        return StoredFeatures(self._shards, where[:, 0], where[:, 1])

    def put(self, keys: list[str], features: torch.Tensor) -> Path:
        """Write one shard atomically (temporary file, then rename)."""
        from adaptkit.artifacts import save_safetensors as save_file

        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        try:
            save_file(
                {"features": features.detach().to("cpu", self.dtype).contiguous()},
                str(tmp),
                metadata={"keys": json.dumps(keys)},
            )
            os.replace(tmp, final)
        except OSError as err:  # a full disk: nothing partial is left, the shards written so far stay
            tmp.unlink(missing_ok=True)
            raise unwritable(self.dir.parent, err) from None
        return final


class _Shard:
    """Where one shard's feature rows lie in its file: a safetensors header, then ``(N, T, D)`` rows."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.row_bytes = int(np.prod(shape)) * dtype.itemsize

    @classmethod
    def open(cls, path: Path, dtype: torch.dtype) -> tuple[_Shard, list[str]]:
        """Parse and check a shard's header (its keys, its tensor's place, dtype and size)."""
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise ValueError("truncated header")
            size = int.from_bytes(head, "little")
            if size > 1 << 30:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(handle.read(size))
        keys = json.loads(header.get("__metadata__", {})["keys"])
        entry = header["features"]
        stored = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if stored != dtype:
            raise ValueError(f"features stored as {entry['dtype']}, this cache holds {dtype}")
        rows, *shape = entry["shape"]
        begin, end = entry["data_offsets"]
        shard = cls(path, 8 + size + begin, tuple(shape), dtype)
        if len(keys) != rows:
            raise ValueError(f"{len(keys)} keys for {rows} rows")
        if end - begin != rows * shard.row_bytes or path.stat().st_size < 8 + size + end:
            raise ValueError("truncated data")
        return shard, keys


class StoredFeatures:
    """Feature rows that stay on disk: ``read(index)`` reads just those rows, grouped by shard, into one
    tensor (storage dtype, CPU). Nothing is mapped or kept between reads, so reading does not grow the
    process's memory, and a forked or spawned process reads the same files independently. ``shape`` and
    ``dtype`` are those of the whole ``(N, T, D)`` tensor it stands for."""

    def __init__(self, shards: list[_Shard], shard_of: np.ndarray, row_of: np.ndarray) -> None:
        used = {shards[s].shape for s in set(shard_of.tolist())}
        if len(used) != 1:
            raise ValueError(f"cached features of different shapes {sorted(used)}")
        self.shards, self.shard_of, self.row_of = shards, shard_of, row_of
        self.row_shape: tuple[int, ...] = used.pop()
        self.shape = (len(row_of), *self.row_shape)
        self.dtype = shards[int(shard_of[0])].dtype

    def __len__(self) -> int:
        return len(self.row_of)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any order, repeats allowed) as ``(len(index), *shape)``."""
        index_np = index.to(torch.int64).cpu().numpy()
        out = torch.empty((len(index_np), *self.row_shape), dtype=self.dtype)
        if not len(index_np):
            return out
        flat = out.view(torch.uint8).reshape(len(index_np), -1).numpy()
        shards = self.shard_of[index_np]
        for number in np.unique(shards):
            shard = self.shards[int(number)]
            wanted = np.nonzero(shards == number)[0]
            try:
                fd = os.open(shard.path, os.O_RDONLY)
                try:
                    for i in wanted.tolist():
                        at = shard.offset + int(self.row_of[index_np[i]]) * shard.row_bytes
                        got = os.preadv(fd, [flat[i]], at)
                        if got != shard.row_bytes:
                            raise OSError(f"short read, {got} of {shard.row_bytes} bytes")
                finally:
                    os.close(fd)
            except OSError as err:
                from adaptkit.data.records import DataError

                raise DataError(
                    f"feature cache shard {shard.path} cannot be read ({err.strerror or err}); it was "
                    "removed or cut short while this run used it: start the run again (with resume=auto to "
                    "continue), and the missing images are encoded again"
                ) from None
        return out
