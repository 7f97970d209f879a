"""What a recipe's values must satisfy beyond their types: choices, ranges, the combinations that cannot
work (each task's and adapter's own checks included). ``load_recipe`` (``adaptkit.config``) calls
:func:`validate` after merging the YAML and the overrides; every error names the key and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptkit.config import AdapterConfig, AugmentConfig, Recipe


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message says where and what to do."""


_CHOICES = {
    "vision.family": ("torchvision", "hf", "open_clip"),
    "vision.quant": ("none", "8bit", "4bit"),
    "vision.compute_dtype": ("float32", "bfloat16", "float16"),
    "language.dtype": ("float32", "bfloat16", "float16"),
    "language.compute_dtype": ("float32", "bfloat16", "float16"),
    "language.quant": ("none", "8bit", "4bit"),
    "data.on_bad_sample": ("error", "skip"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "report_to": ("none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "all"),
}
_POSITIVE = (
    "max_steps",
    "batch_size",
    "grad_accum_steps",
    "length_grouping",
    "pack_questions",
    "log_every",
    "eval_batch_size",
    "max_new_tokens",
)


def _get(recipe: Recipe, dotted: str) -> Any:
    obj: Any = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _registered() -> dict[str, tuple[str, ...]]:
    """Keys whose choices are the names of a registry (tasks, adapters)."""
    from adaptkit.adapters import ADAPTERS
    from adaptkit.tasks import TASKS

    return {"task": tuple(TASKS), "adapter.kind": tuple(ADAPTERS)}


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Check values that types alone cannot: choices, positivity, the prompt template."""
    for key, choices in {**_CHOICES, **_registered()}.items():
        value = _get(recipe, key)
        if value not in choices:
            raise RecipeError(f"{source}: {key}={value!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if _get(recipe, key) <= 0:
            raise RecipeError(f"{source}: {key} must be > 0, got {_get(recipe, key)}")
    if recipe.vision.quant != "none" and recipe.vision.family != "hf":
        raise RecipeError(
            f"{source}: vision.quant={recipe.vision.quant} needs vision.family=hf (bitsandbytes quantizes "
            f"Linear layers: {recipe.vision.family} trunks here are convolutions or fused attention); "
            "set vision.quant=none"
        )
    if recipe.checkpoint_every < 0 or recipe.keep_checkpoints < 1:
        raise RecipeError(
            f"{source}: checkpoint_every must be >= 0 (0: only at the end) and keep_checkpoints >= 1, got "
            f"{recipe.checkpoint_every} and {recipe.keep_checkpoints}"
        )
    if not 0.0 <= recipe.data.max_skip_ratio <= 1.0:
        raise RecipeError(
            f"{source}: data.max_skip_ratio must lie in [0, 1], got {recipe.data.max_skip_ratio}"
        )
    if recipe.adapter.inject_layer < 0 or recipe.lower_state_cache_mb < 0:
        raise RecipeError(
            f"{source}: adapter.inject_layer must be >= 0 (0: soft tokens at the LM's input) and "
            f"lower_state_cache_mb >= 0 (0: no cache); got {recipe.adapter.inject_layer} and "
            f"{recipe.lower_state_cache_mb}"
        )
    if not 0 <= recipe.lr_decay_steps <= recipe.max_steps:
        raise RecipeError(
            f"{source}: lr_decay_steps must lie in [0, max_steps={recipe.max_steps}] (0: cosine over the "
            f"whole run), got {recipe.lr_decay_steps}"
        )
    if recipe.activation_checkpointing < 0:
        raise RecipeError(
            f"{source}: activation_checkpointing must be 0 (off) or N >= 1 (every Nth LM layer)"
        )
    _validate_objectives(recipe, source)
    if recipe.pack_questions > 1:
        clashes = [
            what
            for what, bad in (
                (
                    "adapter.text_conditioned=false (one copy of the image tokens serves every question)",
                    recipe.adapter.text_conditioned and _adapter_class(recipe.adapter.kind).reads_text,
                ),
                ("objectives.classify=0", recipe.objectives.classify > 0),
            )
            if bad
        ]
        if clashes:
            raise RecipeError(
                f"{source}: pack_questions={recipe.pack_questions} needs "
                + "; ".join(clashes)
                + " (or set pack_questions=1)"
            )
    problem = _task_class(recipe.task).config_problem(recipe)
    if problem:
        raise RecipeError(f"{source}: {problem}")
    field_name = _task_class(recipe.task).prompt_field
    if field_name and "{" + field_name + "}" not in recipe.data.prompt_template:
        raise RecipeError(
            f"{source}: data.prompt_template must contain '{{{field_name}}}' for task {recipe.task}"
        )
    _validate_adapter(recipe.adapter, source)
    _validate_augment(recipe.data.augment, source)


IMAGE_TEXT_OBJECTIVES = ("itc", "itm", "triplet")


def _validate_objectives(recipe: Recipe, source: str) -> None:
    """Loss weights >= 0 and not all 0; the image-text ones need a text encoder; their settings' ranges."""
    obj = recipe.objectives
    weights = {n: getattr(obj, n) for n in ("lm", "classify", *IMAGE_TEXT_OBJECTIVES)}
    if any(w < 0 for w in weights.values()) or not any(weights.values()) or obj.classify_max_answers < 1:
        raise RecipeError(
            f"{source}: objectives.{{{', '.join(weights)}}} are loss weights >= 0, not all 0, and "
            f"objectives.classify_max_answers >= 1; got {weights}, {obj.classify_max_answers}"
        )
    used = [n for n in IMAGE_TEXT_OBJECTIVES if weights[n] > 0]
    if used and recipe.text_encoder.name in ("", "none"):
        raise RecipeError(
            f"{source}: objectives {', '.join(used)} compare images with texts and need a text encoder: set "
            "text_encoder.name (embedded:minilm, a hub id or a folder)"
        )
    if obj.embed_dim < 1 or not 0 < obj.temperature < 1 or obj.triplet_margin < 0:
        raise RecipeError(
            f"{source}: objectives.embed_dim must be >= 1, objectives.temperature in (0, 1) and "
            f"objectives.triplet_margin >= 0; got {obj.embed_dim}, {obj.temperature}, {obj.triplet_margin}"
        )
    text = recipe.text_encoder
    if text.max_length < 1 or text.lora_r < 0 or text.lora_alpha < 1 or not text.lora_target_modules:
        raise RecipeError(
            f"{source}: text_encoder.max_length must be >= 1, text_encoder.lora_r >= 0 (0: no LoRA), "
            "text_encoder.lora_alpha >= 1 and text_encoder.lora_target_modules a non-empty list; got "
            f"{text.max_length}, {text.lora_r}, {text.lora_alpha}, {text.lora_target_modules}"
        )
    if text.lora_r and not used:
        raise RecipeError(
            f"{source}: text_encoder.lora_r={text.lora_r} trains the text encoder, which only the image-text "
            "objectives read: set objectives.itc / itm / triplet > 0, or text_encoder.lora_r=0"
        )
    if "{label}" not in recipe.data.class_template:
        raise RecipeError(f"{source}: data.class_template must contain '{{label}}'")


def _validate_augment(aug: AugmentConfig, source: str) -> None:
    """Ranges of data.augment.* (each 0 turns its transform off)."""
    problems = []
    if aug.views < 0:
        problems.append(f"data.augment.views must be >= 0 (0: no augmentation), got {aug.views}")
    if not 0 < aug.scale_min <= aug.scale_max:
        problems.append(
            f"data.augment.scale_min / scale_max must satisfy 0 < min <= max (1, 1: no scaling), got "
            f"{aug.scale_min}, {aug.scale_max}"
        )
    for key, high in (("rotate", 180.0), ("translate", 0.5), ("brightness", 0.9), ("contrast", 0.9)):
        value = getattr(aug, key)
        if not 0 <= value <= high:
            problems.append(f"data.augment.{key} must lie in [0, {high:g}], got {value}")
    for key in ("channel_gain", "gradient", "blur", "noise"):
        value = getattr(aug, key)
        if not 0 <= value < 1:
            problems.append(f"data.augment.{key} must lie in [0, 1), got {value}")
    if not 0 <= aug.background <= 1:
        problems.append(f"data.augment.background is a probability in [0, 1], got {aug.background}")
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems))


def _task_class(name: str):
    from adaptkit.tasks import TASKS

    return TASKS[name]


def _adapter_class(kind: str):
    from adaptkit.adapters import ADAPTERS

    return ADAPTERS[kind]


def _validate_adapter(adapter: AdapterConfig, source: str) -> None:
    """The adapter section's checks that depend on its kind."""
    if adapter.hidden_size % adapter.num_heads:
        raise RecipeError(
            f"{source}: adapter.hidden_size ({adapter.hidden_size}) must be divisible by "
            f"adapter.num_heads ({adapter.num_heads})"
        )
    if adapter.pool_tokens < 0:
        raise RecipeError(
            f"{source}: adapter.pool_tokens must be >= 0 (0: every image token), got {adapter.pool_tokens}"
        )
    problem = _adapter_class(adapter.kind).config_problem(adapter)
    if problem:
        raise RecipeError(f"{source}: {problem}")
