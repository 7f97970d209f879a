"""A resolved recipe as documented YAML (``adaptkit recipe show``) and what differs between two recipes
(``adaptkit recipe diff``). The listing loads back as the same recipe."""

from __future__ import annotations

import textwrap
from dataclasses import fields, is_dataclass
from typing import Any

import yaml

from adaptkit.config.fields import walk
from adaptkit.config.schema import Recipe

COMMENT_AT = 34  # the column documentation comments start at
WIDTH = 110


def yaml_value(value: Any) -> str:
    """One value as a YAML flow scalar or sequence (strings quoted where YAML would misread them)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _comment(prefix: str, doc: str) -> list[str]:
    """``prefix`` followed by ``# doc`` wrapped to WIDTH, continuation lines aligned under the comment."""
    column = max(COMMENT_AT, len(prefix) + 1)
    lines = textwrap.wrap(doc, WIDTH - column - 2) or [""]
    out = [f"{prefix:<{column}}# {lines[0]}".rstrip()]
    out += [f"{'':<{column}}# {line}" for line in lines[1:]]
    return out


def show(recipe: Recipe, title: str = "") -> str:
    """The whole recipe as YAML, each key with its documentation; values that differ from the schema's
    default say which default they replace."""
    default = Recipe()
    defaults = {key: value for key, value, _ in walk(default)}
    out = [f"# {title}" if title else "# a resolved recipe", "# every key, with its documentation", ""]

    def visit(obj: Any, indent: str, prefix: str) -> None:
        for f in fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            doc = f.metadata.get("doc", "")
            if is_dataclass(value):
                if key.startswith("adapter.") and _unused_section(recipe, f.name):
                    doc = f"{doc} (not read: adapter.kind is {recipe.adapter.kind})"
                out.extend(_comment(f"{indent}{f.name}:", doc))
                visit(value, indent + "  ", key + ".")
                continue
            if value != defaults.get(key):
                doc = f"{doc} [default: {yaml_value(defaults.get(key))}]"
            out.extend(_comment(f"{indent}{f.name}: {yaml_value(value)}", doc))

    visit(recipe, "", "")
    return "\n".join(out) + "\n"


def _unused_section(recipe: Recipe, name: str) -> bool:
    kind = recipe.adapter.kind
    if name == "resampler" and kind == "xattn" and recipe.adapter.xattn.resampler:
        return False
    return name in ("qformer", "projector", "resampler", "xattn") and name != kind


def diff(a: Recipe, b: Recipe) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` of every key whose values differ, in schema order."""
    right = {key: value for key, value, _ in walk(b)}
    return [(key, value, right[key]) for key, value, _ in walk(a) if value != right[key]]


def format_diff(rows: list[tuple[str, Any, Any]], left: str, right: str) -> str:
    """The rows of :func:`diff` as an aligned table."""
    if not rows:
        return f"{left} and {right} resolve to the same recipe\n"
    width = max(len(key) for key, _, _ in rows)
    head = f"{'key':<{width}}  {left}  ->  {right}"
    lines = [head, "-" * len(head)]
    lines += [f"{key:<{width}}  {yaml_value(x)}  ->  {yaml_value(y)}" for key, x, y in rows]
    return "\n".join(lines) + "\n"
