"""What a recipe's values must satisfy beyond their types, as far as the schema alone can tell: each
field's choices and range (declared beside the field, ``adaptkit.config.fields.knob``) and the
combinations of fields that cannot work. Names that only the registries know (tasks, adapter kinds) and
each task's and adapter's own rules are checked one floor up (``adaptkit.recipes``)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from adaptkit.config.fields import walk

if TYPE_CHECKING:
    from adaptkit.config.schema import Recipe


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message says where and what to do."""


IMAGE_TEXT_OBJECTIVES = ("itc", "itm", "triplet")


def _field_problem(key: str, value: Any, meta) -> str | None:
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"{key}={value!r} is not one of {', '.join(map(str, choices))}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    bounds = {">=": meta.get("low"), "<=": meta.get("high"), ">": meta.get("above"), "<": meta.get("below")}
    bounds = {op: bound for op, bound in bounds.items() if bound is not None}
    holds = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
    if all(holds[op](value, bound) for op, bound in bounds.items()):
        return None
    return f"{key} must be {' and '.join(f'{op} {bound:g}' for op, bound in bounds.items())}, got {value}"


def check(recipe: Recipe, source: str = "recipe") -> None:
    """Raise :class:`RecipeError` naming ``source`` and the key on the first value the schema rules out."""
    for key, value, f in walk(recipe):
        problem = _field_problem(key, value, f.metadata)
        if problem:
            raise RecipeError(f"{source}: {problem} ({f.metadata.get('doc', '')})")
    for problem in _combinations(recipe):
        raise RecipeError(f"{source}: {problem}")


def _combinations(recipe: Recipe):
    """The combinations of fields that cannot work, each with what to change."""
    if recipe.vision.quant != "none" and recipe.vision.family != "hf":
        yield (
            f"vision.quant={recipe.vision.quant} needs vision.family=hf (bitsandbytes quantizes Linear "
            f"layers: {recipe.vision.family} trunks here are convolutions or fused attention); set "
            "vision.quant=none"
        )
    if recipe.lr_decay_steps > recipe.max_steps:
        yield (
            f"lr_decay_steps must lie in [0, max_steps={recipe.max_steps}] (0: cosine over the whole run), "
            f"got {recipe.lr_decay_steps}"
        )
    aug = recipe.data.augment
    if aug.scale_min > aug.scale_max:
        yield f"data.augment.scale_min ({aug.scale_min}) must be <= data.augment.scale_max ({aug.scale_max})"
    if "{label}" not in recipe.data.class_template:
        yield "data.class_template must contain '{label}'"
    yield from _objective_problems(recipe)
    if recipe.pack_questions > 1 and recipe.objectives.classify > 0:
        yield f"pack_questions={recipe.pack_questions} needs objectives.classify=0 (or pack_questions=1)"


def _objective_problems(recipe: Recipe):
    obj, text = recipe.objectives, recipe.text_encoder
    weights = {n: getattr(obj, n) for n in ("lm", "classify", *IMAGE_TEXT_OBJECTIVES)}
    if not any(weights.values()):
        yield f"objectives.{{{', '.join(weights)}}} are loss weights, not all 0; got {weights}"
    used = [n for n in IMAGE_TEXT_OBJECTIVES if weights[n] > 0]
    if used and text.name in ("", "none"):
        yield (
            f"objectives {', '.join(used)} compare images with texts and need a text encoder: set "
            "text_encoder.name (embedded:minilm, a hub id or a folder)"
        )
    if not text.lora_target_modules:
        yield "text_encoder.lora_target_modules must be a non-empty list"
    if text.lora_r and not used:
        yield (
            f"text_encoder.lora_r={text.lora_r} trains the text encoder, which only the image-text "
            "objectives read: set objectives.itc / itm / triplet > 0, or text_encoder.lora_r=0"
        )
