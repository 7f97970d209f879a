"""`adaptkit export`: LoRA merged into a full-precision LM, a self-contained folder that verifies itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.artifacts import EXPORT_FILE, ExportError, read_manifest
from adaptkit.cli import main
from adaptkit.export import export_run
from adaptkit.inference import load_for_inference


def _lm_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_export_round_trip_fp32(tiny_run, tiny_lm_dir, tiny_vqa, tmp_path):
    out = tmp_path / "export"
    manifest = export_run(tiny_run, out)
    ver = manifest["verification"]
    assert ver["passed"] and ver["answers_identical"] == 1.0
    assert ver["max_abs_logit_diff"] <= 1e-4
    assert json.loads((out / "verification.json").read_text()) == ver
    for rel in ("lm/config.json", "lm/model.safetensors", "adapter.safetensors", "recipe.yaml", "README.md"):
        assert (out / rel).is_file(), rel
    expected_files = {"lm/model.safetensors", "adapter.safetensors", "vision/weights.safetensors"}
    assert expected_files <= set(manifest["files"])
    assert manifest["answers"] and set(manifest["answers"]) >= {"yes", "no", "red", "circle"}
    assert not (out.parent / "export.partial").exists()

    # The merge changed the LoRA-targeted projections (and nothing else).
    merged, base = _lm_weights(out / "lm"), _lm_weights(tiny_lm_dir)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)

    # Same answers from the run and from its export, sample by sample.
    samples = [json.loads(line) for line in tiny_vqa.read_text().splitlines()]
    images = [str(tiny_vqa.parent / s["image"]) for s in samples]
    questions = [s["question"] for s in samples]
    from_run = load_for_inference(tiny_run, "cpu").answer_batch(images, questions)
    from_export = load_for_inference(out, "cpu").answer_batch(images, questions)
    assert [a.text for a in from_run] == [a.text for a in from_export]
    assert [a.score for a in from_run] == pytest.approx([a.score for a in from_export], abs=1e-4)


def test_export_eval_gives_the_run_accuracy(tiny_run, tiny_vqa, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    assert "verified on" in capsys.readouterr().out
    results = []
    for folder in (tiny_run, out):
        assert main(["eval", str(folder), "--data", str(tiny_vqa), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["n"] == results[1]["n"] == 24
    run_preds = (tiny_run / "eval_predictions.jsonl").read_text().splitlines()
    export_preds = (out / "eval_predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["prediction"] for r in run_preds] == [
        json.loads(r)["prediction"] for r in export_preds
    ]


def test_merged_lm_loads_with_stock_transformers_without_peft(tiny_run, tmp_path):
    out = tmp_path / "export"
    export_run(tiny_run, out)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'lm')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out / 'lm')!r})\n"
        "ids = t('what is the shape ?', return_tensors='pt').input_ids\n"
        "assert torch.isfinite(m(ids).logits).all()\n"
        "assert not [k for k in sys.modules if k == 'peft' or k.startswith('peft.')], 'peft was imported'\n"
        "print('ok', type(m).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok LlamaForCausalLM" in done.stdout


def test_export_of_4bit_run_merges_in_full_precision(tiny_run_4bit, tmp_path, capsys):
    out = tmp_path / "export4"
    assert main(["export", str(tiny_run_4bit), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "never into quantized weights" in text and "dequantized" in text
    manifest = read_manifest(out)
    assert manifest["language"]["trained_quant"] == "4bit"
    ver = manifest["verification"]
    assert ver["passed"] and ver["answers_identical"] == 1.0 and ver["max_abs_logit_diff"] <= 1e-4
    assert ver["logits_compared_in"] == "float64"
    # Merged into the dequantized 4-bit weights LoRA was trained against: the run's own answers.
    assert ver["answers_identical_to_trained_4bit"] == 1.0
    config = json.loads((out / "lm" / "config.json").read_text())
    assert "quantization_config" not in config
    weights = _lm_weights(out / "lm")
    assert all(w.dtype == torch.float32 for w in weights.values())

    original = tmp_path / "export4-original"
    assert main(["export", str(tiny_run_4bit), "--out", str(original), "--merge-base", "original"]) == 0
    assert "the original checkpoint" in capsys.readouterr().out
    assert read_manifest(original)["verification"]["passed"]
    other = _lm_weights(original / "lm")
    name = next(k for k in weights if "mlp.up_proj" in k)  # not LoRA-targeted: base weights only
    assert not torch.equal(weights[name], other[name])  # NF4 rounding vs the original checkpoint


def test_bfloat16_export_within_its_documented_bound(tiny_run, tmp_path):
    manifest = export_run(tiny_run, tmp_path / "bf16", dtype="bfloat16")
    ver = manifest["verification"]
    assert ver["passed"] and ver["tolerance"] == 2.0
    assert all(w.dtype == torch.bfloat16 for w in _lm_weights(tmp_path / "bf16" / "lm").values())


def test_tampered_export_is_detected(tiny_run, tmp_path):
    out = tmp_path / "export"
    export_run(tiny_run, out)
    weights = out / "lm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors was changed after the export was written"):
        load_for_inference(out, "cpu")
    (out / "adapter.safetensors").unlink()
    with pytest.raises(ExportError, match=r"adapter\.safetensors is missing"):
        read_manifest(out)
    (out / EXPORT_FILE).write_text("{not json")
    with pytest.raises(ExportError, match=EXPORT_FILE):
        read_manifest(out)


def test_export_never_overwrites(tiny_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_failed_verification_keeps_partial_and_fails_loudly(tiny_run, tmp_path, monkeypatch):
    import adaptkit.export as export

    monkeypatch.setitem(export.TOLERANCE, "float32", -1.0)  # nothing can pass a negative bound
    with pytest.raises(ExportError, match="does not match the adapter model"):
        export_run(tiny_run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert (tmp_path / "export.partial" / "verification.json").is_file()


def test_eval_on_the_dequantized_base_matches_the_export(tiny_run_4bit, tiny_vqa, tmp_path, capsys):
    out = tmp_path / "export4"
    export_run(tiny_run_4bit, out)
    preds = []
    for args in ([str(out)], [str(tiny_run_4bit), "--lm-quant", "dequantized"]):
        assert main(["eval", *args, "--data", str(tiny_vqa), "--json"]) == 0
        capsys.readouterr()
        rows = (Path(args[0]) / "eval_predictions.jsonl").read_text().splitlines()
        preds.append([json.loads(r)["prediction"] for r in rows])
    assert preds[0] == preds[1] and len(preds[0]) == 24
