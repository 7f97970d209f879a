"""Which shades people give the same colour name, from a real colour-naming survey, not from guesses.

The source is the xkcd colour survey (Randall Munroe, 2010: ~5 million answers from ~222,000 people naming
random RGB colours), whose 949 most agreed names and their mean colours matplotlib ships
(``matplotlib._color_data.XKCD_COLORS``). The shades of a basic name W are the survey's colours named W
alone or W with a modifier of tone only ("dark", "pale", "dull", "bright", "medium", "deep", ...; the full
list is :data:`TONES`). A name that mixes in another hue ("brownish red", "teal blue", "olive green") is
left out: people split on it. "grey" and "gray" are one name. Shades within 30 CIELAB units of white or 20
of black are left out (a shape in them vanishes into a light background or reads as black); black keeps
its own.

Each name's shades are cut in two: :func:`shades` ``("train")`` for augmentation (``data.augment.shades``)
and ``("held_out")`` for the out-of-distribution set ``benchmarks/ood_vqa.py --style shades``, so evaluation
sees shades no training or tuning saw. Training keeps the plain name's shade and both ends of the name's
lightness range (its darkest and its lightest shade), so the held-out set asks the model to name shades
*between* ones it has seen, not beyond them; the shades in between alternate, by lightness, starting with
the held-out half. (A name with one other shade, like black's "almost black", holds that one out.)
"""

from __future__ import annotations

import functools

TONES = frozenset(
    {
        "dark",
        "deep",
        "light",
        "bright",
        "pale",
        "dull",
        "dusty",
        "medium",
        "vivid",
        "strong",
        "pure",
        "true",
        "rich",
        "darkish",
        "lightish",
        "faded",
        "muted",
        "warm",
        "cool",
        "almost",
        "very dark",
        "very light",
        "very pale",
    }
)
SYNONYMS = {"grey": "gray"}


def _linear(c: float) -> float:
    c /= 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """CIELAB (D65) of an sRGB colour."""
    r, g, b = (_linear(c) for c in rgb)
    xyz = (
        (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047,
        0.2126 * r + 0.7152 * g + 0.0722 * b,
        (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883,
    )
    fx, fy, fz = (t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


@functools.cache
def regions() -> dict[str, list[tuple[str, tuple[int, int, int]]]]:
    """Every basic name the survey gives tone-only shades of → ``[(survey name, rgb), ...]``, the plain name
    first, then by lightness."""
    from matplotlib._color_data import XKCD_COLORS

    out: dict[str, list[tuple[str, tuple[int, int, int]]]] = {}
    for key, hex_value in XKCD_COLORS.items():
        name = key.removeprefix("xkcd:")
        *modifier, word = name.split()
        word = SYNONYMS.get(word, word)
        if modifier and " ".join(modifier) not in TONES:
            continue
        rgb = tuple(int(hex_value[i : i + 2], 16) for i in (1, 3, 5))
        colour = lab(rgb)
        near_black = word != "black" and _distance(colour, (0.0, 0.0, 0.0)) < 20
        if _distance(colour, (100.0, 0.0, 0.0)) < 30 or near_black:
            continue
        out.setdefault(word, []).append((name, rgb))
    for word, found in out.items():
        found.sort(key=lambda item: (SYNONYMS.get(item[0], item[0]) != word, lab(item[1])[0]))
    return out


def shades(name: str, half: str = "train") -> list[tuple[int, int, int]]:
    """The ``half`` (``train`` or ``held_out``) of the shades people call ``name`` (empty if the survey has
    none): the plain name's shade, the darkest and the lightest other shade and every second one between
    them go to ``train``, the rest to ``held_out``."""
    if half not in ("train", "held_out"):
        raise ValueError(f"half must be train or held_out, got {half!r}")
    found = [rgb for _, rgb in regions().get(SYNONYMS.get(name, name), [])]
    plain, rest = found[:1], found[1:]  # rest: by lightness
    if len(rest) < 3:
        held = rest[-1:]
        kept = rest[:-1]
    else:
        between = rest[1:-1]
        held, kept = between[::2], [rest[0], *between[1::2], rest[-1]]
    return plain + kept if half == "train" else held


def image_colours(samples) -> dict[str, str]:
    """Image path → the colour name its samples' answers give it, for images whose answers name exactly one
    colour the survey has shades of (``samples``: objects with ``image`` and ``answer``)."""
    names: dict[str, set[str]] = {}
    known = regions()
    for sample in samples:
        answer = str(getattr(sample, "answer", "") or "").strip().lower()
        answer = SYNONYMS.get(answer, answer)
        if answer in known:
            names.setdefault(sample.image, set()).add(answer)
    return {image: next(iter(found)) for image, found in names.items() if len(found) == 1}
