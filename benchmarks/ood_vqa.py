"""An out-of-distribution VQA set in easy-VQA's answer space, drawn by a renderer of our own.

easy-VQA's test split comes from the renderer of its training split: 64x64 canvases, near-white tinted
backgrounds (each channel 230-255), axis-aligned shapes in flat CSS colours. This generator keeps the
answer space (3 shapes, 8 colours, yes/no) and easy-VQA's question wording, and changes how the images
look, so a model that learned the task rather than the renderer still answers:

- 96x96 canvases (the backbone resizes both to ``vision.image_size``);
- soft, clearly non-white backgrounds (each channel 175-235), flat or a linear gradient between two;
- shapes from ~10% to ~45% of the canvas wide, anywhere on it, rectangles of aspect 0.5-2;
- a third of the rectangles and triangles rotated by a random angle;
- shape colours jittered by up to +-10 per channel around the CSS colour easy-VQA uses;
- anti-aliased edges (drawn at 4x, downsampled).

``--style shades`` draws the default style's images with each shape in a shade people give its colour's
name: one of the held-out half of the xkcd colour survey's tone-only shades of that name
(``adaptkit/data/colour_names.py``; e.g. "dark red", "dull green", "light brown", "dark grey"), which
``data.augment.shades`` never shows in training. Kept out of all tuning.

``--style region`` draws the default style's images with each shape in a shade drawn inside its name's
region from the survey's *training* half, as ``data.augment.shades`` draws them (easy-VQA's palette taking
part), but afresh: not an out-of-distribution test, a diagnostic that tells a model that never learned the
shade views from one that learned them and does not carry them to the held-out shades.

``--like-easyvqa FACTOR ...`` (a diagnostic) gives any style's images one or more of easy-VQA's own traits
back, to tell which of the renderer's differences costs most: ``background`` (flat, each channel 230-255),
``size`` (shapes ~14%-53% of the canvas wide, as easy-VQA's measure), ``rotation`` (none), ``canvas`` (64 px
instead of 96). Everything else is drawn from the same random stream as without it, so sets that differ in
factors hold the same shapes, places (up to the size's margin) and shades.

``--style textured`` draws a second, independent set on top of that renderer, for a check that no setting
was tuned on: grainy backgrounds (Gaussian noise, std 4-12 per pixel), a darker outline of 1-3 px on half the
shapes, a blur on a third of the images, canvases of 80, 128 or 160 px, and JPEG compression (quality
35-75; saved as .jpg).

Beside ``questions.jsonl`` it writes ``colour.jsonl``, the questions whose answer is a colour (2 of each
image's 10), and ``captions.jsonl`` (adaptkit's caption JSONL): each image with the five phrasings and the
``"{colour} {shape}"`` label that ``easyvqa-captions`` gives easy-VQA's images, for the retrieval task
(``adaptkit eval RUN --data data/ood_vqa/captions.jsonl``).

Each image gets 10 questions: what colour, what shape, the shape given its colour, the colour given its
shape, and six yes/no questions (colour and shape, asked positively and negated, half of them true),
each phrased with one of easy-VQA's own templates. Fixed seed: the same call writes the same files.

    python benchmarks/ood_vqa.py --out data/ood_vqa --images 300 --seed 0
    python benchmarks/ood_vqa.py --out data/ood_vqa_textured --style textured --seed 2
    python benchmarks/ood_vqa.py --out data/ood_vqa_shades2 --style shades --seed 4
    adaptkit eval RUN --data data/ood_vqa/questions.jsonl --json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from adaptkit.data.captions import PHRASINGS

# The CSS colours easy-VQA draws its shapes in (measured from its training images).
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA's question templates (every distinct question of its training split, words replaced).
COLOR_QUESTIONS = ("what color is the shape?", "what is the color of the shape?")
COLOR_OF_SHAPE = ("what color is the {shape}?", "what is the color of the {shape}?")
SHAPE_QUESTIONS = (
    "what shape is in the image?",
    "what shape does the image contain?",
    "what shape is present?",
)
SHAPE_OF_COLOR = ("what is the {color} shape?",)
YES_NO = (
    "is there a {x}?",
    "is there a {x} in the image?",
    "does the image contain a {x}?",
    "is a {x} present?",
)
YES_NO_NEGATED = (
    "is there not a {x}?",
    "is there not a {x} in the image?",
    "does the image not contain a {x}?",
    "is no {x} present?",
)
SIZE, SCALE = 96, 4  # canvas side, supersampling factor
STYLES = ("default", "textured", "shades", "region")
FACTORS = ("background", "size", "rotation", "canvas")  # easy-VQA's traits ``--like-easyvqa`` gives back


def held_out_shades(color: str) -> list[tuple[int, int, int]]:
    """The shades of ``color`` kept out of training (``adaptkit.data.colour_names``: the survey's held-out
    half; easy-VQA's "gray" is the survey's "grey")."""
    from adaptkit.data.colour_names import shades

    return shades(color, "held_out")


def _easy_background(rng: random.Random, avoid: tuple[int, int, int]) -> Image.Image:
    """easy-VQA's background: one flat near-white colour (each channel 230-255), far from the shape's where
    100 tries find one."""
    for _ in range(100):
        color = tuple(rng.randint(230, 255) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(color, avoid)) >= 150:
            break
    return Image.new("RGB", (SIZE * SCALE, SIZE * SCALE), color)


def _background(rng: random.Random, avoid: tuple[int, int, int]) -> Image.Image:
    """A soft flat or gradient background, every colour far from the shape's."""

    def soft() -> tuple[int, int, int]:
        """A colour far from the shape's; for a light shade inside the backgrounds' own range, where none
        may be, the farthest of 200,000 tries."""
        best, gap = None, -1
        for _ in range(200_000):
            color = tuple(rng.randint(175, 235) for _ in range(3))
            if (far := sum(abs(a - b) for a, b in zip(color, avoid))) >= 150:
                return color
            best, gap = (color, far) if far > gap else (best, gap)
        return best

    big = SIZE * SCALE
    first = soft()
    if rng.random() < 0.6:
        return Image.new("RGB", (big, big), first)
    second, vertical = soft(), rng.random() < 0.5
    ramp = Image.linear_gradient("L").resize((big, big))
    if not vertical:
        ramp = ramp.transpose(Image.Transpose.ROTATE_90)
    return Image.composite(Image.new("RGB", (big, big), second), Image.new("RGB", (big, big), first), ramp)


