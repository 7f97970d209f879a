"""VQA data sources: the embedded easy-VQA splits, a generic JSONL format and Hugging Face datasets.

A data spec is ``easyvqa:train``, ``easyvqa:test``, ``fashionmnist:train|test[:N]`` (real product photos,
``adaptkit.data.fashion``), a path to a ``.jsonl`` file with one object per
line::

    {"image": "images/0001.png", "question": "what color is the shape?", "answer": "red"}
    {"image": "images/0002.png", "question": "how many dogs?", "answers": ["2", "2", "two", "3", ...]}

(``answers``: every annotator's answer, VQAv2 style: the most frequent is the training target and
evaluation adds the official VQA accuracy), a LLaVA conversation ``.json`` file (``adaptkit.data.llava``:
one sample per assistant turn, earlier turns as its context), or ``hf:PATH[:SPLIT]`` for a Hugging Face
dataset with the same columns (``adaptkit.data.hf``). ``image`` is relative to the JSONL file (or
absolute). Bad lines raise :class:`DataError` naming the file and line, or are skipped and counted when
``on_bad_sample="skip"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adaptkit.data.records import (
    DataError,
    LoadedData,
    VQASample,
    most_common,
    read_jsonl,
    resolve_image,
    vqa_fields,
)

# re-exported: DataError and the records are part of this module's public surface
__all__ = [
    "DataError",
    "LoadedData",
    "VQASample",
    "load_easyvqa",
    "load_jsonl",
    "load_vqa",
    "most_common",
    "read_jsonl",
    "resolve_image",
    "vqa_fields",
]

log = logging.getLogger(__name__)


def load_easyvqa(split: str) -> LoadedData:
    """Load an easy-VQA split (``train``: 38,575 questions; ``test``: 9,673) from the embedded asset."""
    from adaptkit import assets

    if split not in ("train", "test"):
        raise DataError(
            f"easy-VQA has splits 'train' and 'test', not '{split}' (use easyvqa:train or easyvqa:test)"
        )
    root = assets.easyvqa_dir() / split
    questions_file = root / "questions.json"
    rows = json.loads(questions_file.read_text())
    samples = [
        VQASample(str(root / "images" / f"{image_id}.png"), question, answer, f"{questions_file}[{i}]")
        for i, (question, answer, image_id) in enumerate(rows)
    ]
    return LoadedData(samples, [])


def _check_row(row: object) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("image"), str) or not row["image"].strip():
        return "missing key 'image' (each line needs image, question and answer)"
    return vqa_fields(row)[1]


def _parse_vqa(row: object, file: Path, origin: str) -> tuple[VQASample | None, str | None]:
    problem = _check_row(row)
    if problem is not None:
        return None, problem
    image, problem = resolve_image(file, row["image"])
    if problem is not None:
        return None, problem
    (question, answer, answers), _ = vqa_fields(row)
    return VQASample(str(image), question, answer, origin, answers), None


def load_jsonl(path: str | Path, on_bad_sample: str = "error") -> LoadedData:
    """Load a VQA JSONL file; image paths are resolved relative to the file.

    Args:
        path: the ``.jsonl`` file.
        on_bad_sample: ``error`` raises on the first bad line; ``skip`` skips and counts it.

    Raises:
        DataError: the file is missing, or a line is bad and ``on_bad_sample="error"``.
    """
    return read_jsonl(path, _parse_vqa, on_bad_sample)


def _vqa_from_row(row: dict, image: str, origin: str) -> tuple[VQASample | None, str | None]:
    fields, problem = vqa_fields(row)
    if problem is not None:
        return None, problem
    question, answer, answers = fields
    return VQASample(image, question, answer, origin, answers), None


def load_vqa(spec: str, on_bad_sample: str = "error") -> LoadedData:
    """Load samples for a data spec (module docstring)."""
    if spec.startswith("easyvqa:"):
        data = load_easyvqa(spec.split(":", 1)[1])
    elif spec.startswith("fashionmnist:"):
        from adaptkit.data.fashion import load_fashion_vqa

        data = load_fashion_vqa(spec.split(":", 1)[1])
    elif spec.endswith(".json"):
        from adaptkit.data.llava import load_llava

        data = load_llava(spec, on_bad_sample)
    elif spec.startswith("hf:"):
        from adaptkit.data.hf import load_hf

        data = load_hf(spec, _vqa_from_row, on_bad_sample)
    elif spec.endswith(".jsonl") or Path(spec).is_file():
        data = load_jsonl(spec, on_bad_sample)
    else:
        raise DataError(
            f"unknown data spec '{spec}': use easyvqa:train|test, fashionmnist:train|test, a .jsonl file, "
            "a LLaVA conversation .json file or hf:PATH[:SPLIT] (a Hugging Face dataset: save_to_disk, "
            "parquet, imagefolder)"
        )
    if data.skipped:
        log.warning("%s: skipped %d bad samples, first: %s", spec, len(data.skipped), data.skipped[0])
    return data
