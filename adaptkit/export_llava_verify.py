"""What the two transformers formats (``--format hf-llava``: ``adaptkit.export_llava``; ``hf-remote-code``:
``adaptkit.export_remote``) share: the frame of an export checked before it is kept (:func:`export_checked`),
the run's own answers and logits on held samples, and ``export_check.py`` run on the folder in a fresh
process where adaptkit cannot be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptkit.artifacts import ExportError

CHECK_SCRIPT = Path(__file__).with_name("export_check.py")


def held(recipe, n: int, tokenizer):
    """Held samples with adaptkit's prompt text and token ids (prompt, target) for each."""
    from adaptkit.data.collate import answer_text, question_prompt
    from adaptkit.export import _held_samples
    from adaptkit.tasks import get_task

    spec, samples = _held_samples(get_task(recipe), recipe, n)
    data = recipe.data
    if recipe.task == "caption":
        return spec, samples, [_caption_row(s, data.prompt_template, tokenizer) for s in samples]
    rows = []
    for s in samples:
        prompt = question_prompt(data.prompt_template, s.question, s.context, tokenizer, data.chat_template)
        messages = []
        for q, a in s.context:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}
        )
        if s.context:  # the image rides on the first user turn
            messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": s.context[0][0]}]
            messages[-1]["content"] = s.question
        target = tokenizer(answer_text(s.answer, data.chat_template), add_special_tokens=False)["input_ids"]
        rows.append(
            {
                "image": str(s.image),
                "messages": messages,
                "prompt": prompt,
                "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
                "target_ids": target + [tokenizer.eos_token_id],
            }
        )
    return spec, samples, rows


def _caption_row(sample, prompt: str, tokenizer) -> dict:
    """A caption sample's row as the caption task trains it: the recipe's prompt as it stands, then its first
    caption (whitespace joined, after a space) and EOS; the chat message carries the image alone."""
    caption = " ".join(sample.captions[0].split())
    return {
        "image": str(sample.image),
        "messages": [{"role": "user", "content": [{"type": "image"}]}],
        "prompt": prompt,
        "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
        "target_ids": tokenizer(" " + caption, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id],
    }


