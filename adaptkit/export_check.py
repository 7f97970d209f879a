"""Check an ``--format hf-llava`` or ``hf-remote-code`` export with transformers alone, in a process where
adaptkit cannot be imported (``adaptkit export`` runs this file as a script; it imports nothing of adaptkit's,
and refuses to).

    python -I export_check.py EXPORT_DIR WORK_DIR DTYPE MAX_NEW_TOKENS [FORMAT]

hf-llava loads the folder with ``LlavaForConditionalGeneration``, hf-remote-code with
``AutoModelForImageTextToText`` (``AutoModel`` for a retrieval run) and its own modeling file
(``trust_remote_code=True``); both with ``AutoProcessor``. A retrieval folder is checked on scaled
image-text similarities and each image's best text instead of greedy answers.

``WORK_DIR/samples.json``: the held samples (image path, chat messages, adaptkit's prompt text and token ids,
the run's greedy answer); ``WORK_DIR/reference.st``: the run's logits per sample (image, prompt and target
positions, computed in float64). Writes ``WORK_DIR/report.json``: whether the processor's chat template and
tokenizer give adaptkit's prompts, how many greedy answers match, and the largest |logit difference|.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path


class _NoAdaptkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "adaptkit" or name.startswith("adaptkit."):
            raise ImportError(
                "this check runs without adaptkit: the export must load with transformers alone"
            )
        return None


sys.meta_path.insert(0, _NoAdaptkit())


def _load(export: str, dtype: str, fmt: str):
    import torch
    from transformers import (
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaForConditionalGeneration,
    )

    if fmt == "hf-llava":
        model = LlavaForConditionalGeneration.from_pretrained(export, dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(export)
        loaded = f"transformers.LlavaForConditionalGeneration + AutoProcessor ({dtype})"
        lead = [model.config.image_token_index] * model.config.image_seq_length
    else:
        retrieval = (
            json.loads((Path(export) / "config.json").read_text())["model_type"] == "adaptkit_retrieval"
        )
        auto = AutoModel if retrieval else AutoModelForImageTextToText
        model = auto.from_pretrained(export, trust_remote_code=True, dtype=dtype)
        processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
        loaded = f"transformers.{auto.__name__} + AutoProcessor, trust_remote_code ({dtype})"
        lead = None
    return model.eval(), processor, loaded + ", adaptkit not importable", lead


def main(export: str, work: str, dtype: str, max_new_tokens: int, fmt: str = "hf-llava") -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    work_dir = Path(work)
    rows = json.loads((work_dir / "samples.json").read_text())
    reference = load_file(str(work_dir / "reference.st"))
    model, processor, loaded, lead = _load(export, dtype, fmt)
    if rows and "texts" in rows[0]:
        return {"loaded_with": loaded, **_retrieval(model, processor, rows, reference)}
    eos = processor.tokenizer.eos_token_id
    prompts_ok, answers, inputs = True, [], []
    with torch.no_grad():
        for row in rows:
            image = Image.open(row["image"]).convert("RGB")
            text = processor.apply_chat_template(row["messages"], add_generation_prompt=True)
            batch = processor(images=image, text=text, return_tensors="pt")
            ids = batch["input_ids"][0].tolist()
            expected = row["expected_ids"] if lead is None else lead + row["prompt_ids"]
            row["expected_ids"] = expected
            prompts_ok &= text == "<image>" + row["prompt"] and ids == expected
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
            new = out[0, batch["input_ids"].shape[1] :]
            answers.append(processor.decode(new, skip_special_tokens=True).strip())
            inputs.append(batch["pixel_values"])
        model.double()
        worst = 0.0
        for i, (row, pixels) in enumerate(zip(rows, inputs)):
            ids = torch.tensor([row["expected_ids"] + row["target_ids"]])
            logits = model(input_ids=ids, pixel_values=pixels.double()).logits[0]
            ref = reference[f"logits_{i}"].double()
            worst = max(worst, float((logits[:, : ref.shape[1]] - ref).abs().max()))
    same = sum(a == row["expected_answer"] for a, row in zip(answers, rows))
    return {
        "loaded_with": loaded,
        "prompts_identical": bool(prompts_ok),
        "answers_identical": same / max(1, len(rows)),
        "answers": answers[:8],
        "max_abs_logit_diff": worst,
        "logits_compared_in": "float64",
    }


def _retrieval(model, processor, rows, reference) -> dict:
    """A retrieval folder: every held image against every held caption, as the run scored them."""
    import torch
    from PIL import Image

    texts = rows[0]["texts"]
    images = [Image.open(row["image"]).convert("RGB") for row in rows]
    with torch.no_grad():
        batch = processor(images=images, text=texts, return_tensors="pt")
        logits = model(**batch).logits_per_image.double()
    best = logits.argmax(1).tolist()
    worst = max(
        float((logits[i] - reference[f"logits_{i}"][0].double()).abs().max()) for i in range(len(rows))
    )
    return {
        "prompts_identical": batch["input_ids"].tolist() == rows[0]["text_ids"],
        "answers_identical": sum(b == row["expected_answer"] for b, row in zip(best, rows)) / len(rows),
        "answers": [texts[b] for b in best[:8]],
        "max_abs_logit_diff": worst,
        "logits_compared_in": f"{model.dtype} (scaled image-text similarities, as float64)",
    }


if __name__ == "__main__":
    export_dir, work_dir, dtype_name, new_tokens = sys.argv[1:5]
    report = main(export_dir, work_dir, dtype_name, int(new_tokens), *sys.argv[5:6])
    (Path(work_dir) / "report.json").write_text(json.dumps(report, indent=2))
