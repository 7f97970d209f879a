"""The check of an ``--format hf-llava`` export (``adaptkit.export_llava``): the run's own answers and logits
on held samples, and ``export_check.py`` run on the folder in a fresh process where adaptkit cannot be
imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


def reference(recipe, run: Path, merge_base: str, samples, rows, max_new_tokens: int):
    """The run's own greedy answers (float32, LoRA unmerged on the float32 base); the logits at every
    position of image + prompt + target, computed in float64 by adaptkit on the exported weights (LoRA
    merged into float32, the projector folded, :func:`as_exported`); and how far those weights' float32
    rounding moves the logits from the run's (float64 both).

    Folding is exact arithmetic, but the folded float32 weights are rounded where adaptkit computed the
    standardisation: on feature dimensions whose mean is large against their spread, ``W x / std`` and the
    bias ``-W mean / std`` are large and cancel. With soft tokens at the LM's input this moves a real LM's
    logits by more than LoRA's merge does at layer 20 (SmolLM2 behind a random tower, 16 samples: ~3e-3 at
    a logit scale of ~38; benchmarks/hf_llava_real_lm.py). So the stock class is checked against adaptkit
    on the same weights, to the merge's tolerance, the answers against the run's, and the rounding's effect
    is reported."""
    from adaptkit.data.images import open_image
    from adaptkit.export import full_precision_base
    from adaptkit.model.multimodal import MultimodalModel
    from adaptkit.runs import load_run

    _, trained = load_run(run, "cpu")
    base, tokenizer = full_precision_base(recipe, merge_base)
    if recipe.lora.enabled:
        from peft import PeftModel

        from adaptkit.artifacts import LORA_DIR

        base = PeftModel.from_pretrained(base, str(run / LORA_DIR), is_trainable=False)
    model = MultimodalModel(trained.vision, trained.adapter, base, tokenizer, entry_layer=0).eval()
    answers = []
    for sample, row in zip(samples, rows):
        feats = model.encode_images([open_image(sample.image)])
        ids = torch.tensor([row["prompt_ids"]])
        answers.append(model.generate(feats, ids, torch.ones_like(ids), max_new_tokens)[0][0])
    trained_adapter = trained.adapter
    model.double()
    run_logits = _logits(model, samples, rows)
    from adaptkit.export import _merged_lm

    merged, tokenizer = _merged_lm(recipe, run, "float32", merge_base)
    exported = MultimodalModel(trained.vision, as_exported(trained_adapter), merged, tokenizer, entry_layer=0)
    logits = _logits(exported.eval().double(), samples, rows)
    rounding = max(float((a.double() - b.double()).abs().max()) for a, b in zip(run_logits, logits))
    return answers, logits, trained_adapter, rounding


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
