"""GPU readiness in one short run: CUDA training paths, throughput against the bf16 peak, 4-bit memory, and
one larger configuration, written to one JSON report (rewritten after every section, so a run cut short
keeps what it measured).

Sections (each in its own subprocess, so allocator peaks and CUDA state do not leak between them):

- ``env``: torch / CUDA / bitsandbytes versions, the device, its memory;
- ``placement``: the embedded default built on the device in fp32, 8-bit and 4-bit: every parameter and
  buffer on it, the quantized layers bitsandbytes' (``Linear8bitLt`` / ``Linear4bit``) with weights there;
- ``train``: ``adaptkit train`` on the embedded default for ``--steps`` steps with the LM in fp32, with
  bf16 autocast, in bf16 weights, in 8-bit and in 4-bit (bitsandbytes' CUDA kernels): finite losses, the
  frozen-weight check, samples/s, allocator peak; and the ratio of the 4-bit LM's peak to the bf16 LM's;
- ``throughput``: ``benchmarks/train_throughput.py`` with bf16 autocast (adaptkit against the plain
  transformers + peft way; useful FLOPs as a fraction of the measured bf16 matmul peak);
- ``large``: a SigLIP-base-sized vision tower (768 wide, 12 layers, 224 px, patch 16) and a
  Qwen2.5-0.5B-sized LM (896 wide, 24 layers, GQA 14/2 heads, 4864 FFN), random weights from configs,
  saved as HF folders and trained through the same recipe keys a user's checkpoints take, bf16 and 4-bit.

On a machine without CUDA the CPU-feasible parts run (env, placement, train in fp32 / 8-bit / 4-bit, a few
steps) and the others are recorded as skipped with the reason.

    bash scripts/gpu_check.sh                      # writes reports/gpu_check.json
    python benchmarks/gpu_check.py --out r.json --steps 20 --skip large
    python benchmarks/gpu_check.py --force large --skip train --steps 2 data.train=data/ood_vqa/q.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "easyvqa_qformer_lora.yaml"
SECTIONS = ("env", "placement", "train", "throughput", "large")
# LM modes of the train section: recipe overrides and whether they need CUDA to be worth running.
LM_MODES = {
    "fp32": (["language.quant=none", "mixed_precision=no"], False),
    "bf16_autocast": (["language.quant=none", "mixed_precision=bf16"], True),
    "bf16_weights": (["language.quant=none", "language.dtype=bfloat16", "mixed_precision=bf16"], True),
    "8bit": (["language.quant=8bit", "mixed_precision=no"], False),
    "4bit": (["language.quant=4bit", "language.compute_dtype=bfloat16", "mixed_precision=bf16"], False),
}
SHORT_RUN = [
    "eval_every=0",
    "eval_limit=64",
    "checkpoint_every=0",
    "compile=false",
    "log_every=5",
    "lora.start_step=0",
    "warmup_steps=2",
]


def _env() -> dict:
    import torch

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
    }
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # reported, not fatal: the quantized modes will say what failed
        out["bitsandbytes"] = f"unavailable: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    else:
        out["device"] = f"cpu ({os.cpu_count()} cores)"
    return out


def _placement(device: str, overrides: list[str]) -> dict:
    """Build the model for each LM mode on ``device``; report where every tensor lives."""
    import torch

    from adaptkit.model import build_model
    from adaptkit.recipes import load_recipe

    result = {}
    for mode in ("none", "8bit", "4bit"):
        recipe = load_recipe(RECIPE, [*overrides, f"language.quant={mode}"])
        model = build_model(recipe, torch.device(device))
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        elsewhere = sorted({str(t.device) for _, t in tensors if t.device.type != torch.device(device).type})
        kinds: dict[str, int] = {}
        for module in model.modules():
            name = type(module).__name__
            if name in ("Linear8bitLt", "Linear4bit"):
                kinds[name] = kinds.get(name, 0) + 1
        result[mode] = {
            "tensors": len(tensors),
            "off_device": elsewhere,
            "bnb_layers": kinds,
            "ok": not elsewhere and (mode == "none" or sum(kinds.values()) > 0),
        }
        del model
    return result


def _train(name: str, overrides: list[str], steps: int, batch: int, work: Path, timeout: float) -> dict:
    """``adaptkit train`` in a subprocess; its summary, losses and samples/s."""
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "adaptkit",
        "train",
        str(RECIPE),
        f"output_dir={out}",
        f"max_steps={steps}",
        f"batch_size={batch}",
        *SHORT_RUN,
        *overrides,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"ok": False, "wall_s": wall, "error": done.stderr[-2000:]}
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    finite = all(loss == loss and abs(loss) != float("inf") for loss in losses)
    return {
        "ok": bool(losses) and finite and summary["frozen_unchanged"],
        "wall_s": wall,
        "steps": summary["steps"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "samples_per_s_last_window": rates[-1] if rates else None,
        "train_seconds": summary["train_seconds"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "trainable_parameters": summary["parameters"]["trainable"],
        "total_parameters": summary["parameters"]["total"],
        "eval": summary["eval"],
    }


def _throughput(steps: int, timeout: float, overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_throughput.py"),
        "--steps",
        str(steps),
        "mixed_precision=bf16",
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr[-2000:]}
    return {"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def _large_models(work: Path) -> tuple[Path, Path]:
    """Random-weight SigLIP-base-sized vision tower and Qwen2.5-0.5B-sized LM as HF folders (SmolLM2's
    tokenizer: the embedding matrix is sized to it)."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from adaptkit.gguf import smollm2_dir

    vision, lm = work / "siglip-base-random", work / "qwen2.5-0.5b-random"
    torch.manual_seed(0)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        )
    ).save_pretrained(vision)
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vision)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    return vision, lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "gpu_check.json"))
    parser.add_argument("--steps", type=int, default=None, help="steps per training run (CUDA 30, CPU 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="per run (CUDA 64, CPU 8)")
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="repeatable")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per subprocess")
    parser.add_argument(
        "--force", action="append", default=[], choices=SECTIONS, help="run a CUDA section without CUDA"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="recipe key=value for every run, after each run's own (e.g. data.train=my.jsonl; a model name "
        "here replaces the large section's models too)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    steps = args.steps or (30 if cuda else 3)
    batch = args.batch_size or (64 if cuda else 8)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device, "steps": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)

    def section(name: str, fn, needs_cuda: bool = False) -> None:
        if name in args.skip:
            report[name] = {"skipped": "--skip"}
        elif needs_cuda and not cuda and name not in args.force:
            report[name] = {
                "skipped": "needs a CUDA device; none is visible (torch.cuda.is_available() is False)"
            }
        else:
            start = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as err:  # one failing section must not lose the others' figures
                report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            report.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        print(f"[gpu_check] {name}: {json.dumps(report[name])[:300]}", flush=True)
        save()

    with tempfile.TemporaryDirectory(prefix="adaptkit-gpu-check-") as tmp:
        work = Path(tmp)
        section("env", _env)
        section("placement", lambda: _placement(device, args.overrides))

        def train_modes() -> dict:
            runs = {}
            for name, (mode, needs_cuda) in LM_MODES.items():
                if needs_cuda and not cuda:
                    runs[name] = {"skipped": "bf16 on this CPU is slow and not a path adaptkit recommends"}
                    continue
                runs[name] = _train(name, mode + args.overrides, steps, batch, work, args.timeout)
                print(f"[gpu_check] train {name}: {json.dumps(runs[name])[:300]}", flush=True)
            ok = [r for r in runs.values() if "ok" in r]
            runs["ok"] = bool(ok) and all(r["ok"] for r in ok)
            four, bf16 = runs.get("4bit", {}), runs.get("bf16_weights", {})
            if four.get("ok") and bf16.get("ok"):
                ratio = four["peak_memory_mb"]["training"] / bf16["peak_memory_mb"]["training"]
                runs["peak_4bit_over_bf16"] = round(ratio, 3)
            return runs

        section("train", train_modes)
        section("throughput", lambda: _throughput(20, args.timeout, args.overrides), needs_cuda=True)

        def large() -> dict:
            vision, lm = _large_models(work)
            common = [
                "vision.family=hf",
                f"vision.name={vision}",
                "vision.image_size=224",
                "vision.extra_layers=[]",
                f"language.name={lm}",
                "adapter.inject_layer=16",
                "adapter.qformer.hidden_size=768",
                "adapter.qformer.num_heads=12",
            ]
            runs = {
                "bf16": _train(
                    "large_bf16",
                    [*common, "language.dtype=bfloat16", "mixed_precision=bf16"],
                    steps,
                    batch,
                    work,
                    args.timeout,
                ),
                "4bit": _train(
                    "large_4bit",
                    [
                        *common,
                        "language.quant=4bit",
                        "language.compute_dtype=bfloat16",
                        "mixed_precision=bf16",
                    ],
                    steps,
                    batch,
                    work,
                    args.timeout,
                ),
            }
            if runs["bf16"].get("ok") and runs["4bit"].get("ok"):
                ratio = (
                    runs["4bit"]["peak_memory_mb"]["training"] / runs["bf16"]["peak_memory_mb"]["training"]
                )
                runs["peak_4bit_over_bf16"] = round(ratio, 3)
            runs["ok"] = runs["bf16"].get("ok", False) and runs["4bit"].get("ok", False)
            return runs

        section("large", large, needs_cuda=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
