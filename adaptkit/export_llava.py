"""``adaptkit export RUN --format hf-llava``: a run as a stock transformers LLaVA folder.

For runs whose architecture transformers' ``LlavaForConditionalGeneration`` expresses exactly: an ``hf``
vision tower (CLIP, SigLIP, ...) whose hidden state ``vision.feature_layer`` is read in full (every
token, CLS included: ``vision_feature_select_strategy: full``), the ``projector`` adapter without pooling
(LLaVA-1.5's 2-layer GELU MLP, hidden width the LM's), its soft tokens the LM's input
(``adapter.inject_layer: 0``), a VQA or caption task. What the stock class has no place for is folded in
exactly or refused:

- the adapter's feature standardisation ``(x - mean) / std`` is affine, so it is folded into the projector's
  first layer in float64: ``W' = W / std``, ``b' = b - W (mean / std)``;
- adaptkit's sequence is the soft tokens, then the prompt's tokens with no BOS. The tokenizer gets an
  ``<image>`` special token (embeddings resized where its id is past the LM's rows) and stops adding special
  tokens of its own, and the processor's chat template renders a conversation as adaptkit's prompt with
  ``<image>`` in front (``data.prompt_template``, or the LM's own chat template with ``data.chat_template``);
- LoRA is merged into a float32 base as ``adaptkit export`` does.

The folder then holds ``config.json`` (``model_type: llava``), the weights in safetensors under
transformers' names, the tokenizer, the image processor, ``processor_config.json`` with the chat template,
``generation_config.json``, a model card and ``verification.json``. Before it reports success the export is
checked in a fresh process in which ``adaptkit`` cannot be imported (``adaptkit/export_check.py``): the stock
class and ``AutoProcessor``, loaded from the folder, must give the run's greedy answers on held samples and
its logits within ``TOLERANCE``; a failed check leaves ``OUT.partial/`` with the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptkit.artifacts import ExportError
from adaptkit.export_llava_verify import fold_standardisation

IMAGE_TOKEN = "<image>"


def problems(recipe) -> list[str]:
    """Why the stock LLaVA class cannot express this run, each naming the recipe key that would; empty when
    it can."""
    found = []
    if recipe.task not in ("vqa", "caption"):
        found.append(f"task={recipe.task}: hf-llava exports generative runs (task=vqa, task=caption)")
    if recipe.adapter.kind != "projector":
        found.append(
            f"adapter.kind={recipe.adapter.kind}: LLaVA's connector is the MLP projector "
            "(adapter.kind=projector); use --format adaptkit for other adapters"
        )
    elif recipe.adapter.projector.pool_tokens:
        found.append("adapter.projector.pool_tokens must be 0: LLaVA gives the LM every image token")
    if recipe.adapter.inject_layer != 0:
        found.append(
            f"adapter.inject_layer={recipe.adapter.inject_layer}: LLaVA's image tokens are the LM's input "
            "(adapter.inject_layer=0)"
        )
    if recipe.vision.family != "hf":
        found.append(
            f"vision.family={recipe.vision.family}: LLaVA's vision tower is a transformers model "
            "(vision.family=hf: CLIP, SigLIP)"
        )
    if recipe.vision.quant != "none":
        found.append(f"vision.quant={recipe.vision.quant}: the stock class runs a full-precision tower")
    if recipe.feature_dtype != "float32":
        found.append(
            f"feature_dtype={recipe.feature_dtype}: the run rounds image features through it, the stock "
            "class does not (feature_dtype=float32)"
        )
    if recipe.text_encoder.name not in ("", "none"):
        found.append("text_encoder: LLaVA has no text encoder (text_encoder.name=none)")
    return found


# ---- the parts ----------------------------------------------------------------------------------------


def _tower(name: str):
    """The vision tower's config and weights as LLaVA's ``AutoModel.from_config(vision_config)`` builds it,
    and its image processor."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(name)
    config = getattr(model.config, "vision_config", None)
    state = model.state_dict()
    if config is not None:  # a dual encoder (CLIPModel, SiglipModel): its vision half
        state = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    else:
        config = model.config
    return config, state, AutoImageProcessor.from_pretrained(name)


