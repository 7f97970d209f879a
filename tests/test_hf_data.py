"""Hugging Face datasets as data specs (save_to_disk folder, parquet with an Image column, imagefolder with
metadata.jsonl), VQAv2-style answer lists, and the official VQA accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adaptkit.data.captions import load_captions
from adaptkit.data.formats import DataError, load_jsonl, load_vqa
from adaptkit.metrics import VQAAccuracy, vqa_normalize


@pytest.fixture
def images(tiny_vqa, tmp_path, monkeypatch) -> list[Path]:
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    return [tiny_vqa.parent / "images" / f"{i}.png" for i in range(3)]


def _dataset(images, **columns):
    import datasets

    return datasets.Dataset.from_dict({"image": [str(p) for p in images], **columns}).cast_column(
        "image", datasets.Image()
    )


def test_save_to_disk_folder_with_vqav2_answers(images, tmp_path):
    answers = [["2"] * 3 + ["3"] * 7, ["red"] * 10, ["yes", "no"] * 5]
    folder = tmp_path / "vqa_ds"
    _dataset(images, question=["how many?", "what color?", "is it?"], answers=answers).save_to_disk(folder)
    data = load_vqa(f"hf:{folder}")
    assert [s.answer for s in data.samples] == ["3", "red", "yes"]  # the most frequent (first of a tie)
    assert data.samples[0].answers == tuple(answers[0]) and data.samples[0].origin.endswith("[row 0]")
    for sample, original in zip(data.samples, images):  # the stored bytes, written once, unchanged
        assert Path(sample.image).read_bytes() == original.read_bytes()
    again = load_vqa(f"hf:{folder}")
    assert [s.image for s in again.samples] == [s.image for s in data.samples]


def test_parquet_and_imagefolder_captions(images, tmp_path):
    parquet = tmp_path / "captions.parquet"
    _dataset(
        images, captions=[["a red circle", "red round"], ["a red square"], ["x"]], label=["a", "b", "c"]
    ).to_parquet(str(parquet))
    data = load_captions(f"hf:{parquet}")
    assert data.samples[0].captions == ("a red circle", "red round") and data.samples[1].label == "b"

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rows = []
    for i, path in enumerate(images):
        shutil.copy(path, folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_captions(f"hf:{folder}")
    assert sorted(s.captions[0] for s in data.samples) == ["caption 0", "caption 1", "caption 2"]


def test_bad_rows_and_specs_are_named(images, tmp_path):
    folder = tmp_path / "bad"
    _dataset(images, question=["ok?", "", "fine?"], answer=["yes", "no", "no"]).save_to_disk(folder)
    with pytest.raises(DataError, match=r"bad\[row 1\]: key 'question' must be a non-empty string"):
        load_vqa(f"hf:{folder}")
    skipped = load_vqa(f"hf:{folder}", "skip")
    assert len(skipped.samples) == 2 and "[row 1]" in skipped.skipped[0]
    with pytest.raises(DataError, match="no such file or folder"):
        load_vqa(f"hf:{tmp_path / 'nowhere'}")
    no_image = tmp_path / "no_image"
    import datasets

    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(no_image)
    with pytest.raises(DataError, match="no 'image' column"):
        load_vqa(f"hf:{no_image}")


def test_vqav2_jsonl_lines(tiny_vqa):
    path = tiny_vqa.parent / "vqav2.jsonl"
    lines = [
        {"image": "images/0.png", "question": "what color?", "answers": ["red"] * 6 + ["dark red"] * 4},
        {"image": "images/1.png", "question": "what shape?", "answer": "square", "answers": ["box"] * 10},
        {"image": "images/1.png", "question": "what shape?", "answers": []},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError, match=r"vqav2.jsonl:3: key 'answers' must be a non-empty list"):
        load_jsonl(path)
    samples = load_jsonl(path, "skip").samples
    assert [(s.answer, len(s.answers)) for s in samples] == [("red", 10), ("square", 10)]


def test_official_vqa_accuracy():
    # 3 of 10 annotators said "2": 3 of the 10 leave-one-out subsets hold two "2"s (2/3), 7 hold three (1).
    got = VQAAccuracy().compute(
        predictions=["two", "yes", "cat"], references=[["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["dog"] * 10]
    )
    assert got["vqa_accuracy"] == pytest.approx(((3 * 2 / 3 + 7) / 10 + 1 + 0) / 3)
    assert vqa_normalize("The two dogs.") == "2 dogs" and vqa_normalize("dont") == "don't"
    assert vqa_normalize("1,000") == "1000" and vqa_normalize("yes!") == "yes"


def test_a_vqa_run_on_vqav2_style_data_reports_the_official_accuracy(tiny_overrides, tiny_vqa, tmp_path):
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train

    rows = [json.loads(line) for line in tiny_vqa.read_text().splitlines()]
    for row in rows:  # ten annotators: seven agree with the reference, three say something else
        row["answers"] = [row.pop("answer")] * 7 + ["other"] * 3
    path = tiny_vqa.parent / "vqav2_tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [o for o in tiny_overrides if not o.startswith(("data.train=", "data.eval="))]
    recipe = load_recipe(
        "recipes/easyvqa_qformer_lora.yaml", [*overrides, f"data.train={path}", f"data.eval={path}"]
    )
    metrics = train(recipe)["eval"]
    # a prediction equal to the 7-annotator answer scores 1 in both metrics; any other scores 0 in exact match
    assert metrics["accuracy"] <= metrics["vqa_accuracy"] <= 1
    predictions = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_vqa_accuracy" in r for r in predictions)
