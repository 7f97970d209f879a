"""Image-caption data: caption JSONL, COCO captions JSON, and captions derived from easy-VQA's labels.

A data spec is one of:

- a ``.jsonl`` file, one image per line, paths relative to the file (or absolute)::

      {"image": "images/0001.png", "caption": "a red circle"}
      {"image": "images/0002.png", "captions": ["a blue square", "a square in blue"], "label": "blue square"}

  ``label`` (optional) names what the image shows: images of one label are positives of each other in
  the image-text objectives and retrieval (without it, only an image's own captions are), and labels
  make classification possible (``data.class_template`` turns a label into its class prompt);
- a COCO captions ``.json`` file (``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}``), images relative to the file or in an ``images/`` folder beside it;
- ``easyvqa-captions:train`` / ``easyvqa-captions:test``: easy-VQA's images with captions derived from
  its own labels (see :func:`load_easyvqa_captions`);
- ``fashionmnist-captions:train|test[:N]``: Fashion-MNIST's product photos, captions naming their kind
  (``adaptkit.data.fashion``);
- ``hf:PATH[:SPLIT]``: a Hugging Face dataset (save_to_disk folder, parquet, imagefolder) with the same
  columns (``caption``, ``captions`` or ``text``; ``label``), see ``adaptkit.data.hf``.

Bad lines (or COCO entries) raise :class:`DataError` naming file and line (entry), or are skipped and
listed with ``on_bad_sample="skip"``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

from adaptkit.data.records import (
    CaptionSample,
    DataError,
    LoadedData,
    bad_sample,
    read_jsonl,
    resolve_image,
)

__all__ = ["CaptionSample", "load_captions"]

log = logging.getLogger(__name__)


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _parse_caption_row(row: object, file: Path, origin: str) -> tuple[CaptionSample | None, str | None]:
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    if not _text(row.get("image")):
        return None, "missing key 'image' (a non-empty path; each line needs image and caption or captions)"
    if "caption" in row and "captions" in row:
        return None, "has both 'caption' and 'captions'; keep one"
    captions = [row["caption"]] if "caption" in row else row.get("captions")
    if captions is None:
        return None, "missing key 'caption' (a string) or 'captions' (a list of strings)"
    if not isinstance(captions, list) or not captions or not all(_text(c) for c in captions):
        return None, f"captions must be non-empty strings, got {captions!r}"
    label = row.get("label")
    if label is not None and not _text(label):
        return None, f"key 'label' must be a non-empty string when given, got {label!r}"
    image, problem = resolve_image(file, row["image"])
    if problem is not None:
        return None, problem
    return CaptionSample(str(image), tuple(c.strip() for c in captions), label, origin), None


def _caption_from_row(row: dict, image: str, origin: str) -> tuple[CaptionSample | None, str | None]:
    """A Hugging Face dataset row: ``caption``, ``captions`` or ``text``, and optionally ``label``."""
    fields = {k: row[k] for k in ("caption", "captions", "label") if row.get(k) is not None}
    if "caption" not in fields and "captions" not in fields and row.get("text") is not None:
        fields["caption"] = row["text"]
    if isinstance(fields.get("label"), int):  # a ClassLabel column: its index; the name is not in the row
        fields["label"] = str(fields["label"])
    sample, problem = _parse_caption_row({**fields, "image": image}, Path(image).parent, origin)
    return sample, problem


def load_caption_jsonl(path: str | Path, on_bad_sample: str = "error") -> LoadedData:
    """A caption JSONL file (module docstring)."""
    return read_jsonl(path, _parse_caption_row, on_bad_sample)


def load_coco_captions(path: str | Path, on_bad_sample: str = "error") -> LoadedData:
    """A COCO captions JSON file: every image with its captions (images without any are skipped)."""
    file = Path(path)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data file {file} does not exist") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or "annotations" not in doc:
        raise DataError(
            f"{file}: not a COCO captions file (needs top-level 'images' and 'annotations' lists)"
        )
    captions: dict[object, list[str]] = defaultdict(list)
    skipped: list[str] = []

    def bad(origin: str, problem: str) -> None:
        bad_sample(skipped, origin, problem, on_bad_sample, "entry")

    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not _text(ann.get("caption")):
            bad(f"{file}[annotations][{i}]", "needs 'image_id' and a non-empty 'caption'")
            continue
        captions[ann["image_id"]].append(ann["caption"].strip())
    samples = []
    for i, entry in enumerate(doc["images"]):
        origin = f"{file}[images][{i}]"
        if not isinstance(entry, dict) or "id" not in entry or not _text(entry.get("file_name")):
            bad(origin, "needs 'id' and 'file_name'")
            continue
        if not captions.get(entry["id"]):
            continue
        image, problem = resolve_image(file, entry["file_name"])
        if problem is not None:
            image, problem = resolve_image(file, str(Path("images") / entry["file_name"]))
        if problem is not None:
            bad(origin, problem)
            continue
        samples.append(CaptionSample(str(image), tuple(captions[entry["id"]]), None, origin))
    if not samples:
        raise DataError(f"{file}: no image with a caption ({len(skipped)} entries skipped)")
    return LoadedData(samples, skipped)


# ---- easy-VQA's labels as captions -----------------------------------------------------------------

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
#: the phrasings every easy-VQA image gets (each one caption); ``{c}`` colour, ``{s}`` shape.
PHRASINGS = (
    "a {c} {s}",
    "a {s} that is {c}",
    "an image of a {c} {s}",
    "there is a {c} {s} in the picture",
    "a {c} {s} on a plain background",
)
_WORD = r"(\w+)"


def _facts(question: str, answer: str) -> dict[str, str]:
    """What one easy-VQA question and answer say about the image's colour and shape."""
    q, a = question.strip().lower(), answer.strip().lower()
    facts: dict[str, str] = {}
    if re.fullmatch(r"what (color is|is the color of) the (shape|\w+)\?", q):
        facts["color"] = a
        shape = q.split()[-1].rstrip("?")
        if shape in SHAPES:
            facts["shape"] = shape
    elif re.fullmatch(r"what shape (is in the image|does the image contain|is present)\?", q):
        facts["shape"] = a
    elif m := re.fullmatch(rf"what is the {_WORD} shape\?", q):
        facts["shape"], facts["color"] = a, m.group(1)
    elif a in ("yes", "no"):
        negated = " not " in f" {q} " or q.startswith("is no ")
        present = (a == "yes") != negated
        for word in re.findall(r"\w+", q):
            if word in SHAPES:
                facts["shape" if present else "not shape"] = word
            if word in COLORS:
                facts["color" if present else "not color"] = word
    return facts