def _add_image_token(tokenizer) -> int:
    """Give the tokenizer an ``<image>`` special token and make it add no special token of its own (adaptkit
    tokenizes prompts without them); returns the token's id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
        )
    probe = "a b"
    if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        for flag in ("add_bos_token", "add_eos_token"):  # the setters rebuild the post-processor
            if isinstance(getattr(type(tokenizer), flag, None), property):
                setattr(tokenizer, flag, False)
    if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise ExportError(
            "the LM's tokenizer adds special tokens that cannot be turned off (add_bos_token / "
            "add_eos_token), and adaptkit's prompts have none: the stock processor would feed the LM another "
            "sequence"
        )
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _jinja(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


def chat_template(recipe, lm_template: str | None) -> str:
    """The processor's chat template: ``<image>`` first, then the conversation as adaptkit renders it
    (``adaptkit.data.collate.question_prompt``); for a caption run, the last user text (the predictor's
    prompt) or, without one, the recipe's caption prompt. A message's content is a string or a list of
    ``image`` and ``text`` parts (the text parts joined by a space)."""
    content = (
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    )
    head = "{{- '" + IMAGE_TOKEN + "' -}}"
    if recipe.task == "caption":  # the last user turn's text, whitespace joined, else the recipe's prompt
        return (
            head
            + "{%- set ns = namespace(text='') -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
            + content
            + "{%- set ns.text = text.split() | join(' ') -%}{%- endif -%}{%- endfor -%}"
            "{{- ns.text if ns.text else " + _jinja(recipe.data.prompt_template) + " -}}"
        )
    prefix, suffix = recipe.data.prompt_template.format(question="\0").split("\0")
    question = f"{_jinja(prefix)} + (text.split() | join(' ')) + {_jinja(suffix)}"
    if recipe.data.chat_template:
        if lm_template is None:
            raise ExportError("data.chat_template=true, but the LM's tokenizer has no chat template")
        rewrite = (
            "{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}" + content + "{%- if m['role'] == "
            f"'user' -%}}{{%- set text = {question} -%}}{{%- endif -%}}"
            "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text}] -%}{%- endfor -%}"
            "{%- set messages = ns.msgs -%}"
        )
        return head + rewrite + lm_template
    return (
        head + "{%- for m in messages -%}" + content + "{%- if m['role'] == 'user' -%}"
        "{{- (' ' if not loop.first else '') + " + question + " -}}"
        "{%- else -%}{{- ' ' + text.strip() -}}{%- endif -%}{%- endfor -%}"
    )


def build(recipe, run: Path, dtype: str, merge_base: str, adapter) -> tuple[object, object]:
    """The stock ``LlavaForConditionalGeneration`` (in ``dtype``) and ``LlavaProcessor`` of a run whose
    trained projector is ``adapter``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from adaptkit.export import _merged_lm

    lm, tokenizer = _merged_lm(recipe, run, "float32", merge_base)
    lm_template = getattr(tokenizer, "chat_template", None)
    image_id = _add_image_token(tokenizer)
    if image_id >= lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(image_id + 1, mean_resizing=True)
    vision_config, vision_state, image_processor = _tower(recipe.vision.name)
    linear_1, linear_2 = adapter.mlp[0], adapter.mlp[3]
    lm_width = lm.config.hidden_size
    if linear_1.out_features != lm_width:
        raise ExportError(
            f"adapter.projector.hidden_size={linear_1.out_features}: LLaVA's projector is as wide as the LM "
            f"({lm_width}); train with adapter.projector.hidden_size=0"
        )
    tokens = adapter.num_tokens
    patch = getattr(vision_config, "patch_size", None)
    side = getattr(vision_config, "image_size", None)
    grid = (side // patch) ** 2 if patch and side else None
    if grid is None or tokens - grid not in (0, 1):
        raise ExportError(
            f"the vision tower gives {tokens} tokens, not its patch grid ({grid}) with or without a CLS "
            "token: the stock processor could not count its image tokens"
        )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=image_id,
        image_seq_length=tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=recipe.vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    model = LlavaForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    if not set(vision_state) <= set(tower.state_dict()):  # a dual encoder's half keeps its prefix
        vision_state = {k.removeprefix("vision_model."): v for k, v in vision_state.items()}
    tower.load_state_dict(vision_state, strict=True)
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict(), strict=True)
    weight, bias = fold_standardisation(
        linear_1.weight.float(), linear_1.bias.float(), adapter.feature_mean, adapter.feature_std
    )
    projector = model.model.multi_modal_projector
    projector.linear_1.load_state_dict({"weight": weight, "bias": bias})
    projector.linear_2.load_state_dict({k: v.float() for k, v in linear_2.state_dict().items()})
    if lm.generation_config is not None:
        model.generation_config = lm.generation_config
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=tokens - grid,
        chat_template=chat_template(recipe, lm_template),
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def export_llava(
    run_dir, out_dir, dtype: str = "float32", verify_samples: int = 32, merge_base: str = "dequantized"
) -> dict:
    """Write the run as a stock LLaVA folder ``out_dir`` (which must not exist) and verify it in a fresh
    process; returns the verification report (:func:`~adaptkit.export_llava_verify.export_checked` says
    what it raises)."""
    from adaptkit.export_llava_verify import Written, export_checked, held, reference
    from adaptkit.runs import load_run

    def write(recipe, run: Path, partial: Path) -> Written:
        from transformers import AutoTokenizer

        from adaptkit.backbones.language import resolve_lm_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_lm_path(recipe.language.name))
        spec, samples, rows = held(recipe, verify_samples, tokenizer)
        _, trained = load_run(run, "cpu", verify=False)  # the frame's check_run has verified its files
        answers, logits, fold = reference(
            recipe, run, merge_base, trained, samples, rows, recipe.max_new_tokens
        )
        model, processor = build(recipe, run, dtype, merge_base, trained.adapter)
        model.save_pretrained(partial, safe_serialization=True)
        processor.save_pretrained(partial)
        for row, answer in zip(rows, answers):
            row["expected_answer"] = answer
        # adaptkit on the exported weights against the run (LoRA merged and the projector folded, in float32)
        extra = {"max_abs_logit_diff_weights_vs_run": fold}
        return Written(spec, rows, logits, extra, lambda report: _model_card(recipe, report, dtype))

    return export_checked("hf-llava", run_dir, out_dir, dtype, problems, write)


