"""Fashion-MNIST as an embedded dataset: IDX files read safely, PNGs written once, questions and captions
derived from the labels as documented, damaged or missing files named."""

from __future__ import annotations

import gzip
import struct
from collections import Counter

import pytest
import torch
from PIL import Image

from adaptkit.data import fashion
from adaptkit.data.captions import load_captions
from adaptkit.data.formats import DataError, load_vqa


def write_idx(folder, prefix: str, pixels: torch.Tensor, labels: list[int]) -> None:
    """Gzipped IDX files as Zalando ships them (big-endian header, unsigned bytes)."""
    n, rows, cols = pixels.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", n, rows, cols) + bytes(pixels.flatten().tolist()))
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + bytes(labels))


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """40 training and 10 test images of random pixels under ADAPTKIT_FASHION_MNIST, with its own cache."""
    folder = tmp_path / "fashion"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 28, 28), generator=gen, dtype=torch.uint8)
    write_idx(folder, "train", train, [i % 10 for i in range(40)])
    write_idx(folder, "t10k", train[:10].flip(-1), list(range(10)))
    monkeypatch.setenv("ADAPTKIT_FASHION_MNIST", str(folder))
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    return folder, train


def test_questions_are_derived_from_the_labels(fake_fashion):
    _, pixels = fake_fashion
    data = load_vqa("fashionmnist:train")
    assert len(data.samples) == 80 and not data.skipped
    kinds = data.samples[0::2]
    yes_no = data.samples[1::2]
    assert [s.question for s in kinds] == [fashion.KIND_QUESTION] * 40
    assert [s.answer for s in kinds] == [fashion.NAMES[i % 10] for i in range(40)]
    counts = Counter(s.answer for s in yes_no)
    assert set(counts) == {"yes", "no"} and 12 <= counts["yes"] <= 28  # about half, by the image's index
    for kind, question in zip(kinds, yes_no):
        assert question.image == kind.image
        asked = question.question.removesuffix("?")
        for prefix in ("is this an ", "is this a ", "are these "):
            asked = asked.removeprefix(prefix)
        assert asked in fashion.NAMES
        assert question.answer == ("yes" if asked == kind.answer else "no")
    # The PNG is the IDX image, byte for byte, and the first N images are a prefix of the split.
    first = torch.frombuffer(bytearray(Image.open(kinds[3].image).tobytes()), dtype=torch.uint8)
    assert torch.equal(first.view(28, 28), pixels[3])
    fields = lambda samples: [(s.image, s.question, s.answer) for s in samples]  # noqa: E731
    assert fields(load_vqa("fashionmnist:train:5").samples) == fields(data.samples[:10])
    assert len(load_vqa("fashionmnist:test").samples) == 20


def test_pngs_are_written_once(fake_fashion):
    paths, _ = fashion.images("train")
    marker = next(iter({p.rsplit("/", 1)[0] for p in paths})) + "/labels.json"
    stamp = __import__("os").stat(marker).st_mtime_ns
    again, _ = fashion.images("train:3")
    assert again == paths[:3]
    assert __import__("os").stat(marker).st_mtime_ns == stamp


def test_captions_name_the_kind(fake_fashion):
    data = load_captions("fashionmnist-captions:test")
    assert [s.label for s in data.samples] == list(fashion.NAMES)
    assert data.samples[9].captions[:2] == ("a photo of an ankle boot", "an ankle boot")
    assert data.samples[1].captions[0] == "a photo of a pair of trousers"
    assert all(len(s.captions) == len(fashion.PHRASINGS) for s in data.samples)


def test_damaged_or_missing_files_are_named(fake_fashion, tmp_path, monkeypatch):
    folder, pixels = fake_fashion
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        load_vqa("fashionmnist:validation")
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        load_vqa("fashionmnist:train:many")
    # A file that is not IDX, and one cut short, each named.
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: not an IDX file"):
        load_vqa("fashionmnist:test")
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + bytes(100))
    with pytest.raises(DataError, match="100 bytes of data where its header"):
        load_vqa("fashionmnist:test")
    write_idx(folder, "t10k", pixels[:10], [3] * 9 + [12])
    with pytest.raises(DataError, match="labels in 0..9"):
        load_vqa("fashionmnist:test")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="ADAPTKIT_FASHION_MNIST=.*expected the files"):
        load_vqa("fashionmnist:train:2")
    # Nothing installed: the error says how to get it.
    monkeypatch.delenv("ADAPTKIT_FASHION_MNIST")
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(DataError, match="not installed: install Debian's dataset-fashion-mnist"):
        load_vqa("fashionmnist:train")
    # Installed files that are not the pinned ones are refused.
    unpacked = tmp_path / "cache" / "fashion-mnist" / "usr/share/datasets/fashion-mnist"
    unpacked.mkdir(parents=True)
    write_idx(unpacked, "train", pixels, [0] * 40)
    write_idx(unpacked, "t10k", pixels[:10], [0] * 10)
    with pytest.raises(DataError, match="not the pinned one"):
        load_vqa("fashionmnist:train")


@pytest.mark.skipif(
    not any(p.is_dir() for p in (fashion.DEBIAN_DIR,)),
    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it as root)",
)
def test_the_real_files_match_their_pins(monkeypatch):
    monkeypatch.delenv("ADAPTKIT_FASHION_MNIST", raising=False)
    folder, pinned = fashion.data_dir()
    assert pinned
    (n, rows, cols), _ = fashion.read_idx(folder / "t10k-images-idx3-ubyte.gz", 3)
    assert (n, rows, cols) == (10_000, 28, 28)


def test_pixel_baseline_fits_the_raw_pixels(fake_fashion):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        baseline = importlib.import_module("pixel_baseline")
    finally:
        sys.path.pop(0)
    x, y = baseline._pixels("train:30")
    assert x.shape == (30, 784) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == [i % 10 for i in range(30)]
    model = baseline.fit(x, y, l2=1e-5)
    assert baseline.accuracy(model, x, y) == 1.0  # 30 random images in 784 dimensions: separable