def fold_standardisation(weight, bias, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(standardize(x))`` as one linear layer: ``W / std`` and ``b - W (mean / std)``, computed in
    float64 and returned in the weight's dtype."""
    w, b = weight.double(), bias.double()
    scale = 1.0 / std.double()
    folded_w = w * scale[None, :]
    folded_b = b - w @ (mean.double() * scale)
    return folded_w.to(weight.dtype), folded_b.to(bias.dtype)


def as_exported(adapter):
    """A copy of the trained projector as the stock class holds it: the standardisation folded into the
    first layer, both layers' weights rounded to float32 (``export_llava.fold_standardisation``)."""
    import copy

    folded = copy.deepcopy(adapter)
    first, second = folded.mlp[0], folded.mlp[3]
    weight, bias = fold_standardisation(
        first.weight.float(), first.bias.float(), adapter.feature_mean, adapter.feature_std
    )
    with torch.no_grad():
        first.weight.copy_(weight)
        first.bias.copy_(bias)
        second.weight.copy_(second.weight.float())
        second.bias.copy_(second.bias.float())
        folded.feature_mean.zero_()
        folded.feature_std.fill_(1.0)
    return folded


def _logits(model, samples, rows) -> list[torch.Tensor]:
    """Logits at every position of image + prompt + target, the tower's features not rounded to float32."""
    from adaptkit.data.images import open_image

    out = []
    for sample, row in zip(samples, rows):
        with torch.no_grad():
            feats = model.vision(model.vision.preprocess([open_image(sample.image)]).to(torch.float64))
            ids = torch.tensor([row["prompt_ids"] + row["target_ids"]])
            out.append(model.logits(feats, ids, torch.ones_like(ids))[0][0].float())
    return out


def run_answers(recipe, run: Path, merge_base: str, trained, samples, rows, max_new_tokens: int, entry: int):
    """The run's own greedy answers on ``samples`` (float32 base, LoRA unmerged, its feature dtype), and
    the model that gave them (the caller removes its fusion hooks when done)."""
    from adaptkit.data.images import open_image
    from adaptkit.export import full_precision_base
    from adaptkit.model.multimodal import MultimodalModel

    base, tokenizer = full_precision_base(recipe, merge_base)
    if recipe.lora.enabled:
        from peft import PeftModel

        from adaptkit.artifacts import LORA_DIR

        base = PeftModel.from_pretrained(base, str(run / LORA_DIR), is_trainable=False)
    model = MultimodalModel(trained.vision, trained.adapter, base, tokenizer, entry_layer=entry).eval()
    model.feature_dtype = trained.feature_dtype
    answers = []
    for sample, row in zip(samples, rows):
        feats = model.encode_images([open_image(sample.image)])
        ids = torch.tensor([row["prompt_ids"]])
        answers.append(model.generate(feats, ids, torch.ones_like(ids), max_new_tokens)[0][0])
    return answers, model


def reference(recipe, run: Path, merge_base: str, trained, samples, rows, max_new_tokens: int):
    """The run's own greedy answers (:func:`run_answers`); the logits at every position of image + prompt +
    target, computed in float64 by adaptkit on the exported weights (LoRA merged into float32, the
    projector folded, :func:`as_exported`); and how far those weights' float32 rounding moves the logits
    from the run's (float64 both).

    Folding is exact arithmetic, but the folded float32 weights are rounded where adaptkit computed the
    standardisation: on feature dimensions whose mean is large against their spread, ``W x / std`` and the
    bias ``-W mean / std`` are large and cancel. With soft tokens at the LM's input this moves a real LM's
    logits by more than LoRA's merge does at layer 20 (SmolLM2 behind a random tower, 16 samples: ~3e-3 at
    a logit scale of ~38; benchmarks/hf_llava_real_lm.py). So the stock class is checked against adaptkit
    on the same weights, to the merge's tolerance, the answers against the run's, and the rounding's effect
    is reported."""
    from adaptkit.export import _merged_lm
    from adaptkit.model.multimodal import MultimodalModel

    answers, model = run_answers(recipe, run, merge_base, trained, samples, rows, max_new_tokens, 0)
    model.double()
    run_logits = _logits(model, samples, rows)
    merged, tokenizer = _merged_lm(recipe, run, "float32", merge_base)
    exported = MultimodalModel(trained.vision, as_exported(trained.adapter), merged, tokenizer, entry_layer=0)
    logits = _logits(exported.eval().double(), samples, rows)
    rounding = max(float((a.double() - b.double()).abs().max()) for a, b in zip(run_logits, logits))
    return answers, logits, rounding


@dataclass
class Written:
    """What a format's writer leaves for :func:`export_checked`: the held data's spec, its rows (each with
    the run's ``expected_answer``), adaptkit's logits on them, report entries of its own, and the model
    card made from the finished report."""

    spec: str
    rows: list
    logits: list
    extra: dict
    card: Callable[[dict], str]


def export_checked(
    fmt: str,
    run_dir,
    out_dir,
    dtype: str,
    refuse: Callable[[object], list[str]],
    write: Callable[[object, Path, Path], Written],
) -> dict:
    """The frame of a transformers-format export: refuse a run ``refuse(recipe)`` finds problems with
    (before anything is written), ``write(recipe, run, partial)`` the folder into ``OUT.partial/``, check it
    in a fresh process and keep it as ``out_dir`` only if it reproduces the run; returns the report.

    Raises:
        FileExistsError: ``out_dir`` exists.
        ExportError: the format cannot express the run (the message names the keys), or the folder failed
            its check (``OUT.partial/`` is kept with ``verification.json``).
    """
    from adaptkit.export import DTYPES, MIN_AGREEMENT_16BIT, TOLERANCE
    from adaptkit.runs import check_run

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    run, out = Path(run_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; exports are never overwritten, choose another --out")
    recipe = check_run(run)
    found = refuse(recipe)
    if found:
        listed = "\n- ".join(found)
        raise ExportError(
            f"--format {fmt} cannot express this run:\n- {listed}\n(--format adaptkit exports any run)"
        )
    started = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    written = write(recipe, run, partial)
    rows = written.rows
    report = {"format": fmt, "source_run": str(run.resolve()), "data": written.spec, "samples": len(rows)}
    report["dtype"] = dtype
    report.update(check(partial, rows, written.logits, dtype, recipe.max_new_tokens, fmt))
    report.update(written.extra)
    report["tolerance"] = TOLERANCE[dtype]
    need = 1.0 if dtype == "float32" else MIN_AGREEMENT_16BIT
    report["passed"] = bool(
        report["prompts_identical"]
        and report["answers_identical"] >= need
        and report["max_abs_logit_diff"] <= TOLERANCE[dtype]
    )
    report["seconds"] = round(time.perf_counter() - started, 2)
    (partial / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    (partial / "README.md").write_text(written.card(report))
    if not report["passed"]:
        raise ExportError(
            f"the {fmt} folder does not reproduce the run on {len(rows)} held samples (prompts identical: "
            f"{report['prompts_identical']}, answers identical {report['answers_identical']:.1%}, max |logit "
            f"diff| {report['max_abs_logit_diff']:.3g}, tolerance {report['tolerance']}); kept in {partial} "
            "with verification.json"
        )
    os.replace(partial, out)
    return report


def check(
    out: Path, rows, reference: list[torch.Tensor], dtype: str, max_new_tokens: int, fmt: str = "hf-llava"
) -> dict:
    """Run ``export_check.py`` on the ``fmt`` folder in a fresh process that cannot import adaptkit."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="adaptkit-llava-check-") as tmp:
        tmp = Path(tmp)
        save_file({f"logits_{i}": t.contiguous() for i, t in enumerate(reference)}, str(tmp / "reference.st"))
        (tmp / "samples.json").write_text(json.dumps(rows))
        report_path = tmp / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cmd = [sys.executable, "-I", str(CHECK_SCRIPT), str(out), str(tmp), dtype, str(max_new_tokens), fmt]
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not report_path.is_file():
            raise ExportError(
                f"the {fmt} check could not load or run the folder {out} in a fresh process "
                f"(exit {done.returncode}):\n{done.stderr[-3000:]}"
            )
        return json.loads(report_path.read_text())