def _model_card(recipe, report: dict, dtype: str) -> str:
    example = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is this?"}]}
    ]
    return "\n".join(
        [
            f"# adaptkit export of `{report['source_run']}` (stock transformers LLaVA)",
            "",
            f"- vision tower: `{recipe.vision.name}`, hidden state {recipe.vision.feature_layer}, all tokens",
            "- projector: LLaVA-1.5's 2-layer GELU MLP (adaptkit's feature standardisation folded in)",
            f"- language model: `{recipe.language.name}` with its LoRA merged, saved as {dtype}",
            "",
            "```python",
            "from transformers import AutoProcessor, LlavaForConditionalGeneration",
            "model = LlavaForConditionalGeneration.from_pretrained('THIS_FOLDER')",
            "processor = AutoProcessor.from_pretrained('THIS_FOLDER')",
            f"text = processor.apply_chat_template({example!r}, add_generation_prompt=True)",
            "inputs = processor(images=image, text=text, return_tensors='pt')",
            f"out = model.generate(**inputs, max_new_tokens={recipe.max_new_tokens}, do_sample=False)",
            "new = out[0, inputs['input_ids'].shape[1]:]",
            "print(processor.decode(new, skip_special_tokens=True).strip())",
            "```",
            "",
            f"Verified in a process without adaptkit on {report['samples']} held samples of "
            f"{report['data']}: greedy answers identical to the run's on {report['answers_identical']:.1%}, "
            f"largest |logit difference| {report['max_abs_logit_diff']:.2e} "
            f"(tolerance {report['tolerance']}).",
            "",
        ]
    )


def summary(run, out, report: dict) -> str:
    """The line ``adaptkit export --format hf-llava`` prints."""
    return (
        f"exported {run} -> {out} (stock transformers LLaVA, {report['dtype']}, {report['seconds']} s); "
        f"checked without adaptkit on {report['samples']} held samples: answers identical "
        f"{report['answers_identical']:.1%}, max |logit diff| {report['max_abs_logit_diff']:.2e} "
        f"(tolerance {report['tolerance']})"
    )


__all__ = ["build", "chat_template", "export_llava", "fold_standardisation", "problems", "summary"]
