"""``adaptkit export RUN --format hf-remote-code``: any generative run (VQA, captioning) as a transformers
folder that loads without adaptkit, through the Auto classes and a small modeling file that travels with it
(retrieval runs: ``adaptkit.export_remote_retrieval``)::

    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

The folder holds ``config.json`` (``model_type: adaptkit``, ``auto_map``, the LM's ``text_config``, the
tower, the adapter and where the image enters the LM), ``model.safetensors`` (tower, adapter and the LM with
its LoRA merged, under ``vision.*``, ``adapter.*``, ``language_model.*``), ``modeling_adaptkit.py`` and
``processing_adaptkit.py`` (``adaptkit/remote/``: torch, transformers and the tower's own library, nothing of
adaptkit's), the tokenizer with an ``<image>`` token, ``processor_config.json`` with a chat template that
renders adaptkit's prompts, ``generation_config.json``, a model card and ``verification.json``.

Every adapter (Q-Former, projector, resampler, gated cross-attention) and entry layer is expressed as
trained: nothing is folded. The check (``export_check.py``, in a fresh process where adaptkit cannot be
imported) requires the processor's ids to be adaptkit's, the greedy answers the run's, and the logits within
``TOLERANCE`` of adaptkit's on the exported weights (both in float64); a failure keeps ``OUT.partial/``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from adaptkit.artifacts import ExportError

REMOTE_DIR = Path(__file__).with_name("remote")
FILES = ("modeling_adaptkit.py", "processing_adaptkit.py")
AUTO_MAP = {
    "AutoConfig": "modeling_adaptkit.AdaptkitConfig",
    "AutoModelForImageTextToText": "modeling_adaptkit.AdaptkitForImageTextToText",
}
ADAPTERS = ("qformer", "projector", "resampler", "xattn")
TASKS = ("vqa", "caption", "retrieval")
FAMILIES = ("torchvision", "timm", "hf", "open_clip")


def problems(recipe) -> list[str]:
    """Why this format cannot carry the run, each naming the recipe key or option that would; empty when
    it can."""
    found = []
    if recipe.task not in TASKS:
        found.append(f"task={recipe.task}: hf-remote-code exports task={', task='.join(TASKS)} runs")
    if recipe.adapter.kind not in ADAPTERS:
        found.append(f"adapter.kind={recipe.adapter.kind}: the modeling file builds {', '.join(ADAPTERS)}")
    if recipe.vision.family not in FAMILIES:
        found.append(
            f"vision.family={recipe.vision.family}: the modeling file builds {', '.join(FAMILIES)} towers"
        )
    if recipe.vision.quant != "none":
        found.append(f"vision.quant={recipe.vision.quant}: the exported tower is full precision")
    return found


def _tower(recipe, vision) -> tuple[dict, dict]:
    """The tower's spec for the model's config, and for the processor."""
    cfg = recipe.vision
    spec = {
        "family": cfg.family,
        "name": cfg.name,
        "feature_layer": cfg.feature_layer,
        "extra_layers": list(cfg.extra_layers),
        "image_size": cfg.image_size,
        "feature_dim": vision.feature_dim,
        "feature_dtype": recipe.feature_dtype,
    }
    reads = {"family": cfg.family, "image_size": cfg.image_size}
    if cfg.family == "hf":
        spec["config"] = vision.model.config.to_dict()
        processor = vision.processor.to_dict()
        for key in ("image_processor_type", "processor_class", "auto_map"):
            processor.pop(key, None)
        reads["image_processor"] = {"class": type(vision.processor).__name__, **processor}
    elif cfg.family == "timm":
        from timm.data import resolve_model_data_config

        data = resolve_model_data_config(vision.model)
        data["input_size"] = (3, cfg.image_size, cfg.image_size)
        reads["data_config"] = data
    elif cfg.family == "open_clip":
        import open_clip

        spec["open_clip"] = open_clip.get_model_config(cfg.name)
        if spec["open_clip"] is None:
            raise ExportError(
                f"vision.name={cfg.name}: open_clip has no config for this architecture to write into the "
                "export (a hub-only model); --format adaptkit exports the run"
            )
        reads["preprocess"] = dict(vision.visual.preprocess_cfg)
    return spec, reads


def build(recipe, run: Path, merge_base: str, trained) -> tuple[object, object]:
    """The remote-code model (float32, every part loaded strictly; the export saves it in its ``--dtype``)
    and its processor."""
    import importlib

    from adaptkit.export import _merged_lm
    from adaptkit.export_llava import _add_image_token, chat_template

    modeling = importlib.import_module("adaptkit.remote.modeling_adaptkit")
    processing = importlib.import_module("adaptkit.remote.processing_adaptkit")
    lm, tokenizer = _merged_lm(recipe, run, "float32", merge_base)
    lm_template = getattr(tokenizer, "chat_template", None)
    image_id = _add_image_token(tokenizer)
    spec, reads = _tower(recipe, trained.vision)
    adapter = {**dataclasses.asdict(recipe.adapter), "fusion": trained.adapter.fusion}
    entry = trained.entry_layer
    config = modeling.AdaptkitConfig(
        text_config=lm.config.to_dict(),
        vision=spec,
        adapter=adapter,
        entry_layer=entry,
        image_token_id=image_id,
        auto_map=AUTO_MAP,
        architectures=["AdaptkitForImageTextToText"],
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    model = modeling.AdaptkitForImageTextToText(config).eval()
    model.vision.load_state_dict(trained.vision.state_dict(), strict=True)
    model.adapter.load_state_dict(trained.adapter.state_dict(), strict=True)
    model.language_model.load_state_dict(lm.state_dict(), strict=True)
    if lm.generation_config is not None:
        model.generation_config = lm.generation_config
    lead = [trained.fusion.sink_id] if entry else []
    lead += [image_id] * trained.fusion.n_soft
    processor = processing.AdaptkitProcessor(
        tokenizer, tower=reads, lead=lead, chat_template=chat_template(recipe, lm_template)
    )
    processor.auto_map = {"AutoProcessor": "processing_adaptkit.AdaptkitProcessor"}
    return model, processor


def export_remote(
    run_dir, out_dir, dtype: str = "float32", verify_samples: int = 32, merge_base: str = "dequantized"
) -> dict:
    """Write the run as a remote-code folder ``out_dir`` (which must not exist) and check it in a fresh
    process; returns the verification report (:func:`~adaptkit.export_llava_verify.export_checked` says
    what it raises)."""
    from adaptkit.export import DTYPES
    from adaptkit.export_llava_verify import Written, export_checked, held
    from adaptkit.runs import load_run

    def write(recipe, run: Path, partial: Path) -> Written:
        if recipe.task == "retrieval":
            from adaptkit import export_remote_retrieval

            return export_remote_retrieval.write(recipe, run, partial, dtype, verify_samples, _tower)
        _, trained = load_run(run, "cpu", verify=False)  # the frame's check_run has verified its files
        spec, samples, rows = held(recipe, verify_samples, trained.tokenizer)
        answers, logits = reference(recipe, run, merge_base, trained, samples, rows, recipe.max_new_tokens)
        model, processor = build(recipe, run, merge_base, trained)
        model.to(DTYPES[dtype]).save_pretrained(partial, safe_serialization=True)
        processor.save_pretrained(partial)
        for name in FILES:
            shutil.copy2(REMOTE_DIR / name, partial / name)
        for row, answer in zip(rows, answers):
            row["expected_answer"] = answer
            row["expected_ids"] = processor.lead + row["prompt_ids"]
        return Written(spec, rows, logits, {}, lambda report: _model_card(recipe, trained, report))

    return export_checked("hf-remote-code", run_dir, out_dir, dtype, problems, write)


def reference(recipe, run: Path, merge_base: str, trained, samples, rows, max_new_tokens: int):
    """The run's greedy answers (float32, LoRA unmerged on the float32 base) and adaptkit's logits on the
    exported weights (LoRA merged), at every position of lead + prompt + target, in float64."""
    from adaptkit.export import _merged_lm
    from adaptkit.export_llava_verify import _logits, run_answers
    from adaptkit.model.multimodal import MultimodalModel

    entry = trained.entry_layer
    answers, model = run_answers(recipe, run, merge_base, trained, samples, rows, max_new_tokens, entry)
    model.fusion.remove()
    merged, tokenizer = _merged_lm(recipe, run, "float32", merge_base)
    exported = MultimodalModel(trained.vision, trained.adapter, merged, tokenizer, entry_layer=entry)
    logits = _logits(exported.eval().double(), samples, rows)
    exported.fusion.remove()
    trained.float()
    return answers, logits


def _model_card(recipe, trained, report: dict) -> str:
    return "\n".join(
        [
            f"# adaptkit export of `{report['source_run']}` (transformers, remote code)",
            "",
            f"- vision tower: {recipe.vision.family} `{recipe.vision.name}`, frozen",
            f"- adapter: {recipe.adapter.kind}, {trained.adapter.describe()}",
            f"- language model: `{recipe.language.name}` with its LoRA merged; every weight saved as "
            f"{report['dtype']}",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "model = AutoModelForImageTextToText.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
            "processor = AutoProcessor.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
            "text = processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}"
            + (
                "]}], add_generation_prompt=True)  # the caption prompt it was trained with"
                if recipe.task == "caption"
                else ", {'type': 'text', 'text': 'what shape is this?'}]}], add_generation_prompt=True)"
            ),
            "inputs = processor(images=[image], text=[text])",
            f"out = model.generate(**inputs, max_new_tokens={recipe.max_new_tokens}, do_sample=False)",
            "print(processor.batch_decode(out[:, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
            "```",
            "",
            "`modeling_adaptkit.py` and `processing_adaptkit.py` are the code that runs; they need torch, "
            "transformers and the tower's library, not adaptkit.",
            "",
            f"Verified in a process without adaptkit on {report['samples']} held samples of "
            f"{report['data']}: "
            f"greedy answers identical to the run's on {report['answers_identical']:.1%}, largest |logit "
            f"difference| {report['max_abs_logit_diff']:.2e} against adaptkit on the same weights (tolerance "
            f"{report['tolerance']}).",
            "",
        ]
    )


def summary(run, out, report: dict) -> str:
    """The line ``adaptkit export --format hf-remote-code`` prints."""
    return (
        f"exported {run} -> {out} (transformers remote code, {report['seconds']} s); checked without "
        f"adaptkit on {report['samples']} held samples: answers identical {report['answers_identical']:.1%}, "
        f"max |logit diff| {report['max_abs_logit_diff']:.2e} (tolerance {report['tolerance']})"
    )
