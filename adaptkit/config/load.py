"""Reading a recipe: a YAML file and ``key=value`` overrides merged onto the schema by OmegaConf.

A recipe is flat for training knobs (``max_steps=200``) and nested for the model's parts
(``language.quant=4bit``). Unknown keys and values of the wrong type are errors that name the key, the
file and, where the key is in the file, its line. Recipes written before the adapter settings moved into
per-kind sections (``adapter.num_queries`` -> ``adapter.qformer.num_queries``; run directories of
earlier versions hold them) are read with their flat keys moved where they now live, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adaptkit.config.checks import RecipeError, check
from adaptkit.config.schema import Recipe

log = logging.getLogger("adaptkit")

#: the flat ``adapter.*`` keys of earlier recipes -> where each lives now, per adapter kind (other kinds:
#: ``adapter.options.*``). A key that did nothing for the kind it was given with is dropped.
LEGACY_ADAPTER_KEYS = {
    "qformer": {
        k: [f"qformer.{k}"]
        for k in (
            "num_queries",
            "num_layers",
            "hidden_size",
            "num_heads",
            "mlp_ratio",
            "dropout",
            "text_conditioned",
        )
    },
    "projector": {k: [f"projector.{k}"] for k in ("hidden_size", "pool_tokens", "dropout")},
    "resampler": {
        k: [f"resampler.{k}"]
        for k in ("num_queries", "num_layers", "hidden_size", "num_heads", "mlp_ratio", "dropout")
    },
    "xattn": {
        "xattn_layers": ["xattn.layers"],
        "xattn_resampler": ["xattn.resampler"],
        **{k: [f"xattn.{k}", f"resampler.{k}"] for k in ("num_heads", "mlp_ratio", "dropout")},
        **{k: [f"resampler.{k}"] for k in ("num_queries", "num_layers", "hidden_size")},
    },
}
#: a recipe is a few KB; anything past this is refused before YAML is built from it.
MAX_RECIPE_BYTES = 1 << 20

_FLAT = {k for keys in LEGACY_ADAPTER_KEYS.values() for k in keys} | {"pool_tokens", "text_conditioned"}


def legacy_adapter_targets(kind: str, key: str) -> list[str] | None:
    """Where the flat ``adapter.<key>`` of an earlier recipe lives now for adapter ``kind`` (dotted under
    ``adapter``; [] when it did nothing for that kind), or None when ``key`` is not such a key."""
    if key not in _FLAT:
        return None
    if kind not in LEGACY_ADAPTER_KEYS:
        return [f"options.{key}"]
    return LEGACY_ADAPTER_KEYS[kind].get(key, [])


def _migrate_adapter(loaded: dict, source: str) -> dict:
    """``loaded`` (a YAML recipe) with the flat adapter keys of earlier versions moved into sections."""
    adapter = loaded.get("adapter")
    if not isinstance(adapter, dict) or not _FLAT & set(adapter):
        return loaded
    kind = adapter.get("kind", Recipe().adapter.kind)
    moved = {k: v for k, v in adapter.items() if k not in _FLAT}
    for key in [k for k in adapter if k in _FLAT]:
        for target in legacy_adapter_targets(kind, key):
            section, name = target.split(".")
            moved.setdefault(section, {})
            if isinstance(moved[section], dict):
                moved[section].setdefault(name, adapter[key])
    log.warning(
        "%s: flat adapter keys (%s) are read as adapter.%s.* (their place since the per-kind sections); "
        "`adaptkit recipe show` prints the recipe in today's form",
        source,
        ", ".join(sorted(_FLAT & set(adapter))),
        kind,
    )
    return {**loaded, "adapter": moved}


def _recipe_text(path: Path) -> str:
    """A recipe file's text, refused before any YAML is built from it when it is too large to be a recipe,
    not UTF-8, or uses aliases (``*name``): a few hundred bytes of nested aliases expand to gigabytes."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: {size:,} bytes is not a recipe (at most {MAX_RECIPE_BYTES:,}); pass a recipe YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise RecipeError(
                    f"{path}:{event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in "
                    "recipes; write the value out"
                )
    except yaml.YAMLError:
        pass  # reported with its position by the parse that follows
    return text


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML mapping to its 1-based line in the text."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
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
                "`adaptkit recipe show` (every key with its documentation: adaptkit/config/schema.py)"
            ) from None
        raise RecipeError(f"{_where(key, source, lines)}: {detail}") from None


def parse_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe YAML and apply ``key=value`` overrides (dotted keys reach nested sections).

    Args:
        path: the recipe file; None starts from the defaults.
        overrides: command-line items such as ``max_steps=200`` or ``language.quant=4bit``.

    Returns:
        A :class:`Recipe` checked against the schema (``adaptkit.config.checks``); the names only the
        registries know are checked by ``adaptkit.recipes.load_recipe``, which most callers want.

    Raises:
        RecipeError: unreadable file, unknown key, wrong type or a value outside its choices.
    """
    cfg = OmegaConf.structured(Recipe)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; pass a YAML file such as recipes/*.yaml")
        text = _recipe_text(path)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values")
        loaded = _migrate_adapter(loaded or {}, str(path))
        cfg = _merge(cfg, OmegaConf.create(loaded), str(path), _key_lines(text))
    for item in _migrate_overrides(cfg, overrides):
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
    check(recipe, str(path) if path else "defaults")
    return recipe


def _migrate_overrides(cfg: Any, overrides) -> list[str]:
    """The overrides with earlier versions' flat ``adapter.<key>=...`` moved into the sections of the
    adapter kind the recipe ends up with."""
    kinds = [item.split("=", 1)[1] for item in overrides if item.startswith("adapter.kind=")]
    kind = kinds[-1] if kinds else OmegaConf.select(cfg, "adapter.kind")
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts = key.split(".")
        targets = (
            legacy_adapter_targets(kind, parts[1]) if len(parts) == 2 and parts[0] == "adapter" else None
        )
        if targets is None:
            out.append(item)
            continue
        log.warning("override %s: read as %s", key, ", ".join(f"adapter.{t}" for t in targets) or "nothing")
        out += [f"adapter.{t}={value}" for t in targets]
    return out


def _nested(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialize a resolved recipe (what a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
