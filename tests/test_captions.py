"""Caption data formats: caption JSONL, COCO captions JSON, captions derived from easy-VQA's labels; good
files load, malformed ones name the file and line (or entry), or are skipped and counted."""

from __future__ import annotations

import json

import pytest

from adaptkit.data.captions import (
    PHRASINGS,
    _facts,
    load_caption_jsonl,
    load_captions,
    load_coco_captions,
    load_easyvqa_captions,
)
from adaptkit.data.formats import DataError


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_caption_jsonl_one_or_several_captions_and_labels(tiny_captions, tiny_vqa, tmp_path):
    data = load_caption_jsonl(tiny_captions)
    assert len(data.samples) == 6 and not data.skipped
    first = data.samples[0]
    assert first.captions == ("a red circle", "is there a red circle") and first.label == "red circle"
    assert first.image == str((tiny_vqa.parent / "images" / "0.png").resolve())
    image = str(tiny_vqa.parent / "images" / "0.png")  # absolute paths work too
    single = _write(tmp_path / "one.jsonl", [{"image": image, "caption": "  a red circle  "}])
    sample = load_captions(single).samples[0]
    assert sample.captions == ("a red circle",) and sample.label is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"caption": "a circle"}, "missing key 'image'"),
        ({"image": "images/0.png"}, "missing key 'caption'"),
        ({"image": "images/0.png", "caption": "x", "captions": ["y"]}, "both 'caption' and 'captions'"),
        ({"image": "images/0.png", "captions": []}, "non-empty strings"),
        ({"image": "images/0.png", "captions": ["ok", 3]}, "non-empty strings"),
        ({"image": "images/0.png", "caption": "x", "label": ""}, "key 'label'"),
        ({"image": "images/missing.png", "caption": "x"}, "not found"),
    ],
)
def test_bad_caption_line_names_file_and_line(tiny_vqa, row, message):
    path = _write(tiny_vqa.parent / "bad_captions.jsonl", [{"image": "images/1.png", "caption": "ok"}, row])
    with pytest.raises(DataError, match=rf"bad_captions.jsonl:2: .*{message}"):
        load_caption_jsonl(path)
    data = load_caption_jsonl(path, "skip")
    assert len(data.samples) == 1 and len(data.skipped) == 1 and ":2: " in data.skipped[0]


def test_coco_captions(tiny_vqa, tmp_path):
    images = tiny_vqa.parent / "images"
    doc = {
        "images": [
            {"id": 1, "file_name": str(images / "0.png")},
            {"id": 2, "file_name": str(images / "1.png")},
            {"id": 3, "file_name": str(images / "2.png")},  # no caption: left out
        ],
        "annotations": [
            {"image_id": 1, "caption": "a red circle"},
            {"image_id": 2, "caption": "a red rectangle"},
            {"image_id": 1, "caption": "a circle, red"},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(doc))
    data = load_captions(str(path))
    assert [s.captions for s in data.samples] == [("a red circle", "a circle, red"), ("a red rectangle",)]
    doc["annotations"] += [{"image_id": 2}, {"image_id": 4, "caption": "a missing image"}]
    doc["images"].append({"id": 4, "file_name": "nowhere.png"})
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"captions.json\[annotations\]\[3\]: needs 'image_id'"):
        load_coco_captions(path)
    skipped = load_coco_captions(path, "skip")
    assert len(skipped.samples) == 2 and len(skipped.skipped) == 2
    assert "[images][3]" in skipped.skipped[1] and "not found" in skipped.skipped[1]
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a COCO captions file"):
        load_coco_captions(path)


def test_unknown_caption_spec():
    with pytest.raises(DataError, match="unknown caption data spec"):
        load_captions("captions.csv")
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        load_captions("easyvqa-captions:val")


@pytest.mark.parametrize(
    ("question", "answer", "facts"),
    [
        ("what color is the shape?", "red", {"color": "red"}),
        ("what is the color of the triangle?", "teal", {"color": "teal", "shape": "triangle"}),
        ("what shape is present?", "circle", {"shape": "circle"}),
        ("what is the blue shape?", "rectangle", {"shape": "rectangle", "color": "blue"}),
        ("is there a gray shape?", "yes", {"color": "gray"}),
        ("is there not a gray shape?", "no", {"color": "gray"}),
        ("is no circle present?", "yes", {"not shape": "circle"}),
        ("does the image not contain a red shape?", "yes", {"not color": "red"}),
    ],
)
def test_easyvqa_question_facts(question, answer, facts):
    assert _facts(question, answer) == facts


def test_easyvqa_captions_agree_with_the_questions():
    """Every derived label agrees with every question asked about its image."""
    from adaptkit import assets

    data = load_easyvqa_captions("test")
    assert 850 <= len(data.samples) <= 1000 and not data.skipped
    labels = {s.image: s.label for s in data.samples}
    assert len(set(labels.values())) == 24
    sample = data.samples[0]
    color, shape = sample.label.split()
    assert sample.captions == tuple(p.format(c=color, s=shape) for p in PHRASINGS)
    root = assets.easyvqa_dir() / "test"
    for question, answer, image_id in json.loads((root / "questions.json").read_text()):
        label = labels.get(str(root / "images" / f"{image_id}.png"))
        if label is None:
            continue
        color, shape = label.split()
        facts = _facts(question, answer)
        assert facts.get("color", color) == color and facts.get("shape", shape) == shape
        assert facts.get("not color") != color and facts.get("not shape") != shape