def _only(found: dict[str, set[str]], key: str, choices: tuple[str, ...]) -> set[str]:
    """The values of ``key`` the questions affirm or, when none does, the one choice they do not deny."""
    if found[key]:
        return found[key]
    left = set(choices) - found["not " + key]
    return left if len(left) == 1 else set()


def load_easyvqa_captions(split: str) -> LoadedData:
    """easy-VQA's images, each with five captions of its colour and shape (``PHRASINGS``) and the label
    ``"{colour} {shape}"`` (24 classes).

    The colour and shape come from the image's own questions and answers ("what color is the shape?"
    -> the colour; "what shape is present?" -> the shape; "what is the red shape?" -> both; a yes/no
    question that affirms a colour or shape -> it; when none affirms one, the only one its yes/no questions
    do not deny). An image whose questions do not settle both (about 10% of each split: e.g. only "is
    there a yellow shape?" -> no about its colour) is left out and counted in the log; it is not bad data.
    """
    from adaptkit import assets

    if split not in ("train", "test"):
        raise DataError(
            f"easy-VQA has splits 'train' and 'test', not '{split}' "
            "(use easyvqa-captions:train or easyvqa-captions:test)"
        )
    root = assets.easyvqa_dir() / split
    questions_file = root / "questions.json"
    found: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for question, answer, image_id in json.loads(questions_file.read_text()):
        for key, value in _facts(question, answer).items():
            found[image_id][key].add(value)
    samples, unsettled = [], []
    for image_id in sorted(found):
        origin = f"{questions_file}[image {image_id}]"
        colors, shapes = _only(found[image_id], "color", COLORS), _only(found[image_id], "shape", SHAPES)
        if len(colors) != 1 or len(shapes) != 1:
            unsettled.append(origin)
            continue
        (c,), (s,) = colors, shapes
        captions = tuple(p.format(c=c, s=s) for p in PHRASINGS)
        samples.append(CaptionSample(str(root / "images" / f"{image_id}.png"), captions, f"{c} {s}", origin))
    log.info(
        "easyvqa-captions:%s: %d images captioned; %d left out (questions do not settle colour and shape)",
        split,
        len(samples),
        len(unsettled),
    )
    return LoadedData(samples, [])


def load_captions(spec: str, on_bad_sample: str = "error") -> LoadedData:
    """Caption samples of a data spec (module docstring)."""
    if spec.startswith("easyvqa-captions:"):
        return load_easyvqa_captions(spec.split(":", 1)[1])
    if spec.startswith("fashionmnist-captions:"):
        from adaptkit.data.fashion import load_fashion_captions

        return load_fashion_captions(spec.split(":", 1)[1])
    if spec.startswith("hf:"):
        from adaptkit.data.hf import load_hf

        return load_hf(spec, _caption_from_row, on_bad_sample)
    if spec.endswith(".jsonl"):
        return load_caption_jsonl(spec, on_bad_sample)
    if spec.endswith(".json"):
        return load_coco_captions(spec, on_bad_sample)
    raise DataError(
        f"unknown caption data spec '{spec}': use easyvqa-captions:train|test, "
        "fashionmnist-captions:train|test, a caption .jsonl file, a COCO captions .json file or "
        "hf:PATH[:SPLIT]"
    )
