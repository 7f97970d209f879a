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


def reference(recipe, run: Path, merge_base: str, samples, rows, max_new_tokens: int):
    """The run's own answers (float32, LoRA unmerged on the float32 base) and its logits at every position of
    image + prompt + target, computed in float64, one sample after another."""
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
    answers, logits = [], []
    for sample, row in zip(samples, rows):
        feats = model.encode_images([open_image(sample.image)])
        ids = torch.tensor([row["prompt_ids"]])
        answer, _ = model.generate(feats, ids, torch.ones_like(ids), max_new_tokens)
        answers.append(answer[0])
    model.double()
    for sample, row in zip(samples, rows):
        feats = model.encode_images([open_image(sample.image)]).double()
        ids = torch.tensor([row["prompt_ids"] + row["target_ids"]])
        out, _ = model.logits(feats, ids, torch.ones_like(ids))
        logits.append(out[0].float())
    return answers, logits, trained.adapter


def check(out: Path, rows, reference: list[torch.Tensor], dtype: str, max_new_tokens: int) -> dict:
    """Run ``export_check.py`` on the folder in a fresh process that cannot import adaptkit."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="adaptkit-llava-check-") as tmp:
        tmp = Path(tmp)
        save_file({f"logits_{i}": t.contiguous() for i, t in enumerate(reference)}, str(tmp / "reference.st"))
        (tmp / "samples.json").write_text(json.dumps(rows))
        report_path = tmp / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cmd = [sys.executable, "-I", str(CHECK_SCRIPT), str(out), str(tmp), dtype, str(max_new_tokens)]
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not report_path.is_file():
            raise ExportError(
                f"the hf-llava check could not load or run the folder {out} in a fresh process "
                f"(exit {done.returncode}):\n{done.stderr[-3000:]}"
            )
        return json.loads(report_path.read_text())
