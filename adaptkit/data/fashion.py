"""Fashion-MNIST: real product photos (Zalando's article images, 28x28 grayscale, 10 kinds of item; 60,000
training and 10,000 test images; Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747; MIT licence), a second
embedded dataset beside easy-VQA.

It ships in Debian's package ``dataset-fashion-mnist`` (the four ``*-ubyte.gz`` files under
``/usr/share/datasets/fashion-mnist``). ``scripts/setup.sh`` installs it: with apt as root, else the
package is fetched with ``apt-get download`` and unpacked into adaptkit's cache without root. The files
are found in ``$ADAPTKIT_FASHION_MNIST`` (a folder with the four files, e.g. from Zalando's repository),
then ``/usr/share/datasets/fashion-mnist``, then the cache; the pinned ones are checked by sha256. The
images are written once as PNG files into the cache (the feature cache and every data path take image
files).

Data specs (``N``: the split's first N images, in the dataset's own order, which mixes the classes):

- ``fashionmnist:train[:N]`` / ``fashionmnist:test[:N]`` (VQA): two questions per image, derived from its
  label: "what kind of item is this?" -> its name (10 answers) and "is this a {name}?" -> yes / no, where
  the name asked about is the image's own for half the images (chosen by the image's index, so the split
  is the same everywhere) and one of the nine others, also chosen by index, for the rest.
- ``fashionmnist-captions:train[:N]`` / ``...:test[:N]`` (retrieval, classification): each image with the
  label of its kind and five captions naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from adaptkit.data.records import CaptionSample, DataError, LoadedData, VQASample

#: the 10 kinds in label order (Zalando's "T-shirt/top", "Trouser", ... "Ankle boot"), as answers
NAMES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
KIND_QUESTION = "what kind of item is this?"
PHRASINGS = (
    "a photo of {n}",
    "{n}",
    "a product photo of {n}",
    "a grayscale photo of {n}",
    "{n} on a plain background",
)
FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = (
    "install Debian's dataset-fashion-mnist (bash scripts/setup.sh does: apt as root, else apt-get download "
    "into the cache), or set ADAPTKIT_FASHION_MNIST to a folder with the four *-ubyte.gz files"
)
PREFIX = {"train": "train", "test": "t10k"}


def _is_yes_question(index: int) -> bool:
    return hashlib.blake2b(f"fashion-yes-{index}".encode(), digest_size=4).digest()[0] % 2 == 0


def _other_kind(index: int, label: int) -> int:
    step = 1 + hashlib.blake2b(f"fashion-other-{index}".encode(), digest_size=4).digest()[0] % 9
    return (label + step) % 10


def with_article(name: str) -> str:
    """``name`` as a noun phrase: "a coat", "an ankle boot", "a pair of trousers"."""
    if name == "trousers":
        return "a pair of trousers"
    return ("an " if name[0] in "aeiou" else "a ") + name


def question_about(name: str) -> str:
    """The yes/no question whether an image shows ``name``."""
    return f"are these {name}?" if name == "trousers" else f"is this {with_article(name)}?"


def data_dir() -> tuple[Path, bool]:
    """The folder with the four files and whether they are the pinned ones (checked by sha256)."""
    from adaptkit.assets import cache_dir, first_mismatch

    given = os.environ.get("ADAPTKIT_FASHION_MNIST")
    if given:
        folder = Path(given).expanduser()
        if not all((folder / f).is_file() for f in FILES):
            raise DataError(f"ADAPTKIT_FASHION_MNIST={given}: expected the files {', '.join(FILES)} there")
        return folder, first_mismatch(folder, FILES) is None
    for folder in (DEBIAN_DIR, cache_dir() / "fashion-mnist" / "usr/share/datasets/fashion-mnist"):
        if folder.is_dir():
            bad = first_mismatch(folder, FILES)
            if bad is not None:
                path, actual = bad
                what = "is missing" if actual is None else f"has sha256 {actual}, not the pinned one"
                raise DataError(f"Fashion-MNIST: {path} {what}; reinstall it: {INSTALL}")
            return folder, True
    raise DataError(f"Fashion-MNIST is not installed: {INSTALL}")


def read_idx(path: Path, kind: int) -> tuple[tuple[int, ...], bytes]:
    """The dims and raw bytes of a gzipped IDX file of unsigned bytes (``kind``: 1 labels, 3 images)."""
    with gzip.open(path, "rb") as handle:
        head = handle.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08" or head[3] != kind:
            raise DataError(f"{path}: not an IDX file of {kind}-d unsigned bytes (magic {head.hex()})")
        dims = struct.unpack(f">{kind}I", handle.read(4 * kind))
        size = 1
        for d in dims:
            size *= d
        data = handle.read(size + 1)
    if len(data) != size:
        raise DataError(f"{path}: {len(data)} bytes of data where its header {dims} needs {size}")
    return dims, data


def parse_split(split: str) -> tuple[str, int | None]:
    """``train`` / ``test`` and the image count of ``:N`` (None: the whole split)."""
    name, _, count = split.partition(":")
    if name not in PREFIX or (count and not count.isdigit()):
        raise DataError(
            f"Fashion-MNIST has splits 'train' and 'test', optionally ':N' (its first N), not '{split}'"
        )
    return name, int(count) if count else None


def _files(name: str) -> tuple[Path, Path]:
    folder, _ = data_dir()
    prefix = PREFIX[name]
    return folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"


def read_split(split: str) -> tuple[torch.Tensor, list[int]]:
    """The ``(N, 28, 28)`` uint8 pixels and the labels of a split (optionally ``:N``), from the IDX files."""
    name, count = parse_split(split)
    image_file, label_file = _files(name)
    (n, rows, cols), pixels = read_idx(image_file, 3)
    (n_labels,), labels = read_idx(label_file, 1)
    if n != n_labels or any(v > 9 for v in labels):
        raise DataError(f"{label_file}: {n_labels} labels in 0..9 expected for the {n} images")
    grid = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(n, rows, cols)
    return grid[:count], list(labels)[:count]


def images(split: str) -> tuple[list[str], list[int]]:
    """The PNG files and labels of a split (``train`` / ``test``, optionally ``:N``), written once into
    the cache (a folder keyed by the source files' digest, filled in a temporary folder and renamed, so a
    half-written set is never read)."""
    from filelock import FileLock
    from PIL import Image

    from adaptkit.assets import cache_dir, sha256_file

    name, count = parse_split(split)
    image_file, label_file = _files(name)
    digest = hashlib.sha256((sha256_file(image_file) + sha256_file(label_file)).encode()).hexdigest()[:16]
    target = cache_dir() / "fashion-mnist-png" / f"{name}-{digest}"
    marker = target / "labels.json"
    if not marker.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not marker.is_file():
                grid, labels = read_split(name)
                tmp = target.with_name(target.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for i in range(len(grid)):
                    Image.fromarray(grid[i].numpy(), mode="L").save(tmp / f"{i:05d}.png")
                (tmp / "labels.json").write_text(json.dumps(labels))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    labels = json.loads(marker.read_text())[:count]
    return [str(target / f"{i:05d}.png") for i in range(len(labels))], labels


def load_fashion_vqa(split: str) -> LoadedData:
    """Two questions per image (module docstring)."""
    paths, labels = images(split)
    samples = []
    for i, (path, label) in enumerate(zip(paths, labels)):
        origin = f"fashionmnist:{split}[image {i}]"
        asked = label if _is_yes_question(i) else _other_kind(i, label)
        samples.append(VQASample(path, KIND_QUESTION, NAMES[label], origin))
        samples.append(
            VQASample(path, question_about(NAMES[asked]), "yes" if asked == label else "no", origin)
        )
    return LoadedData(samples, [])


def load_fashion_captions(split: str) -> LoadedData:
    """Each image with its kind as label and five captions (module docstring)."""
    paths, labels = images(split)
    samples = [
        CaptionSample(
            path,
            tuple(p.format(n=with_article(NAMES[label])) for p in PHRASINGS),
            NAMES[label],
            f"fashionmnist:{split}[image {i}]",
        )
        for i, (path, label) in enumerate(zip(paths, labels))
    ]
    return LoadedData(samples, [])
