"""What every data format produces: the sample records, the error a bad file raises, and the JSONL
reader the line-based formats share (``adaptkit.data.formats`` for VQA, ``adaptkit.data.captions``,
``adaptkit.data.llava``, ``adaptkit.data.hf`` build on it)."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file or sample is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True)
class CaptionSample:
    """One image and its reference captions.

    Attributes:
        image: absolute path of the image file.
        captions: one or more reference captions.
        label: what the image shows (a class), or None.
        origin: ``file:line`` (or ``file[index]``) where the sample was read.
    """

    image: str
    captions: tuple[str, ...]
    label: str | None
    origin: str


@dataclass
class LoadedData:
    """Samples of one data spec plus what was skipped (``origin: reason`` strings)."""

    samples: list[VQASample]
    skipped: list[str]


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


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a file to read an image from (a FIFO, a device such as /dev/zero, a folder, a
    symbolic-link loop), or None; a missing path raises ``FileNotFoundError``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return "is a symbolic link to a missing file"
        raise
    except OSError as err:  # ELOOP: a link loop
        return f"is not a regular file ({err.strerror or err})"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, device or folder); give an image file"
    return None


def resolve_image(file: Path, name: str) -> tuple[Path, str | None]:
    """An image path from a data file (relative to the file, or absolute) and the problem, if it is
    not there."""
    image = Path(name)
    image = image if image.is_absolute() else file.parent / image
    if not os.path.lexists(image):
        return image, f"image '{name}' not found (looked for {image})"
    problem = not_a_regular_file(image)  # it exists: a dangling link is the one way it can be missing
    if problem:
        return image, f"image '{name}' ({image}) {problem}"
    return image.resolve(), None


def bad_sample(skipped: list[str], origin: str, problem: str, on_bad_sample: str, what: str) -> None:
    """A bad line / row / entry ``what``: listed in ``skipped`` with ``on_bad_sample="skip"``, else a
    :class:`DataError` naming ``origin`` and what to do."""
    if on_bad_sample != "skip":
        raise DataError(
            f"{origin}: {problem}. Fix the {what}, or set data.on_bad_sample=skip to skip bad ones"
        )
    skipped.append(f"{origin}: {problem}")


def read_jsonl(path: str | Path, parse, on_bad_sample: str = "error") -> LoadedData:
    """Read a JSONL data file whose lines ``parse(row, file, origin)`` turns into a sample or a problem.

    ``parse`` returns ``(sample, None)`` or ``(None, "what is wrong")``. Blank lines are ignored; a line
    that is not UTF-8 text, not JSON, or that ``parse`` rejects, raises :class:`DataError` naming
    ``file:line`` (or, with ``on_bad_sample="skip"``, is skipped and listed).
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {file} does not exist")
    samples: list = []
    skipped: list[str] = []
    with file.open("rb") as handle:  # decoded line by line: one bad line is one bad sample
        for lineno, raw in enumerate(handle, start=1):
            origin = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                byte = f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
                problem = f"not UTF-8 text ({byte}); save the file as UTF-8"
                bad_sample(skipped, origin, problem, on_bad_sample, "line")
                continue
            if not line.strip():
                continue
            try:
                sample, problem = parse(json.loads(line), file, origin)
            except json.JSONDecodeError as err:
                sample, problem = None, f"not valid JSON ({err.msg} at column {err.colno})"
            if problem is not None:
                bad_sample(skipped, origin, problem, on_bad_sample, "line")
                continue
            samples.append(sample)
    if not samples:
        raise DataError(f"{file}: no usable samples ({len(skipped)} skipped)")
    return LoadedData(samples, skipped)
