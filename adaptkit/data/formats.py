"""VQA data sources: the embedded easy-VQA splits, a generic JSONL format and Hugging Face datasets.

A data spec is ``easyvqa:train``, ``easyvqa:test``, a path to a ``.jsonl`` file with one object per
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
from collections import Counter
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
        answers: every annotator's answer (VQAv2 style, scored by the official VQA accuracy); empty when the
            data gives one answer. ``answer`` is then their most frequent one, the training target.
        context: the conversation's earlier ``(question, answer)`` turns (LLaVA data), oldest first.
    """

    image: str
    question: str
    answer: str
    origin: str
    answers: tuple[str, ...] = ()
    context: tuple[tuple[str, str], ...] = ()


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


def most_common(answers: list[str]) -> str:
    """The most frequent answer (the first of those tied), VQAv2's training target."""
    counts = Counter(a.strip() for a in answers)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def vqa_fields(row: dict) -> tuple[tuple[str, str, tuple[str, ...]] | None, str | None]:
    """``(question, answer, answers)`` of a VQA row (JSONL line or dataset row), or the problem.

    A row has ``question`` and ``answer`` (a string), or ``answers`` (a list of strings: every annotator's,
    VQAv2 style), or both (``answer`` is then the target).
    """
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, f"key 'question' must be a non-empty string, got {question!r}"
    answers = row.get("answers")
    if answers is not None:
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            return None, f"key 'answers' must be a non-empty list of non-empty strings, got {answers!r}"
        answers = tuple(a.strip() for a in answers)
    answer = row.get("answer")
    if answer is None and answers is None:
        return None, "missing key 'answer' (each line needs image, question and answer, or answers)"
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        return None, f"key 'answer' must be a non-empty string, got {answer!r}"
    return (question, answer if answer is not None else most_common(list(answers)), answers or ()), None


def _check_row(row: object) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("image"), str) or not row["image"].strip():
        return "missing key 'image' (each line needs image, question and answer)"
    return vqa_fields(row)[1]


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
    """Load samples for a data spec (``easyvqa:train``, ``easyvqa:test`` or a ``.jsonl`` path)."""
    if spec.startswith("easyvqa:"):
        data = load_easyvqa(spec.split(":", 1)[1])
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
            f"unknown data spec '{spec}': use easyvqa:train, easyvqa:test, a path to a .jsonl file, a LLaVA "
            "conversation .json file or hf:PATH[:SPLIT] (a Hugging Face dataset: save_to_disk, parquet, "
            "imagefolder)"
        )
    if data.skipped:
        log.warning("%s: skipped %d bad samples, first: %s", spec, len(data.skipped), data.skipped[0])
    return data