def _shape_points(
    rng: random.Random, shape: str, easy: frozenset = frozenset()
) -> list[tuple[float, float]] | tuple[float, ...]:
    """The shape's outline on the supersampled canvas: a bounding box (circle) or polygon points (``easy``:
    ``FACTORS`` drawn as easy-VQA draws them, from the same draws)."""
    big = SIZE * SCALE
    radius = rng.uniform(0.05, 0.225) * big  # half the shape's width: ~10%-45% of the canvas wide
    if "size" in easy:  # the same draw moved onto easy-VQA's sizes: ~14%-53% of the canvas wide
        radius = 0.07 * big + (radius - 0.05 * big) * (0.195 / 0.175)
    margin = radius * 1.45  # room for rotation and the rectangle's aspect
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    if shape == "circle":
        return (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "rectangle":
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w, h = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
        corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
    else:
        corners = [
            (radius * math.cos(a), radius * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    angle = rng.uniform(0, 2 * math.pi) if rng.random() < 1 / 3 else 0.0
    angle = 0.0 if "rotation" in easy else angle
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]


def render(
    rng: random.Random,
    shape: str,
    color: str,
    shades: bool = False,
    region: bool = False,
    easy: frozenset = frozenset(),
    aux: random.Random | None = None,
) -> Image.Image:
    """One image: a ``color`` ``shape`` on a soft background (see the module docstring); ``shades``: in a
    held-out shade people call ``color`` instead of easy-VQA's CSS colour; ``region``: in a shade drawn
    inside ``color``'s region as ``data.augment.shades`` draws them; ``easy``: ``FACTORS`` drawn as easy-VQA
    draws them (an easy background from ``aux``, so ``rng``'s stream is the same with any factors)."""
    base = COLORS[color]
    fill = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in base)
    if shades:
        fill = base = rng.choice(held_out_shades(color))
    if region:
        from adaptkit.data.colour_names import Colour, draw_shade

        palette = tuple(sorted(COLORS.items()))
        fill = base = draw_shade(Colour(color, palette), rng.random, lambda: rng.gauss(0.0, 1.0))
    img = _background(rng, base)
    if "background" in easy:
        img = _easy_background(aux, base)
    draw = ImageDraw.Draw(img)
    outline = _shape_points(rng, shape, easy)
    if shape == "circle":
        draw.ellipse(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    side = 64 if "canvas" in easy else SIZE
    return img.resize((side, side), Image.Resampling.LANCZOS)


def render_textured(rng: random.Random, shape: str, color: str) -> tuple[Image.Image, bytes]:
    """One image of the ``textured`` style (module docstring); returns it and its JPEG bytes."""
    import numpy as np

    base = COLORS[color]
    fill = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in base)
    img = _background(rng, base)
    draw = ImageDraw.Draw(img)
    outline = _shape_points(rng, shape)
    edge = tuple(int(c * 0.6) for c in fill) if rng.random() < 0.5 else None
    width = rng.randint(1, 3) * SCALE if edge else 0
    if shape == "circle":
        draw.ellipse(outline, fill=fill, outline=edge, width=width)
    else:
        draw.polygon(outline, fill=fill, outline=edge, width=width)
    side = rng.choice((80, 128, 160))
    small = img.resize((side, side), Image.Resampling.LANCZOS)
    grain = np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(4, 12), (side, side, 3))
    small = Image.fromarray(np.clip(np.asarray(small, dtype=np.float64) + grain, 0, 255).astype(np.uint8))
    if rng.random() < 1 / 3:
        small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=rng.randint(35, 75))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), buffer.getvalue()


