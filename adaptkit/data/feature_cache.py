"""A disk cache of frozen-backbone image features, shared by every run that uses the same backbone.

A frozen vision backbone in eval mode, with no image augmentation, maps an image to the same
features every time; computing them once per image and keeping them on disk means the second run
of a recipe (or an eval, or a sweep) never touches the backbone again.

Layout: ``ROOT/<backbone key>/shard-*.safetensors`` plus ``info.json`` (what the key stands for).
Each shard holds one ``features`` tensor ``(N, T, D)`` and, in its metadata, the N image keys.

- The **backbone key** hashes the backbone's identity, every parameter and buffer byte, the pixels
  its preprocessing makes of a fixed probe image (so any change of size, resize filter or
  normalisation shows), the feature dtype, the device type and the torch version.
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

import torch
from PIL import Image

log = logging.getLogger(__name__)

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
        "dtype": str(dtype).removeprefix("torch."),
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
    """The cache folder of one backbone. ``get`` looks up image keys, ``put`` appends a shard."""

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
        self._index: dict[str, tuple[Path, int]] = {}
        self._seen: set[Path] = set()

    @classmethod
    def for_backbone(cls, root: str | Path, backbone, device) -> FeatureCache:
        return cls(root, backbone_key(backbone, device))

    def lock(self):
        from filelock import FileLock

        return FileLock(str(self.dir / ".lock"))

    def _refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        from safetensors import safe_open

        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._seen:
                continue
            self._seen.add(shard)
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    keys = json.loads((handle.metadata() or {})["keys"])
                    rows = handle.get_slice("features").get_shape()[0]
                if len(keys) != rows:
                    raise ValueError(f"{len(keys)} keys for {rows} rows")
            except Exception as err:  # a damaged shard must not stop a run: recompute its images
                log.warning(
                    "feature cache: ignoring unreadable shard %s (%s); delete it to stop this", shard, err
                )
                continue
            for row, key in enumerate(keys):
                self._index.setdefault(key, (shard, row))

    def missing(self, keys: list[str]) -> list[str]:
        self._refresh()
        return [k for k in keys if k not in self._index]

    def get(self, keys: list[str]) -> torch.Tensor:
        """Features of ``keys`` (all must be cached), stacked in that order."""
        from safetensors import safe_open

        self._refresh()
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, []).append((i, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            with safe_open(str(shard), framework="pt") as handle:
                block = handle.get_tensor("features")
            if out is None:
                out = torch.empty((len(keys), *block.shape[1:]), dtype=block.dtype)
            dest = torch.tensor([i for i, _ in pairs])
            out[dest] = block[torch.tensor([r for _, r in pairs])]
        if out is None:
            raise ValueError("no keys requested")
        return out

    def put(self, keys: list[str], features: torch.Tensor) -> Path:
        """Write one shard atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        try:
            save_file(
                {"features": features.detach().cpu().contiguous()},
                str(tmp),
                metadata={"keys": json.dumps(keys)},
            )
            os.replace(tmp, final)
        except OSError as err:  # a full disk: nothing partial is left, the shards written so far stay
            tmp.unlink(missing_ok=True)
            raise unwritable(self.dir.parent, err) from None
        return final
