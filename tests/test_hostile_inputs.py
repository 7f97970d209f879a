"""Hostile and damaged inputs (issue 30): each is refused with one line naming the file and what to do, and
exit status 2, or handled as the promise says, without tracebacks, without loading the machine and without
losing anything a user had. Each case asserts the exit code and the first line of the message."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from adaptkit.cli import main

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def _first_line(capsys) -> str:
    """The message: one ``adaptkit CMD: error: ...`` line and no traceback (progress bars of model loading
    may precede it on stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("adaptkit ") and ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- bounded inputs ---------------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """A 300-byte recipe of nested aliases would expand to billions of entries."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level, name in enumerate("bcdefg"):
        prev = "abcdefg"[level]
        lines.append(
            f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]"
        )
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 400
    start = time.perf_counter()
    assert main(["train", str(bomb)]) == 2
    assert time.perf_counter() - start < 5
    line = _first_line(capsys)
    assert f"{bomb}:2: YAML aliases (*a) are not allowed in recipes" in line
    assert main(["recipe", "show", str(bomb)]) == 2
    assert "YAML aliases" in _first_line(capsys)


def test_an_oversized_or_binary_recipe_is_refused(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("max_steps: 3\n" + "# padding\n" * 200_000)
    assert main(["train", str(big)]) == 2
    assert "bytes is not a recipe" in _first_line(capsys)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"max_steps: 3\n\xff\xfe\x00junk\n")
    assert main(["train", str(binary)]) == 2
    assert f"{binary}: not UTF-8 text" in _first_line(capsys)


# ---- never overwrite a user's run -------------------------------------------------------------------


def test_a_crashed_run_directory_is_never_written_over(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"  # the tiny overrides' output_dir
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "manifest.json").write_text("{}")
    (run / "recipe.yaml").write_text("max_steps: 4\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    before = _tree_digest(run)
    assert main(["train", RECIPE, *tiny_overrides]) == 2
    line = _first_line(capsys)
    assert f"output_dir {run} already holds files" in line and "nothing was overwritten" in line
    assert "checkpoints/" in line and "recipe.yaml" in line
    assert _tree_digest(run) == before


def test_a_folder_of_other_files_is_not_a_run_directory(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    assert main(["train", RECIPE, *tiny_overrides]) == 2
    assert "already holds files (notes.txt)" in _first_line(capsys)
    assert (run / "notes.txt").read_text() == "my notes"
    (run / "notes.txt").unlink()  # an empty directory is fine to start in
    assert main(["recipe", "show", RECIPE, *tiny_overrides]) == 0


# ---- bad lines stay bad lines -----------------------------------------------------------------------


def test_a_line_that_is_not_utf8_is_one_bad_sample(tiny_overrides, tiny_vqa, tmp_path, capsys):
    from adaptkit.data.formats import load_vqa

    rows = [json.loads(line) for line in tiny_vqa.read_text().splitlines()]
    lines = [json.dumps({**r, "image": str(tiny_vqa.parent / r["image"])}).encode() + b"\n" for r in rows]
    image = str(tiny_vqa.parent / "images" / "0.png")
    bad = json.dumps({"image": image, "question": "what colour?", "answer": "red"}).encode()
    bad = bad.replace(b"colour", b"col\xe9ur")  # Latin-1, not UTF-8
    column = bad.index(b"\xe9") + 1
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"".join(lines[:3]) + bad + b"\n" + b"".join(lines[3:]))
    loaded = load_vqa(str(data), "skip")  # the other lines are read; the bad one is skipped and counted
    assert len(loaded.samples) == len(lines)
    assert loaded.skipped == [
        f"{data}:4: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8"
    ]
    strict = [*tiny_overrides, f"data.train={data}", "data.on_bad_sample=error"]
    assert main(["train", RECIPE, *strict]) == 2
    assert _first_line(capsys).startswith(f"adaptkit train: error: {data}:4: not UTF-8 text (byte 0xe9")


def test_a_decompression_bomb_is_refused_by_predict_and_the_api(tiny_run, tmp_path, capsys):
    """The pixel limit training applies holds for predict and the Python API, before any pixel is decoded
    (the demo's is tested in tests/test_demo.py)."""
    import pytest
    from PIL import Image

    from adaptkit.data.records import DataError
    from adaptkit.inference import load_for_inference
    from tests.conftest import bomb_png

    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    assert bomb.stat().st_size < 1000
    assert main(["predict", str(tiny_run), "--image", str(bomb), "--question", "what is it?"]) == 2
    assert f"image {bomb} is a decompression bomb" in _first_line(capsys)
    predictor = load_for_inference(tiny_run, "cpu")
    with pytest.raises(DataError, match="is a decompression bomb"):
        predictor.predict(bomb.read_bytes(), "what is it?")
    # Opened by the caller, not decoded: its size alone refuses it.
    with Image.open(bomb) as lazy, pytest.raises(DataError, match="12000x12000 pixels is more than"):
        predictor.predict(lazy, "what is it?")


# ---- bounded texts -----------------------------------------------------------------------------------


def _with_a_huge_question(tiny_vqa: Path, tmp_path: Path, words: int = 200_000) -> tuple[Path, int]:
    rows = [json.loads(line) for line in tiny_vqa.read_text().splitlines()]
    rows = [{**r, "image": str(tiny_vqa.parent / r["image"])} for r in rows]
    huge = {**rows[0], "question": "what is the shape " * (words // 4)}  # ~1 MB, ~200k LM tokens
    data = tmp_path / "huge.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:5], huge, *rows[5:]]))
    return data, 6


def test_an_oversized_text_is_a_bad_sample(tiny_overrides, tiny_vqa, tmp_path, capsys):
    data, line = _with_a_huge_question(tiny_vqa, tmp_path)
    strict = [*tiny_overrides, f"data.train={data}", "data.on_bad_sample=error"]
    assert main(["train", RECIPE, *strict]) == 2
    message = _first_line(capsys)
    assert f"{data}:{line}: its text is " in message and "more than data.max_text_tokens=1024" in message
    # The failed start left only its recipe and log: the same output_dir may start again.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "metrics.jsonl",
        "recipe.yaml",
        "train.log",
    ] or sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml", "train.log"]
    skip = [*tiny_overrides, f"data.train={data}", "data.max_skip_ratio=0.1", "max_steps=2"]
    assert main(["train", RECIPE, *skip]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and "max_text_tokens" in summary["skipped"]["train"][0]


def test_long_texts_can_be_cut_to_fit_instead(tiny_overrides, tiny_vqa, tmp_path):
    from adaptkit.data.collate import fit
    from adaptkit.recipes import load_recipe
    from adaptkit.tasks import get_task

    assert fit([1, 2, 3, 4], [7, 8, 9], 5) == ([3, 4], [7, 8, 9])  # the prompt's start goes first
    assert fit([1, 2, 3, 4], [7, 8, 9, 2], 3) == ([4], [7, 2])  # then the target's end, EOS kept
    assert fit([1, 2], [7, 2], 9) == ([1, 2], [7, 2])
    data, _ = _with_a_huge_question(tiny_vqa, tmp_path, words=400)
    recipe = load_recipe(
        RECIPE, [*tiny_overrides, f"data.train={data}", "data.long_text=truncate", "data.max_text_tokens=12"]
    )
    task = get_task(recipe)
    from transformers import AutoTokenizer

    from adaptkit.data.splits import bound_text_length

    tokenizer = AutoTokenizer.from_pretrained(recipe.language.name)
    samples = task.load(str(data)).samples
    kept, skipped = bound_text_length(task, samples, tokenizer, "error")
    assert len(kept) == len(samples) and not skipped
    rows = {s.image: 0 for s in samples}
    dataset = task.dataset(samples, rows, tokenizer)
    lengths = [len(dataset[i]["prompt"]) + len(dataset[i]["target"]) for i in range(len(dataset))]
    assert max(lengths) <= 12 and all(
        dataset[i]["target"][-1] == tokenizer.eos_token_id for i in range(len(dataset))
    )


def test_cut_captions_fit_beside_their_fixed_prompt(tiny_lm_dir):
    """Caption pairs share one prompt, so truncation cuts the caption alone: prompt + caption fit."""
    from transformers import AutoTokenizer

    from adaptkit.data.captions import CaptionSample
    from adaptkit.data.pairs import PairDataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    sample = CaptionSample("a.png", ("a red circle " * 20, "a blue circle"), None, "x.jsonl:1")
    prompt = "what is the color of the shape ?"  # 8 tokens of the tiny word-level vocabulary
    data = PairDataset([sample], {"a.png": 0}, tokenizer, prompt, max_tokens=12)
    assert len(data.prompt_ids) == 8
    for target in data.target_ids:
        assert len(data.prompt_ids) + len(target) <= 12 and target[-1] == tokenizer.eos_token_id
    assert len(data.target_ids[1]) == 4  # " a blue circle" + EOS fitted as it was
