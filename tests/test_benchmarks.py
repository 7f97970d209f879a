"""The benchmark scripts run end to end on tiny models and print the figures they promise."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import AT_INPUT

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize(
    "extra",
    [
        AT_INPUT,
        ["adapter.inject_layer=0", "adapter.qformer.text_conditioned=false", "pack_questions=3"],
        ["adapter.inject_layer=1", "adapter.qformer.text_conditioned=false", "pack_questions=3"],
        ["adapter.kind=xattn", "adapter.inject_layer=0", "adapter.xattn.layers=[1]", "pack_questions=3"],
    ],
    ids=["plain", "packed", "injected", "xattn"],
)
def test_train_throughput_json(tiny_overrides, extra):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_throughput.py"),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak-seconds",
        "0.5",
        *tiny_overrides,
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning: --warmup" not in out.stderr  # one warm-up step is enough uncompiled (compile=false)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("ratio", "adaptkit_samples_per_s", "reference_samples_per_s", "useful_flops_fraction"):
        assert result[key] > 0, key
    # The ratio comes from the unrounded rates; the printed rates are rounded to 2 decimals.
    expected = result["adaptkit_samples_per_s"] / result["reference_samples_per_s"]
    assert result["ratio"] == pytest.approx(expected, rel=0.02, abs=0.011)
    # Running each sample (or packed row) alone does no padded work: useful FLOPs never exceed the
    # padded batch's.
    assert 0 < result["useful_gflops_per_step"] <= result["executed_gflops_per_step"]
    assert result["adaptkit_tokens_per_sample"] <= result["adaptkit_padded_tokens_per_sample"]
    # With injection every text's lower-layer states are computed before timing: the steps run warm.
    # the tiny overrides inject at layer 1 (the xattn case: its block sits at layer 1)
    injected = "adapter.inject_layer=0" not in extra or "adapter.kind=xattn" in extra
    assert result["adaptkit_lower_state_misses"] == (0 if injected else None)


def test_train_throughput_warns_when_a_compiled_warmup_is_too_short():
    warmup_warning = _benchmark("train_throughput").warmup_warning
    assert "--warmup 1 with compile=true" in warmup_warning(True, 1)
    assert "--warmup 0" in warmup_warning(True, 0)
    assert warmup_warning(True, 2) is None and warmup_warning(False, 1) is None


def test_time_to_quality_plot(tiny_overrides, tiny_vqa, tmp_path):
    from adaptkit.cli import main

    run = tmp_path / "run"
    assert main(["train", "recipes/easyvqa_qformer_lora.yaml", *tiny_overrides, "eval_every=2"]) == 0
    assert main(["eval", str(run), "--data", str(tiny_vqa)]) == 0
    out = tmp_path / "ttq.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), str(run), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    full = json.loads((run / "eval.json").read_text())
    assert result["runs"][0]["full_split"] == full["accuracy"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ood_vqa_set_is_reproducible_balanced_and_loads(tmp_path):
    ood_vqa = _benchmark("ood_vqa")
    from PIL import Image

    from adaptkit.data.formats import load_jsonl

    first = ood_vqa.generate(tmp_path / "a", images=24, seed=3)
    again = ood_vqa.generate(tmp_path / "b", images=24, seed=3)
    other = ood_vqa.generate(tmp_path / "c", images=24, seed=4)
    assert first.read_text() == again.read_text()
    same = [(tmp_path / "a" / "images" / f"{i:04d}.png").read_bytes() for i in range(24)]
    assert same == [(tmp_path / "b" / "images" / f"{i:04d}.png").read_bytes() for i in range(24)]
    assert (
        same[0] != (tmp_path / "c" / "images" / "0000.png").read_bytes()
        and other.read_text() != first.read_text()
    )

    samples = load_jsonl(first).samples  # adaptkit's own reader takes it
    assert len(samples) == 240 and {s.answer for s in samples} <= set(ood_vqa.COLORS) | set(
        ood_vqa.SHAPES
    ) | {
        "yes",
        "no",
    }
    colour = load_jsonl(tmp_path / "a" / "colour.jsonl").samples  # the colour-only subset
    assert [(s.question, s.answer) for s in colour] == [
        (s.question, s.answer) for s in samples if s.answer in ood_vqa.COLORS
    ]
    assert len(colour) == 48
    yes_no = [s.answer for s in samples if s.answer in ("yes", "no")]
    assert len(yes_no) == 144 and 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    # Every image is 96x96, its background far from white, and the colour asked about is the one drawn:
    # the pixel nearest the colour's CSS value is within the jitter of it.
    for sample in samples[::10]:
        img = Image.open(sample.image).convert("RGB")
        assert img.size == (96, 96) and min(img.getpixel((0, 0))) <= 235
        color = next(s.answer for s in samples if s.image == sample.image and s.answer in ood_vqa.COLORS)
        target = ood_vqa.COLORS[color]
        nearest = min(sum(abs(a - b) for a, b in zip(px, target)) for px in img.getdata())
        assert nearest <= 30, (sample.image, color, nearest)


def test_region_ood_style_draws_shades_inside_each_answer_region(tmp_path):
    from PIL import Image

    from adaptkit.data.augment import border_colour, main_colour
    from adaptkit.data.colour_names import lab, named
    from adaptkit.data.formats import load_jsonl

    ood_vqa = _benchmark("ood_vqa")
    colour = load_jsonl(
        ood_vqa.generate(tmp_path, images=16, seed=1, style="region").with_name("colour.jsonl")
    )
    palette = tuple(sorted(ood_vqa.COLORS.items()))
    fills = {}
    for sample in colour.samples:
        img = Image.open(sample.image).convert("RGB")
        fills[sample.image] = fill = main_colour(img, list(border_colour(img)))
        assert named(lab(fill), palette) == sample.answer, (sample.image, sample.answer, fill)
    assert len(set(fills.values()) - set(ood_vqa.COLORS.values())) >= 12  # drawn shades, not the CSS ones


def test_like_easyvqa_gives_back_one_trait_and_keeps_the_rest(tmp_path):
    import numpy as np
    from PIL import Image

    from adaptkit.data.augment import border_colour, main_colour

    ood_vqa = _benchmark("ood_vqa")

    def images(name: str, *factors: str) -> list:
        ood_vqa.generate(tmp_path / name, images=12, seed=5, style="region", like_easyvqa=factors)
        paths = sorted((tmp_path / name / "images").iterdir())
        return [np.asarray(Image.open(p).convert("RGB")).astype(int) for p in paths]

    def fill(img) -> tuple:
        pil = Image.fromarray(img.astype(np.uint8))
        return main_colour(pil, list(border_colour(pil)))

    def width(img) -> float:  # the shape's widest extent, as a share of the canvas
        ys, xs = np.nonzero(np.abs(img - img[0, 0]).sum(-1) > 60)
        return max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / img.shape[0]

    ours, flat = images("ours"), images("flat", "background")
    sized, easy = images("sized", "size"), images("easy", "background", "size", "rotation", "canvas")
    # The same shades throughout: only the named trait changes.
    assert [fill(i) for i in ours] == [fill(i) for i in flat] == [fill(i) for i in easy]
    for a, b in zip(ours, flat):
        corners = [b[0, 0], b[0, -1], b[-1, 0], b[-1, -1]]
        assert all((c == corners[0]).all() and c.min() >= 230 for c in corners)  # flat, near white
        here, there = (np.abs(i - i[0, 0]).sum(-1) > 100 for i in (a, b))
        overlap = (here & there).sum() / (here | there).sum()
        assert here.sum() > 20 and overlap > 0.8  # the same shape in the same place
    assert {i.shape[:2] for i in ours} == {(96, 96)} and {i.shape[:2] for i in easy} == {(64, 64)}
    assert all(width(s) >= width(o) for s, o in zip(sized, ours))  # the same draws, easy-VQA's sizes
    assert np.mean([width(s) for s in sized]) > np.mean([width(o) for o in ours]) + 0.05
    with pytest.raises(ValueError, match="like_easyvqa"):
        ood_vqa.generate(tmp_path / "bad", images=2, style="textured", like_easyvqa=("size",))


def test_textured_ood_style_is_reproducible_jpeg_and_keeps_the_colour(tmp_path):
    ood_vqa = _benchmark("ood_vqa")
    import numpy as np
    from PIL import Image

    from adaptkit.data.formats import load_jsonl

    first = ood_vqa.generate(tmp_path / "a", images=24, seed=3, style="textured")
    again = ood_vqa.generate(tmp_path / "b", images=24, seed=3, style="textured")
    assert first.read_text() == again.read_text()
    names = [f"images/{i:04d}.jpg" for i in range(24)]
    assert [(tmp_path / "a" / n).read_bytes() for n in names] == [
        (tmp_path / "b" / n).read_bytes() for n in names
    ]
    samples = load_jsonl(first).samples
    assert len(samples) == 240
    sizes = set()
    for sample in samples[::10]:
        img = Image.open(sample.image)
        assert img.format == "JPEG"
        sizes.add(img.size[0])
        color = next(s.answer for s in samples if s.image == sample.image and s.answer in ood_vqa.COLORS)
        pixels = np.asarray(img.convert("RGB"), dtype=np.int64).reshape(-1, 3)
        # Grain, outlines and JPEG move pixels (the smallest shapes keep only a few); the 3 pixels nearest
        # the colour stay near it.
        distance = np.sort(np.abs(pixels - np.array(ood_vqa.COLORS[color])).sum(1))[:3].mean()
        assert distance <= 100, (sample.image, color, distance)
    assert len(sizes) > 1 and sizes <= {80, 128, 160}
    with pytest.raises(ValueError, match="style"):
        ood_vqa.generate(tmp_path / "c", images=3, style="other")


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the CPU behaviour (on a GPU it runs for real)"
)
def test_gpu_check_runs_its_cpu_parts_and_skips_the_rest(tiny_overrides, tmp_path):
    report_file = tmp_path / "report.json"
    overrides = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(report_file), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(report_file.read_text())
    assert report == json.loads(out.stdout.strip().splitlines()[-1])
    assert report["env"]["cuda_available"] is False and report["device"] == "cpu"
    for mode in ("none", "8bit", "4bit"):
        assert report["placement"][mode]["ok"], mode
    assert report["placement"]["4bit"]["bnb_layers"]["Linear4bit"] > 0
    train = report["train"]
    assert train["ok"]
    for mode in ("fp32", "8bit", "4bit"):
        run = train[mode]
        assert run["ok"] and run["steps"] == 4 and run["last_loss"] > 0, mode
        assert run["peak_memory_mb"]["training"] > 0
    assert "slow" in train["bf16_autocast"]["skipped"]
    assert "CUDA" in report["throughput"]["skipped"]
    assert "skipped" in report["large"]


def test_augment_probe_json(tiny_mobilenet_pth, tiny_vqa):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "augment_probe.py"),
        "--train-images",
        "12",
        "--test-images",
        "12",
        "--ood",
        str(tiny_vqa),
        f"vision.weights={tiny_mobilenet_pth}",
        "vision.image_size=64",
        "vision.extra_layers=[]",
        "data.augment.views=2",
        "data.augment.background=0.5",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["train_images"] == 12 and result["train_views_encoded"] == 36  # each image + 2 views
    for task in ("colour", "shape"):
        assert set(result[task]) == {"easyvqa_test", str(tiny_vqa)}
        assert all(0 <= r["accuracy"] <= 1 for r in result[task].values())


def _run_script(name: str, args: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_feature_store_scale_reports_both_sizes(tiny_overrides, tmp_path):
    args = ["--images", "40", "80", "--tokens", "4", "--dim", "32", "--steps", "2", "--warmup", "1"]
    result = _run_script(
        "feature_store_scale.py", [*args, "--store", str(tmp_path / "store"), *tiny_overrides]
    )
    assert [row["images"] for row in result["rows"]] == [40, 80]
    for row in result["rows"]:
        assert row["peak_rss_mb"] > 0 and row["samples_per_s"] > 0
    assert result["peak_rss_ratio"] == pytest.approx(
        result["rows"][1]["peak_rss_mb"] / result["rows"][0]["peak_rss_mb"], abs=0.001
    )
    assert not any((tmp_path / "store").rglob("*.safetensors"))  # the stores are removed without --keep


def test_feature_lookup_times_the_store_against_memory(tiny_overrides):
    result = _run_script("feature_lookup.py", ["--images", "4", "--batches", "5", *tiny_overrides])
    assert result["rows"] == 6 and result["store_ms"] > 0 and result["images_per_batch"] == 4


def test_encoding_compares_eager_with_compiled(tiny_overrides):
    result = _run_script("encoding.py", ["--images", "6", "--batch", "2", *tiny_overrides])
    assert result["images"] == 6 and result["compiled"]
    assert result["eager_ms_per_image"] > 0 and result["compiled_ms_per_image"] > 0
    # The same features up to float32 rounding.
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_feature"])


def test_colour_cloud_reads_a_lit_shape_and_votes_by_its_neighbours():
    from PIL import Image, ImageDraw

    cloud = _benchmark("colour_cloud")
    twin = Image.new("RGB", (64, 64), (240, 238, 236))
    ImageDraw.Draw(twin).ellipse((12, 12, 52, 52), fill=(200, 0, 0))
    lit = Image.eval(twin, lambda v: int(v * 0.8))  # the same view, dimmed: the shape is found in the twin
    assert cloud.shape_colour(lit, twin) == (160, 0, 0)
    assert cloud.shape_colour(twin, twin) == (200, 0, 0)
    assert cloud.shape_colour(twin, Image.new("RGB", (64, 64), (240, 238, 236))) is None  # no shape
    points = [(cloud.lab((150, 0, 0)), "red")] * 3 + [(cloud.lab((165, 42, 42)), "brown")] * 2
    assert cloud.vote(points, (155, 5, 5), k=3) == [("red", 3)]
    assert cloud.vote(points, (165, 40, 40), k=5) == [("red", 3), ("brown", 2)]


def test_colour_diagnosis_sets_hold_the_shades_they_promise(tmp_path):
    from PIL import Image

    from adaptkit.data.augment import border_colour, main_colour
    from adaptkit.data.colour_names import lab, named, shades

    diagnosis = _benchmark("colour_diagnosis")
    counts = diagnosis.generate(tmp_path, images=4)
    assert set(counts) == {"train_views", "test_region", "test_held"} and all(counts.values())
    palette = tuple(sorted(_benchmark("ood_vqa").COLORS.items()))
    for name in counts:
        rows = [json.loads(line) for line in (tmp_path / name / "questions.jsonl").read_text().splitlines()]
        for row in rows:
            img = Image.open(tmp_path / name / row["image"]).convert("RGB")
            fill = main_colour(img, list(border_colour(img)))
            if name == "test_held":  # a held-out survey shade of the answer, never easy-VQA's own colour
                assert fill in shades(row["answer"], "held_out"), (row, fill)
            elif name == "test_region":  # inside the answer's region, as training draws them
                assert named(lab(fill), palette) == row["answer"] and fill != dict(palette)[row["answer"]]
            else:  # training views (1 to 4; 0 is the image itself) that were given a drawn shade
                assert "_0." not in row["image"]
