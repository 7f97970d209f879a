"""One inference API for run directories and exported models::

    from adaptkit import load_for_inference
    predictor = load_for_inference("runs/easyvqa")          # or an `adaptkit export` folder
    result = predictor.predict("shape.png", "What color is the shape?")
    result.text, result.score, result.top                   # "red", 0.998, [("red", 0.998), ...]

The predictor is the recipe's task's (``Task.predictor``): for VQA an
:class:`adaptkit.tasks.vqa.VQAPredictor`, which also has ``answer`` and ``answer_batch``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptkit.artifacts import EXPORT_FILE, is_export, read_json
from adaptkit.model.build import count_parameters
from adaptkit.runs import load_run
from adaptkit.tasks import get_task


def describe(recipe, model, run: Path, export_info: dict | None = None) -> dict:
    """The facts the demo shows and ``adaptkit predict --json`` prints."""
    summary = read_json(run / "summary.json") or {}
    params = (export_info or {}).get("parameters") or summary.get("parameters") or {}
    metrics = (export_info or {}).get("metrics") or {}
    if export_info:
        lora = "merged into the LM"
    elif recipe.lora.enabled:
        lora = f"r={recipe.lora.r} on {', '.join(recipe.lora.target_modules)}"
    else:
        lora = "off"
    headline, text_encoder = get_task(recipe).headline_metric, recipe.text_encoder.name
    evaluation = metrics.get("eval") or read_json(run / "eval.json") or summary.get("eval") or {}
    return {
        "source": str(run),
        "kind": "export" if export_info else "run",
        "task": recipe.task,
        "vision": f"{recipe.vision.family}:{recipe.vision.name} (frozen)",
        "adapter": f"{recipe.adapter.kind}: {model.adapter.describe()}",
        "language": (export_info or {}).get("language", {}).get("base", recipe.language.name),
        "lora": lora,
        "trainable_parameters": params.get("trainable"),
        "total_parameters": params.get("total") or count_parameters(model),
        "eval_accuracy": evaluation.get("accuracy"),
        "eval_metric": headline,
        "eval_value": evaluation.get(headline),
        "text_encoder": None if text_encoder == "none" else f"{text_encoder} (frozen)",
        "eval_samples": evaluation.get("n"),
        "eval_data": evaluation.get("data"),
        "prompt_template": recipe.data.prompt_template,
    }


def load_for_inference(path: str | Path, device: str | torch.device | None = None, verify: bool = True):
    """The task's predictor for a run directory (``adaptkit train``) or an export (``adaptkit export``).

    Args:
        verify: check every file's sha256 against the folder's manifest first (a run's or an export's).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(path)
    recipe, model = load_run(root, device, verify=verify)  # checks the folder against its manifest
    manifest = read_json(root / EXPORT_FILE) if is_export(root) else None
    task = get_task(recipe)
    info = describe(recipe, model, root, manifest)
    return task.predictor(model, root, manifest, info, device)