def questions(rng: random.Random, shape: str, color: str) -> list[tuple[str, str]]:
    """Ten (question, answer) pairs about an image of a ``color`` ``shape``."""
    other_color = rng.choice([c for c in COLORS if c != color])
    other_shape = rng.choice([s for s in SHAPES if s != shape])
    out = [
        (rng.choice(COLOR_QUESTIONS), color),
        (rng.choice(SHAPE_QUESTIONS), shape),
        (rng.choice(COLOR_OF_SHAPE).format(shape=shape), color),
        (rng.choice(SHAPE_OF_COLOR).format(color=color), shape),
    ]
    subjects = [
        (f"{color} shape", True),
        (f"{other_color} shape", False),
        (shape, True),
        (other_shape, False),
    ]
    for x, present in subjects + rng.sample(subjects, 2):
        negated = rng.random() < 0.5
        template = rng.choice(YES_NO_NEGATED if negated else YES_NO)
        out.append((template.format(x=x), "yes" if present != negated else "no"))
    return out


def generate(
    out: Path, images: int = 300, seed: int = 0, style: str = "default", like_easyvqa: tuple = ()
) -> Path:
    """Write ``images`` images (PNG; JPEG for ``style="textured"``) and ``questions.jsonl`` (adaptkit's VQA
    JSONL) under ``out``; returns the JSONL's path. Shapes and colours are balanced: image i is shape
    i % 3 and a colour of a shuffled cycle. ``like_easyvqa``: ``FACTORS`` drawn as easy-VQA draws them
    (not with ``textured``)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    easy = frozenset(like_easyvqa)
    if easy - set(FACTORS) or (easy and style == "textured"):
        raise ValueError(f"like_easyvqa takes {', '.join(FACTORS)} with a style other than textured")
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, captions = [], []
    colors = list(COLORS)
    for i in range(images):
        if i % len(colors) == 0:
            rng.shuffle(colors)
        shape, color = SHAPES[i % len(SHAPES)], colors[i % len(colors)]
        if style == "textured":
            name = f"images/{i:04d}.jpg"
            (out / name).write_bytes(render_textured(rng, shape, color)[1])
        else:
            name = f"images/{i:04d}.png"
            aux = random.Random(f"{seed}:{i}")  # the easy background's draws, off rng's stream
            kinds = {"shades": style == "shades", "region": style == "region"}
            render(rng, shape, color, **kinds, easy=easy, aux=aux).save(out / name)
        for question, answer in questions(rng, shape, color):
            lines.append({"image": name, "question": question, "answer": answer})
        phrased = [p.format(c=color, s=shape) for p in PHRASINGS]
        captions.append({"image": name, "captions": phrased, "label": f"{color} {shape}"})
    path = out / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    colour = [line for line in lines if line["answer"] in COLORS]
    (out / "colour.jsonl").write_text("".join(json.dumps(line) + "\n" for line in colour))
    (out / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in captions))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/ood_vqa"))
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=STYLES, default="default")
    parser.add_argument("--like-easyvqa", nargs="+", choices=FACTORS, default=[], help="(module docstring)")
    args = parser.parse_args()
    path = generate(args.out, args.images, args.seed, args.style, tuple(args.like_easyvqa))
    n = sum(1 for _ in path.open())
    print(f"wrote {args.images} images and {n} questions: {path}")


if __name__ == "__main__":
    main()
