"""Unusable dataset images are converted where sensible, otherwise skipped and counted, and a run stops
with the list of bad files when too many samples are bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from adaptkit.cli import main
from adaptkit.data.formats import DataError
from adaptkit.data.images import open_image

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "easyvqa_qformer_lora.yaml")

BAD = {
    "missing.png": "does not exist",
    "empty.png": "is empty (0 bytes)",
    "truncated.png": "cannot be decoded, truncated or corrupt (image file is truncated)",
    "notes.png": "is not an image PIL can identify",
    "dot.png": "is too small (1x1 pixels",
    "bomb.png": "is a decompression bomb",
}
CONVERTED = ("cmyk.jpg", "rgba.png", "gray.png", "gray16.png", "palette.gif")


def make_images(folder: Path, good: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(good).convert("RGB")
    (folder / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    Image.new("RGB", (1, 1), "red").save(folder / "dot.png")
    Image.new("1", (10_000, 9_000)).save(folder / "bomb.png")  # 90 M pixels: over PIL's 89.5 M limit
    base.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = Image.new("RGBA", base.size, (0, 0, 0, 0))
    rgba.paste(base, mask=Image.eval(base.convert("L"), lambda v: 255 if v < 200 else 0))
    rgba.save(folder / "rgba.png")
    base.convert("L").save(folder / "gray.png")
    base.convert("L").point(lambda v: v * 256, "I").convert("I;16").save(folder / "gray16.png")
    base.convert("P").save(folder / "palette.gif")


@pytest.fixture
def bad_folder(tiny_vqa, tmp_path) -> Path:
    folder = tmp_path / "images"
    make_images(folder, tiny_vqa.parent / "images" / "0.png")
    return folder


@pytest.mark.parametrize("name", sorted(BAD))
def test_unusable_images_raise_with_reason(bad_folder, name):
    with pytest.raises(DataError) as err:
        open_image(str(bad_folder / name), "data.jsonl:7")
    assert str(err.value).startswith(f"data.jsonl:7: image {bad_folder / name} {BAD[name]}")


@pytest.mark.parametrize("name", CONVERTED)
def test_other_modes_are_converted_to_rgb(bad_folder, tiny_vqa, name):
    img = open_image(str(bad_folder / name))
    reference = Image.open(tiny_vqa.parent / "images" / "0.png").convert("RGB")
    assert img.mode == "RGB" and img.size == reference.size
    if name == "rgba.png":  # transparent pixels become white, not black
        assert img.getpixel((0, 0)) == (255, 255, 255)
        assert img.getpixel((32, 32)) == reference.getpixel((32, 32))
    if name in ("gray.png", "gray16.png"):  # 16-bit is rescaled, not clipped to white
        r, g, b = img.getpixel((32, 32))
        assert r == g == b and abs(r - reference.convert("L").getpixel((32, 32))) <= 2


def _data_with_bad_images(tiny_vqa: Path, folder: Path, copies: int) -> Path:
    """The tiny set repeated ``copies`` times, plus one question per bad and per converted image."""
    rows = [json.loads(line) for line in tiny_vqa.read_text().splitlines()]
    shutil.copytree(tiny_vqa.parent / "images", folder / "images")
    lines = [{**r, "image": r["image"]} for _ in range(copies) for r in rows]
    for name in [*BAD, *CONVERTED]:
        if name != "missing.png":
            shutil.copy2(folder.parent / "images_src" / name, folder / name)
        lines.append({"image": name, "question": "what is the shape?", "answer": "circle"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("cache_features", ["true", "false"])
def test_training_skips_and_counts_bad_images(
    tiny_overrides, tiny_vqa, bad_folder, tmp_path, capsys, cache_features
):
    bad_folder.rename(tmp_path / "images_src")
    data = _data_with_bad_images(tiny_vqa, tmp_path / "data", copies=30)  # 720 good + 11 odd samples
    base = [o for o in tiny_overrides if not o.startswith(("data.", "output_dir=", "eval_limit="))]
    args = [
        *base,
        f"data.train={data}",
        f"data.eval={data}",
        f"cache_features={cache_features}",
        "max_steps=2",
    ]
    out = tmp_path / "run"
    assert main(["train", RECIPE, *args, f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_samples"] == len(BAD)
    skipped = " ".join(summary["skipped"]["train"])
    assert all(name in skipped for name in BAD) and not any(name in skipped for name in CONVERTED)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["skipped_train"] == len(BAD)
    log = (out / "train.log").read_text()
    assert f"train samples ({len(BAD)} skipped)" in log and "whose image is unusable" in log
    capsys.readouterr()

    # Over the limit (6 of 731 = 0.8% > 0.5%), the run stops before training and lists the bad files.
    assert main(["train", RECIPE, *args, "data.max_skip_ratio=0.005", f"output_dir={tmp_path / 'r2'}"]) == 2
    err = capsys.readouterr().err
    assert "more than data.max_skip_ratio=0.005" in err and all(name in err for name in BAD)
    assert not (tmp_path / "r2" / "metrics.jsonl").exists()
