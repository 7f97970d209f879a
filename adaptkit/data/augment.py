"""Image augmentation that keeps the frozen-feature cache: a fixed number of augmented views per image.

A frozen backbone maps an image to the same features every time, which is what lets adaptkit encode each
image once. Augmenting at every step would end that. Instead each training image gets ``views`` fixed
augmented copies besides itself: view 0 is the image as it is, view ``v >= 1`` is the image after
:func:`augment_image` with random parameters drawn from a generator seeded by the image's content key,
the view index and the augmentation settings. A view is therefore a pure function of (image bytes,
settings, v): it is encoded once, cached on disk under its own key, and every run, process and resume
sees the same pixels. Each step picks one view per image from (seed, step, image row)
(:func:`view_choice`), so the choice is the same with any number of processes and after a resume.

The transforms are geometric (scale, rotation, translation, flips, filled with the image's own border
colour), a new background (pixels near the border colour replaced by a soft two-colour gradient, for
images on plain backgrounds), photometric without changing hue much (brightness, contrast, a small
per-channel gain, a linear illumination gradient) and of texture (Gaussian blur, pixel noise):
label-preserving for tasks whose answers name colours and shapes. ``shades`` moves an image's main colour
to a shade drawn inside the region people give the name its answers give it
(``adaptkit.data.colour_names.draw_shade``), so a model learns colour names rather than one palette.
Every one is a recipe key (``data.augment.*``); 0 turns one off.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from adaptkit.data.colour_names import Colour, draw_shade, in_region, lab

if TYPE_CHECKING:
    from adaptkit.config import AugmentConfig

AUGMENT_VERSION = "1"  # bump when augment_image changes what it draws: cached views get new keys
SHADES_VERSION = "region-blend-lit"  # how ``shades`` draws (in a view key while shades > 0): edges move too,
# and light changes keep the colour inside its name's region


def settings(cfg: AugmentConfig) -> dict:
    """The settings that decide a view's pixels (``views`` only says how many there are; ``shades`` is left
    out while 0, so views made before it existed keep their keys)."""
    out = asdict(cfg)
    out.pop("views")
    if not out["shades"]:
        out.pop("shades")
    else:
        out["shades_drawn"] = SHADES_VERSION
    out["version"] = AUGMENT_VERSION
    return out


def view_key(image_key: str, cfg: AugmentConfig, view: int, colour: str | Colour | None = None) -> str:
    """The feature-cache key of view ``view`` of the image whose content key is ``image_key`` (``colour``: the
    colour name its answers give it, which decides the view's pixels where ``cfg.shades`` > 0)."""
    if view == 0:
        return image_key
    extra = {"colour": colour} if cfg.shades and colour else {}
    text = json.dumps({"image": image_key, "view": view, **settings(cfg), **extra}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _generator(image_key: str, cfg: AugmentConfig, view: int, colour: str | Colour | None) -> torch.Generator:
    seed = int(view_key(image_key, cfg, view, colour)[:15], 16)
    return torch.Generator().manual_seed(seed)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def border_colour(img: Image.Image) -> tuple[int, ...]:
    """The per-channel median of the image's outermost pixels: the fill for what a transform uncovers."""
    pixels = TF.pil_to_tensor(img)
    edge = torch.cat([pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]], dim=1)
    return tuple(int(v) for v in edge.median(dim=1).values)


def augment_image(
    img: Image.Image, cfg: AugmentConfig, gen: torch.Generator, colour: str | Colour | None = None
) -> Image.Image:
    """One random, label-preserving variant of an RGB image (parameters drawn from ``gen`` in a fixed
    order, so a seeded generator gives the same pixels; ``colour``: the colour name the image's answers give
    it, for ``cfg.shades``)."""
    width, height = img.size
    angle = _uniform(gen, -cfg.rotate, cfg.rotate)
    scale = math.exp(_uniform(gen, math.log(cfg.scale_min), math.log(cfg.scale_max)))
    shift = (
        round(_uniform(gen, -cfg.translate, cfg.translate) * width),
        round(_uniform(gen, -cfg.translate, cfg.translate) * height),
    )
    flip_h = float(torch.rand((), generator=gen)) < (0.5 if cfg.flip else 0.0)
    flip_v = float(torch.rand((), generator=gen)) < (0.5 if cfg.flip else 0.0)
    brightness = _uniform(gen, 1 - cfg.brightness, 1 + cfg.brightness)
    contrast = _uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast)
    gains = torch.tensor([_uniform(gen, 1 - cfg.channel_gain, 1.0) for _ in range(3)])
    gradient_angle = _uniform(gen, 0.0, 2 * math.pi)
    gradient = _uniform(gen, 0.0, cfg.gradient)
    sigma = _uniform(gen, 0.0, cfg.blur) * min(width, height)
    noise_seed = int(torch.randint(0, 2**62, (), generator=gen))
    noise = _uniform(gen, 0.0, cfg.noise)
    recolour = float(torch.rand((), generator=gen)) < cfg.background
    backdrop = torch.rand(2, 3, generator=gen) * 0.3 + 0.68  # two soft colours (each channel 173-250)
    backdrop_angle = _uniform(gen, 0.0, 2 * math.pi)
    shade = _draw_shade(gen, cfg, colour) if cfg.shades else None

    fill = list(border_colour(img))
    # the shape's flat colour in the view, whose name its light must keep (a drawn shade is known already)
    target = shade or (_main_colour(TF.pil_to_tensor(img), fill) if colour else None)
    out = img if shade is None else recolour_shape(img, fill, shade)
    if flip_h:
        out = TF.horizontal_flip(out)
    if flip_v:
        out = TF.vertical_flip(out)
    if angle or scale != 1.0 or shift != (0, 0):
        out = TF.affine(
            out,
            angle=angle,
            translate=list(shift),
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
            fill=fill,
        )
    if recolour:  # after the geometry: what it uncovered has the border colour and is recoloured too
        out = _replace_background(out, fill, backdrop, backdrop_angle)
    pixels = TF.pil_to_tensor(out).float() / 255
    if sigma > 0.05:
        radius = max(1, math.ceil(2.5 * sigma))
        pixels = TF.gaussian_blur(pixels, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    light = (brightness, contrast, gains, gradient_angle, gradient)
    pixels = _lit_in_region(pixels, cfg, light, colour, None if target is None else _fill_mask(out, target))
    if noise:
        draw = torch.Generator().manual_seed(noise_seed)
        pixels = pixels + noise * torch.randn(pixels.shape, generator=draw)
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return TF.to_pil_image(pixels)


def _light(pixels: torch.Tensor, cfg: AugmentConfig, light: tuple, strength: float) -> torch.Tensor:
    """The view's light (brightness, contrast around the image's mean, per-channel gains, an illumination
    ramp), each change scaled by ``strength`` (1: as drawn; 0: none)."""
    brightness, contrast, gains, gradient_angle, gradient = (
        light
        if strength == 1.0
        else (*(1 + strength * (f - 1) for f in light[:3]), light[3], strength * light[4])
    )
    _, height, width = pixels.shape
    if cfg.brightness:
        pixels = pixels * brightness
    if cfg.contrast:
        mean = pixels.mean()
        pixels = (pixels - mean) * contrast + mean
    if cfg.channel_gain:
        pixels = pixels * gains[:, None, None]
    if cfg.gradient:
        ys = torch.linspace(-0.5, 0.5, height)[:, None]
        xs = torch.linspace(-0.5, 0.5, width)[None, :]
        ramp = math.cos(gradient_angle) * xs + math.sin(gradient_angle) * ys
        pixels = pixels * (1 + gradient * 2 * ramp)[None]
    return pixels


def _fill_mask(img: Image.Image, fill: tuple[int, int, int]) -> torch.Tensor | None:
    """The pixels of ``img`` in the shape's flat fill colour (None if under 4: too few to name a colour)."""
    pixels = TF.pil_to_tensor(img).float()
    mask = (pixels - torch.tensor(fill, dtype=torch.float32)[:, None, None]).abs().sum(0) <= 6
    return mask if int(mask.sum()) >= 4 else None


def _lit_in_region(
    pixels: torch.Tensor, cfg: AugmentConfig, light: tuple, colour: str | Colour | None, mask
) -> torch.Tensor:
    """The view's light (:func:`_light`), kept from moving the shape's colour out of its name's region: the
    fill's median colour under the light must still be named ``colour`` (with the data's own palette), else
    the light is halved, then dropped. Brightness, contrast and a ramp move colours too: a brighter, flatter
    CSS brown (easy-VQA's, a dark red) lands among the reds, a lighter black among the grays, and a view
    labelled with the old name would teach the model those shades' names wrong."""
    if mask is None:  # no colour name, or too little flat fill to read one
        return _light(pixels, cfg, light, 1.0)
    for strength in (1.0, 0.5):
        lit = _light(pixels, cfg, light, strength)
        median = (lit.clamp(0, 1)[:, mask] * 255).round().median(dim=1).values
        if in_region(lab(tuple(int(v) for v in median)), colour):
            return lit
    return _light(pixels, cfg, light, 0.0)


def _replace_background(
    img: Image.Image, border: list[int], colours: torch.Tensor, angle: float
) -> Image.Image:
    """Pixels near the border colour (the plain background) replaced by a gradient between two soft colours,
    blended by distance so anti-aliased edges stay smooth."""
    pixels = TF.pil_to_tensor(img).float() / 255
    _, height, width = pixels.shape
    distance = (pixels - torch.tensor(border, dtype=torch.float32)[:, None, None] / 255).abs().sum(0)
    weight = (1 - distance / 0.25).clamp(0, 1)  # 1 on the background, 0 from a summed difference of 0.25
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    t = (math.cos(angle) * xs + math.sin(angle) * ys) / (abs(math.cos(angle)) + abs(math.sin(angle)) + 1e-6)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    backdrop = colours[0][:, None, None] * (1 - t) + colours[1][:, None, None] * t
    mixed = pixels * (1 - weight) + backdrop * weight
    return TF.to_pil_image((mixed.clamp(0, 1) * 255).round().to(torch.uint8))


def _draw_shade(
    gen: torch.Generator, cfg: AugmentConfig, colour: str | Colour | None
) -> tuple[int, int, int] | None:
    """With probability ``cfg.shades``, a shade inside the region people give ``colour``
    (:func:`adaptkit.data.colour_names.draw_shade`, from the survey's training half); its own generator,
    seeded from ``gen``, so the draws after it do not depend on how many tries it took."""
    pick, seed = float(torch.rand((), generator=gen)), int(torch.randint(0, 2**62, (), generator=gen))
    if not colour or pick >= cfg.shades:
        return None
    own = torch.Generator().manual_seed(seed)
    return draw_shade(
        colour, lambda: float(torch.rand((), generator=own)), lambda: float(torch.randn((), generator=own))
    )


def main_colour(img: Image.Image, border: list[int]) -> tuple[int, int, int] | None:
    """The most common colour far from the border colour (a flat shape's fill), or None if there is none."""
    return _main_colour(TF.pil_to_tensor(img), border)


def _main_colour(pixels: torch.Tensor, border: list[int]) -> tuple[int, int, int] | None:
    flat = pixels.reshape(3, -1)
    far = (flat.float() - torch.tensor(border, dtype=torch.float32)[:, None]).abs().sum(0) > 64
    if not bool(far.any()):
        return None
    colours, counts = flat[:, far].unique(dim=1, return_counts=True)
    return tuple(int(c) for c in colours[:, counts.argmax()])


def recolour_shape(img: Image.Image, border: list[int], shade: tuple[int, int, int]) -> Image.Image:
    """The image with its main colour (:func:`main_colour`) moved to ``shade``. Each pixel is read as a blend
    of the border colour and the main colour (its share of the main colour, and how far it lies off that
    blend) and moves by its share, less the farther off the blend it lies: the shape's fill moves whole, an
    anti-aliased edge moves with it (an edge left in the old colour would name it: a ring of CSS lime
    around a pale green shape), the background and other colours stay. An image with no main colour is
    returned as it is."""
    pixels = TF.pil_to_tensor(img)
    found = _main_colour(pixels, border)
    if found is None:
        return img
    main, back = torch.tensor(found, dtype=torch.float32), torch.tensor(border, dtype=torch.float32)
    values, axis = pixels.float() - back[:, None, None], (main - back)[:, None, None]
    share = ((values * axis).sum(0) / (axis * axis).sum().clamp(min=1.0)).clamp(0, 1)
    off = (values - share[None] * axis).abs().sum(0)
    weight = share * (1 - off / 64).clamp(0, 1)
    moved = pixels.float() + weight[None] * (torch.tensor(shade, dtype=torch.float32) - main)[:, None, None]
    return TF.to_pil_image(moved.clamp(0, 255).round().to(torch.uint8))


def make_view(
    img: Image.Image, image_key: str, cfg: AugmentConfig, view: int, colour: str | Colour | None = None
) -> Image.Image:
    """View ``view`` of an image (0: the image itself; ``colour``: the colour name its answers give it)."""
    if view == 0:
        return img
    return augment_image(img, cfg, _generator(image_key, cfg, view, colour), colour)


def view_choice(seed: int, step: int, views: int, rows: torch.Tensor) -> torch.Tensor:
    """Which view (0..views) each image row shows at ``step``: a function of (seed, step, row) alone."""
    if views == 0:
        return torch.zeros_like(rows)
    rows = rows.to(torch.int64).cpu()
    # A counter-based hash (splitmix64's finaliser) of (seed, step, row): no generator state to carry.
    x = (rows + (step + 1) * 0x9E3779B1 + seed * 0x85EBCA77) & 0xFFFFFFFFFFFF
    x = (x ^ (x >> 17)) * 0xED5AD4BB & 0xFFFFFFFFFFFF
    x = (x ^ (x >> 11)) * 0xAC4C1B51 & 0xFFFFFFFFFFFF
    x = x ^ (x >> 15)
    return x % (views + 1)
