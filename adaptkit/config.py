"""Typed recipes: YAML file + ``key=value`` overrides merged onto dataclasses by OmegaConf.

A recipe is flat for training knobs (``max_steps=200``) and nested for the model's parts
(``language.quant=4bit``). Unknown keys and values of the wrong type are errors that name the key,
the file and, where the key is in the file, its line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adaptkit.recipe_checks import RecipeError, validate

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_to_yaml"]


@dataclass
class VisionConfig:
    family: str = "torchvision"
    name: str = "mobilenet_v2"
    weights: str = "embedded"
    image_size: int = 128
    feature_layer: int = -1
    extra_layers: list[int] = field(default_factory=list)
    quant: str = "none"
    compute_dtype: str = "float32"


@dataclass
class LanguageConfig:
    name: str = "embedded:smollm2"
    dtype: str = "float32"
    quant: str = "none"
    compute_dtype: str = "float32"


@dataclass
class TextEncoderConfig:
    """The text encoder of the image-text objectives (adaptkit/backbones/text.py): frozen, optionally with
    LoRA (``lora_r`` > 0)."""

    name: str = "none"
    max_length: int = 64
    lora_r: int = 0
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class AdapterConfig:
    kind: str = "qformer"
    num_queries: int = 8
    num_layers: int = 2
    hidden_size: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_conditioned: bool = True
    inject_layer: int = 0
    pool_tokens: int = 0
    xattn_layers: list[int] = field(default_factory=list)
    xattn_resampler: bool = False


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    start_step: int = 150
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class AugmentConfig:
    """Fixed augmented views per training image (adaptkit/data/augment.py); views=0 turns it off."""

    views: int = 0
    scale_min: float = 1.0
    scale_max: float = 1.0
    rotate: float = 0.0
    translate: float = 0.0
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    channel_gain: float = 0.0
    gradient: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    background: float = 0.0


@dataclass
class DataConfig:
    train: str = "easyvqa:train"
    eval: str = "easyvqa:test"
    prompt_template: str = "Question: {question} Answer:"
    class_template: str = "a {label}"
    chat_template: bool = False
    on_bad_sample: str = "skip"
    max_skip_ratio: float = 0.01
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ObjectivesConfig:
    lm: float = 1.0
    classify: float = 0.0
    classify_max_answers: int = 1000
    itc: float = 0.0
    itm: float = 0.0
    triplet: float = 0.0
    triplet_margin: float = 0.2
    embed_dim: int = 256
    temperature: float = 0.07


@dataclass
class Recipe:
    output_dir: str = "runs/default"
    seed: int = 0
    task: str = "vqa"
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    max_steps: int = 700
    batch_size: int = 32
    grad_accum_steps: int = 1
    length_grouping: int = 1
    pack_questions: int = 1
    activation_checkpointing: int = 0
    compile: bool = False
    lower_state_cache_mb: float = 1024.0
    lr_adapter: float = 1e-3
    lr_lora: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 30
    lr_decay_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    cache_features: bool = True
    feature_cache_dir: str = "auto"
    log_every: int = 10
    eval_every: int = 150
    eval_limit: int = 500
    eval_batch_size: int = 64
    max_new_tokens: int = 5
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = ""
    init_from: str = ""
    log_samples: bool = False
    check_replicas: int = 0
    report_to: str = "none"


def _key_lines(path: Path) -> dict[str, int]:
    """Map each dotted key of a YAML mapping to its 1-based line in the file."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _where(key: str | None, source: str, lines: dict[str, int]) -> str:
    if key and key in lines:
        return f"{source}:{lines[key]} (key '{key}')"
    if key:
        return f"{source} (key '{key}')"
    return source


def _merge(base: Any, layer: Any, source: str, lines: dict[str, int]) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        detail = str(err).splitlines()[0]
        if "not in struct" in str(err) or "Key" in type(err).__name__:
            raise RecipeError(
                f"{_where(key, source, lines)}: unknown key. Check its spelling against "
                f"adaptkit/config.py or the recipe's comments."
            ) from None
        raise RecipeError(f"{_where(key, source, lines)}: {detail}") from None


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe YAML and apply ``key=value`` overrides (dotted keys reach nested sections).

    Args:
        path: the recipe file; None starts from the defaults.
        overrides: command-line items such as ``max_steps=200`` or ``language.quant=4bit``.

    Returns:
        A validated :class:`Recipe`.

    Raises:
        RecipeError: unreadable file, unknown key, wrong type or a value outside its choices.
    """
    cfg = OmegaConf.structured(Recipe)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; pass a YAML file such as recipes/*.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values")
        cfg = _merge(cfg, OmegaConf.create(loaded or {}), str(path), _key_lines(path))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like key=value (for example max_steps=200)")
        key, raw = item.split("=", 1)
        text_field = isinstance(OmegaConf.select(cfg, key), str)
        try:
            layer = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            if not text_field:
                reason = " ".join(str(err).split())
                raise RecipeError(
                    f"override '{item}' is not a valid value ({reason}); quote values with spaces or "
                    "braces, e.g. 'data.prompt_template=\"{question} Answer:\"'"
                ) from None
            layer = None
        if text_field and (layer is None or not isinstance(OmegaConf.select(layer, key), str)):
            # YAML reads `{question}` (or `{question} Answer:`) as a mapping or fails on it; a text field
            # takes the value as written.
            layer = OmegaConf.create(_nested(key, raw))
        cfg = _merge(cfg, layer, f"command-line override '{item}'", {})
    recipe: Recipe = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(recipe, str(path) if path else "defaults")
    return recipe


def _nested(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialize a resolved recipe (what a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
