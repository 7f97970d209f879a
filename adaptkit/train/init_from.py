"""``init_from``: a run that starts from another run's adapter and image-text heads (BLIP-2 stage 2 from
stage 1), checked before anything is built."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from adaptkit.artifacts import RECIPE_FILE, TEXT_LORA_FILE, verify_run

if TYPE_CHECKING:
    from adaptkit.config import Recipe

log = logging.getLogger(__name__)

# vision settings that change what the adapter's input features mean (image_size only rescales them)
_SAME_FEATURES = ("family", "name", "weights", "feature_layer", "extra_layers")


def check_init_source(recipe: Recipe, folder: Path) -> None:
    """Refuse an ``init_from`` run whose adapter read other features than this recipe gives it."""
    from adaptkit.config import RecipeError
    from adaptkit.recipes import load_recipe

    if not (folder / RECIPE_FILE).is_file():
        raise RecipeError(
            f"init_from: {folder / RECIPE_FILE} is missing; give a run directory of `adaptkit train`"
        )
    verify_run(folder)  # the files this run starts from are the ones that run saved
    source = load_recipe(folder / RECIPE_FILE)
    differ = [
        f"vision.{k}: {getattr(source.vision, k)!r} there, {getattr(recipe.vision, k)!r} here"
        for k in _SAME_FEATURES
        if getattr(source.vision, k) != getattr(recipe.vision, k)
    ]
    texts = (source.text_encoder.name, recipe.text_encoder.name)
    if "none" not in texts and texts[0] != texts[1]:
        differ.append(f"text_encoder.name: {texts[0]!r} there, {texts[1]!r} here (its heads read it)")
    if differ:
        raise RecipeError(
            f"init_from={folder}: that run's adapter was trained on other features ("
            + "; ".join(differ)
            + "). Set the same vision keys here"
        )
    if source.vision.image_size != recipe.vision.image_size:
        log.warning(
            "init_from %s: trained at vision.image_size=%d, this run uses %d (the adapter keeps its feature "
            "statistics from there)",
            folder,
            source.vision.image_size,
            recipe.vision.image_size,
        )


def init_from_run(model, run_dir: str) -> None:
    """Start from another run's adapter (its feature statistics included) and the image-text heads both
    have, e.g. BLIP-2 stage 2 from a stage-1 run; LoRA and everything else start fresh. ``setup`` has
    checked the source run first (:func:`check_init_source`)."""
    from safetensors.torch import load_file

    from adaptkit.artifacts import HEADS_FILE
    from adaptkit.model.trainables import load_text_lora, load_trainables

    folder = Path(run_dir)
    load_trainables(model, folder, heads=False)
    heads = folder / HEADS_FILE
    loaded = []
    if heads.is_file():
        state = load_file(str(heads))
        for name, head in model.objectives.heads.items():
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            if part:
                head.load_state_dict(part)
                loaded.append(f"head {name}")
    encoder = model.text_encoder
    if (folder / TEXT_LORA_FILE).is_file():
        if encoder is not None and encoder.trainable:
            load_text_lora(model, folder)
            loaded.append("text-encoder LoRA")
        elif loaded:
            log.warning(
                "init_from %s: its heads were trained with a text-encoder LoRA (text_lora.safetensors) this "
                "recipe does not have (text_encoder.lora_r=0): they now read the plain encoder",
                folder,
            )
    log.info("init_from %s: adapter%s loaded", folder, "".join(f", {n}" for n in loaded))
