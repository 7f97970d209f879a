"""Hugging Face ``datasets`` as data specs: a ``save_to_disk`` folder, a parquet file with an Image column,
or an imagefolder (images + ``metadata.jsonl``).

A spec is ``hf:PATH`` or ``hf:PATH:SPLIT`` (default split ``train``; a ``save_to_disk`` folder of one
split has none). adaptkit's pipeline reads images from files (the feature cache is keyed by their bytes),
so each image's stored bytes are written once, unchanged, to ``$ADAPTKIT_CACHE/hf_images/<dataset
fingerprint>/<row>.<format>`` and the samples point there; nothing is decoded or re-encoded on the way.

Columns: ``image`` (an Image feature, or a path) and the task's: ``question`` + ``answer`` (or
``answers``, a list: VQAv2 style) for VQA; ``caption`` (or ``captions`` / ``text``) and optionally
``label`` for captions. A row missing them is a bad sample (named ``PATH[row N]``), skipped or raised
like a bad JSONL line.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from adaptkit.data.records import DataError, LoadedData, bad_sample

log = logging.getLogger(__name__)

IMAGE_FORMATS = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"GIF8": "gif", b"BM": "bmp", b"RIFF": "webp"}


def parse_spec(spec: str) -> tuple[Path, str]:
    """``hf:PATH[:SPLIT]`` -> (path, split)."""
    body = spec[len("hf:") :]
    path, _, split = body.partition(":") if not Path(body).exists() else (body, "", "")
    return Path(path), split or "train"


def open_dataset(path: Path, split: str):
    """The ``datasets.Dataset`` a path holds (save_to_disk folder, parquet file, imagefolder)."""
    import datasets

    if not path.exists():
        raise DataError(
            f"hf:{path}: no such file or folder (a save_to_disk folder, .parquet file or imagefolder)"
        )
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"hf:{path}: no split '{split}' (has {', '.join(loaded)}); add :SPLIT")
                return loaded[split]
            return loaded
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"hf:{path}: could not be read as a Hugging Face dataset ({err})") from None
    raise DataError(f"hf:{path}: not a save_to_disk folder, a .parquet file or an imagefolder")


def _image_file(value, root: Path, row: int, base: Path) -> tuple[str | None, str | None]:
    """A file holding the row's image: its stored bytes written once under ``root``, or its path."""
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base / value
        return (
            (str(path), None) if path.is_file() else (None, f"image '{value}' not found (looked for {path})")
        )
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        return None, "no image in column 'image'"
    data = value.get("bytes")
    if not data:
        path = Path(value["path"])
        return (str(path), None) if path.is_file() else (None, f"image '{value['path']}' not found")
    ext = next((e for magic, e in IMAGE_FORMATS.items() if data.startswith(magic)), "img")
    target = root / f"{row}.{ext}"
    if not target.is_file():
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return str(target), None


def load_hf(
    spec: str, make: Callable[[dict, str, str], tuple[object, str | None]], on_bad_sample: str
) -> LoadedData:
    """Samples of an ``hf:`` spec (``make(row, image_path, origin)``: a row -> a sample, or a problem)."""
    import datasets

    from adaptkit.assets import cache_dir

    path, split = parse_spec(spec)
    dataset = open_dataset(path, split)
    if "image" not in dataset.column_names:
        raise DataError(f"{spec}: no 'image' column (columns: {', '.join(dataset.column_names)})")
    if isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    key = hashlib.blake2b(
        f"{path.resolve()}:{split}:{dataset._fingerprint}".encode(), digest_size=12
    ).hexdigest()
    root = cache_dir() / "hf_images" / key
    root.mkdir(parents=True, exist_ok=True)
    base = path if path.is_dir() else path.parent
    samples, skipped = [], []
    for i, row in enumerate(tqdm(dataset, desc=f"reading {spec}", unit="row", leave=False)):
        origin = f"{path}[row {i}]"
        image, problem = _image_file(row["image"], root, i, base)
        sample = None
        if problem is None:
            sample, problem = make(row, image, origin)
        if problem is not None:
            bad_sample(skipped, origin, problem, on_bad_sample, "row")
            continue
        samples.append(sample)
    if not samples:
        raise DataError(f"{spec}: no usable rows ({len(skipped)} skipped)")
    return LoadedData(samples, skipped)
