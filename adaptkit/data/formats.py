"""VQA data sources: the embedded easy-VQA splits and a generic JSONL format.

A data spec is ``easyvqa:train``, ``easyvqa:test`` or a path to a ``.jsonl`` file with one object per
line::

    {"image": "images/0001.png", "question": "what color is the shape?", "answer": "red"}

``image`` is relative to the JSONL file (or absolute). Bad lines raise :class:`DataError` naming the
file and line, or are skipped and counted when ``on_bad_sample="skip"``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or sample is malformed; the message names the file and line."""


@dataclass(frozen=True)
class VQASample:
    """One question about one image.

    Attributes:
        image: absolute path of the image file.
        question: the question text.
        answer: the reference answer.
        origin: ``file:line`` (or ``file[index]``) where the sample was read, for error messages.
    """

    image: str
    question: str
    answer: str
    origin: str


@dataclass
class LoadedData:
    """Samples of one data spec plus what was skipped (``origin: reason`` strings)."""

    samples: list[VQASample]
    skipped: list[str]


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
    for key in ("image", "question", "answer"):
        if key not in row:
            return f"missing key '{key}' (each line needs image, question and answer)"
        if not isinstance(row[key], str) or not row[key].strip():
            return f"key '{key}' must be a non-empty string, got {row[key]!r}"
    return None


def resolve_image(file: Path, name: str) -> tuple[Path, str | None]:
    """An image path from a data file (relative to the file, or absolute) and the problem, if it is
    not there."""
    image = Path(name)
    image = image if image.is_absolute() else file.parent / image
    if not image.is_file():
        return image, f"image '{name}' not found (looked for {image})"
    return image.resolve(), None


def read_jsonl(path: str | Path, parse, on_bad_sample: str = "error") -> LoadedData:
    """Read a JSONL data file whose lines ``parse(row, file, origin)`` turns into a sample or a problem.

    ``parse`` returns ``(sample, None)`` or ``(None, "what is wrong")``. Blank lines are ignored; a line
    that is not JSON, or that ``parse`` rejects, raises :class:`DataError` naming ``file:line`` (or, with
    ``on_bad_sample="skip"``, is skipped and listed).
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {file} does not exist")
    samples: list = []
    skipped: list[str] = []
    with file.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{file}:{lineno}"
            try:
                sample, problem = parse(json.loads(line), file, origin)
            except json.JSONDecodeError as err:
                sample, problem = None, f"not valid JSON ({err.msg} at column {err.colno})"
            if problem is not None:
                if on_bad_sample != "skip":
                    raise DataError(
                        f"{origin}: {problem}. Fix the line, or set data.on_bad_sample=skip to skip bad lines"
                    )
                skipped.append(f"{origin}: {problem}")
                continue
            samples.append(sample)
    if not samples:
        raise DataError(f"{file}: no usable samples ({len(skipped)} skipped)")
    return LoadedData(samples, skipped)


def _parse_vqa(row: object, file: Path, origin: str) -> tuple[VQASample | None, str | None]:
    problem = _check_row(row)
    if problem is not None:
        return None, problem
    image, problem = resolve_image(file, row["image"])
    if problem is not None:
        return None, problem
    return VQASample(str(image), row["question"], row["answer"], origin), None


def load_jsonl(path: str | Path, on_bad_sample: str = "error") -> LoadedData:
    """Load a VQA JSONL file; image paths are resolved relative to the file.

    Args:
        path: the ``.jsonl`` file.
        on_bad_sample: ``error`` raises on the first bad line; ``skip`` skips and counts it.

    Raises:
        DataError: the file is missing, or a line is bad and ``on_bad_sample="error"``.
    """
    return read_jsonl(path, _parse_vqa, on_bad_sample)


def load_vqa(spec: str, on_bad_sample: str = "error") -> LoadedData:
    """Load samples for a data spec (``easyvqa:train``, ``easyvqa:test`` or a ``.jsonl`` path)."""
    if spec.startswith("easyvqa:"):
        data = load_easyvqa(spec.split(":", 1)[1])
    elif spec.endswith(".jsonl") or Path(spec).is_file():
        data = load_jsonl(spec, on_bad_sample)
    else:
        raise DataError(
            f"unknown data spec '{spec}': use easyvqa:train, easyvqa:test or a path to a .jsonl file"
        )
    if data.skipped:
        log.warning("%s: skipped %d bad samples, first: %s", spec, len(data.skipped), data.skipped[0])
    return data
