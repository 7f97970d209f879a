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

A name's *region* is where augmentation draws from (:func:`draw_shade`): the CIELAB colours nearer one of
the name's training shades than to a training shade of any other basic colour term (Berlin and Kay's
eleven, and teal: :data:`BASIC`), reached by a random point between two of the name's training shades plus
a little noise. Drawing in a region, not from its few survey points, shows the model the continuum between
them; every held-out shade lies in its own name's region (tested), yet none is ever drawn as such.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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
# Berlin and Kay's basic colour terms (Basic Color Terms, 1969), which English speakers divide colour space
# among, and teal (an easy-VQA answer, and one of the survey's most agreed names): a drawn shade must lie
# nearer its own name's shades than any other's. (White has no shades here: too near the background.)
BASIC = ("black", "gray", "red", "green", "yellow", "blue", "brown", "purple", "pink", "orange", "teal")
JITTER = 4.0  # CIELAB units of noise on a drawn shade (about one just-noticeable difference is 2.3)


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


def srgb(colour: tuple[float, float, float]) -> tuple[int, int, int] | None:
    """The sRGB colour of a CIELAB (D65) one, or None if it lies outside sRGB's gamut."""
    lightness, a, b = colour
    fy = (lightness + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    x, y, z = (f**3 if f**3 > 0.008856 else (f - 16 / 116) / 7.787 for f in (fx, fy, fz))
    x, z = x * 0.95047, z * 1.08883
    linear = (
        3.2406 * x - 1.5372 * y - 0.4986 * z,
        -0.9689 * x + 1.8758 * y + 0.0415 * z,
        0.0557 * x - 0.2040 * y + 1.0570 * z,
    )
    out = []
    for c in linear:
        if not -0.002 <= c <= 1.002:
            return None
        c = min(max(c, 0.0), 1.0)
        out.append(round(255 * (12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055)))
    return tuple(out)


@functools.cache
def _references(palette: tuple = ()) -> tuple[list[str], list[tuple[float, float, float]]]:
    """What a drawn shade is named by, in CIELAB: the training half of every basic name's shades, then a data
    ``palette``'s colours (``(name, rgb)`` pairs; one conversion per palette, not per draw)."""
    names, points = [], []
    for word in BASIC:
        for rgb in shades(word):
            names.append(word)
            points.append(lab(rgb))
    for name, rgb in palette:
        names.append(name)
        points.append(lab(rgb))
    return names, points


class Colour(NamedTuple):
    """The colour name an image's answers give it, with the training data's own palette: each name's main
    colours as the data draws them (``(name, rgb)`` pairs). A shade drawn for the image must lie nearer its
    name's shades than any other name's, the data's own included, so augmentation never relabels a colour
    the data itself names otherwise (easy-VQA's "brown", CSS 165,42,42, lies among the survey's reds)."""

    name: str
    palette: tuple[tuple[str, tuple[int, int, int]], ...] = ()


def named(colour: tuple[float, float, float], palette: tuple = ()) -> str:
    """The name of the shade nearest a CIELAB colour among the basic names' training-half survey shades and
    a data ``palette`` (``(name, rgb)`` pairs)."""
    names, points = _references(tuple(palette))
    return names[min(range(len(points)), key=lambda i: _distance(colour, points[i]))]


def in_region(point: tuple[float, float, float], colour: str | Colour) -> bool:
    """Whether a CIELAB point lies in the region of ``colour``'s name: nearer one of its training-half shades
    than any other basic name's (and than any of this name's own shades if it is not a basic one, "lime",
    "navy"), or the data's own palette's (:class:`Colour`)."""
    word, palette = _region(*(colour if isinstance(colour, Colour) else (colour, ())))
    return named(point, palette) == word


@functools.cache
def _region(name: str, palette: tuple) -> tuple[str, tuple]:
    """``name`` with synonyms joined, and the palette its region is told apart from (once per name)."""
    word = SYNONYMS.get(name, name)
    if word not in BASIC:  # a name beyond the basic terms takes its region from them
        palette = (*palette, *((word, rgb) for rgb in shades(word)))
    return word, palette


def draw_shade(colour: str | Colour, uniform, normal, tries: int = 8) -> tuple[int, int, int] | None:
    """A shade inside the region of ``colour``'s name: a random point between two of its training-half shades
    (in CIELAB), moved by a little noise, kept only inside sRGB and where the nearest shade of *any* basic
    name (and of this name, if it is not one), or of the data's own palette (:class:`Colour`), is one of
    this name's; after ``tries`` misses, one
    of the name's training shades that passes the same test (None if none does). ``uniform()`` /
    ``normal()``: random draws."""
    name = colour.name if isinstance(colour, Colour) else colour
    options = [lab(rgb) for rgb in shades(SYNONYMS.get(name, name))]

    def pick():
        return options[int(uniform() * len(options)) % len(options)]

    for _ in range(tries if options else 0):
        a, b, t = pick(), pick(), uniform()
        rgb = srgb(tuple(x + t * (y - x) + JITTER * normal() for x, y in zip(a, b)))
        if rgb is not None and in_region(lab(rgb), colour):
            return rgb
    kept = [point for point in options if in_region(point, colour)]
    return srgb(kept[int(uniform() * len(kept)) % len(kept)]) if kept else None


def data_palette(main_colours: dict[str, tuple[int, int, int]], colours: dict[str, str], share: float = 0.02):
    """The training data's own palette from its images' main colours (image → rgb) and names (image → name):
    per name, each main colour at least ``share`` of its images have, sorted (``(name, rgb)`` pairs)."""
    counts: dict[str, dict[tuple[int, int, int], int]] = {}
    for image, rgb in main_colours.items():
        if image in colours:
            found = counts.setdefault(SYNONYMS.get(colours[image], colours[image]), {})
            found[rgb] = found.get(rgb, 0) + 1
    return tuple(
        sorted(
            (name, rgb)
            for name, found in counts.items()
            for rgb, n in found.items()
            if n >= share * sum(found.values())
        )
    )
