from __future__ import annotations

import json

import pytest
import torch

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.config import VisionConfig
from adaptkit.data.features import FeatureBank
from adaptkit.data.formats import DataError, load_easyvqa, load_jsonl, load_vqa
from adaptkit.data.images import open_image


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _ok(image="images/0.png"):
    return json.dumps({"image": image, "question": "what is the shape?", "answer": "circle"})


def test_jsonl_loads_relative_images(tiny_vqa):
    data = load_jsonl(tiny_vqa)
    assert len(data.samples) == 24 and not data.skipped
    assert data.samples[0].origin == f"{tiny_vqa}:1"
    assert data.samples[0].image.startswith(str(tiny_vqa.parent))


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"image": "images/0.png", "question": "q"', "not valid JSON"),
        ('{"image": "images/0.png", "question": "q"}', "missing key 'answer'"),
        (
            '{"image": "images/0.png", "question": "", "answer": "a"}',
            "key 'question' must be a non-empty string",
        ),
        ('["a", "b"]', "expected a JSON object"),
        (_ok("images/missing.png"), "image 'images/missing.png' not found"),
    ],
)
def test_bad_line_names_file_and_line(tiny_vqa, bad, message):
    path = _write(tiny_vqa.parent / "bad.jsonl", [_ok(), "", bad, _ok()])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert f"{path}:3" in str(err.value) and message in str(err.value)
    assert "on_bad_sample=skip" in str(err.value)


def test_skip_mode_counts_bad_lines(tiny_vqa):
    path = _write(tiny_vqa.parent / "mixed.jsonl", [_ok(), "{oops", _ok("images/nope.png"), _ok()])
    data = load_jsonl(path, on_bad_sample="skip")
    assert len(data.samples) == 2
    assert [s.split(": ")[0] for s in data.skipped] == [f"{path}:2", f"{path}:3"]


def test_unknown_spec_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="unknown data spec"):
        load_vqa("coco:train")
    with pytest.raises(DataError, match="no usable samples"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="splits"):
        load_easyvqa("val")


def test_easyvqa_splits_are_complete():
    train, test = load_easyvqa("train").samples, load_easyvqa("test").samples
    assert (len(train), len(test)) == (38575, 9673)
    assert len({s.image for s in train}) == 4000 and len({s.image for s in test}) == 1000
    assert {s.answer for s in test} <= {
        "yes",
        "no",
        "circle",
        "rectangle",
        "triangle",
        "red",
        "green",
        "blue",
        "black",
        "gray",
        "teal",
        "yellow",
        "brown",
    }


def test_undecodable_image_error_and_skip(tiny_vqa, tiny_mobilenet_pth, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=r"x\.jsonl:7: image .*broken\.png cannot be decoded"):
        open_image(str(broken), "x.jsonl:7")
    backbone = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    good = str(tiny_vqa.parent / "images" / "0.png")
    with pytest.raises(DataError, match="cannot be decoded"):
        FeatureBank.compute(backbone, [good, str(broken)], {}, torch.device("cpu"), disable_progress=True)
    bank = FeatureBank.compute(
        backbone, [good, str(broken), good], {}, torch.device("cpu"), skip_bad=True, disable_progress=True
    )
    assert list(bank.rows) == [good] and str(broken) in bank.bad
    # A cached feature equals encoding the image on the fly.
    direct = backbone(backbone.preprocess([open_image(good)]))
    torch.testing.assert_close(bank.lookup(torch.tensor([0])), direct)


def test_token_ids_share_their_int_objects():
    from adaptkit.data.collate import share_ints

    rows = [[int("1000"), int("70000"), 5], [int("70000")], []]  # int() of a str: a new object each time
    assert rows[0][1] is not rows[1][0]
    shared = share_ints(rows)
    assert shared == rows and all(type(r) is list for r in shared)
    assert shared[0][1] is shared[1][0]  # one object for one id, whichever row it is in
