"""A recipe field and its documentation in one place: :func:`knob` makes a dataclass field whose metadata
holds what the field means (``doc``), the values it allows (``choices``, a numeric range) and, read back by
:func:`field_docs`, what ``adaptkit recipe show`` prints beside each value (as peft's configs do)."""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any


def knob(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A documented recipe field.

    Args:
        default: the value a recipe gets when it does not set the key (lists and dicts are copied per recipe).
        doc: what the field means, its unit and what its special values do; shown by ``adaptkit recipe show``.
        choices: the values it may take (checked by ``adaptkit.config.checks``).
        low, high: inclusive bounds of a number; ``above``, ``below``: exclusive ones.
    """
    meta = {"doc": " ".join(doc.split()), "choices": choices, "low": low, "high": high}
    meta.update(above=above, below=below)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """A nested recipe section (a dataclass of knobs) with its own documentation."""
    return field(default_factory=cls, metadata={"doc": " ".join(doc.split())})


def walk(obj: Any, prefix: str = ""):
    """``(dotted key, value, dataclass field)`` of every leaf of a recipe (or of its class), depth first."""
    for f in fields(obj):
        value = getattr(obj, f.name) if not isinstance(obj, type) else _default(f)
        if is_dataclass(value):
            yield from walk(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, f


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def field_docs(cls: type) -> dict[str, str]:
    """Every dotted key of a recipe class, sections included, mapped to its documentation."""
    docs: dict[str, str] = {}

    def visit(obj: type, prefix: str) -> None:
        for f in fields(obj):
            docs[prefix + f.name] = f.metadata.get("doc", "")
            value = _default(f)
            if is_dataclass(value):
                visit(type(value), f"{prefix}{f.name}.")

    visit(cls, "")
    return docs
