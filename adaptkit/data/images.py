"""Decoding images, the one way training, evaluation, ``predict``, the Python API and the demo read them.

Every image becomes RGB (:func:`to_rgb`: transparency over white, 16-bit grayscale scaled, CMYK and
palettes converted) after a full decode, so a truncated file fails here and not inside a batch. What cannot
be used (not an image, truncated, tiny, a decompression bomb) raises :class:`UnusableImage` with the reason,
which callers turn into a ``DataError`` naming the file (and the sample's ``file:line`` when known).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adaptkit.data.feature_cache import file_key
from adaptkit.data.records import DataError, not_a_regular_file

#: what the Python API and ``predict`` accept as an image.
ImageInput = str | Path | bytes | Image.Image | np.ndarray

MIN_IMAGE_SIDE = 8  # smaller images (1x1 placeholders, tracking pixels) carry nothing to answer from


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: transparency is composited over white, CMYK / grayscale / palette converted."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, not clip
        wide = img.convert("I")
        hi = wide.getextrema()[1]
        scale = 1.0 if hi <= 255 else (1 / 256 if hi <= 65535 else 255.0 / hi)
        return wide.point(lambda v: v * scale).convert("L").convert("RGB")
    return img.convert("RGB")


class UnusableImage(ValueError):
    """Why an image source cannot be used (``reason`` reads after the file's name: "is empty ...")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(source) -> Image.Image:
    """Fully decode a path or binary file object as RGB (see :func:`to_rgb` for the conversions).

    Raises:
        UnusableImage: not an image, truncated, smaller than ``MIN_IMAGE_SIDE`` pixels a side, or a
            decompression bomb (more than ``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if min(img.size) < MIN_IMAGE_SIDE:
                    width, height = img.size
                    raise UnusableImage(
                        f"is too small ({width}x{height} pixels; at least {MIN_IMAGE_SIDE} a side)"
                    )
                img.load()
                return to_rgb(img)
    except UnusableImage:
        raise
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnusableImage(f"is a decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise UnusableImage("is not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UnusableImage(f"cannot be decoded, truncated or corrupt ({err})") from None


def open_image(path: str, origin: str = "") -> Image.Image:
    """Open and fully decode an image file as RGB (:func:`decode_image`).

    Raises:
        DataError: missing, empty, or unusable (:class:`UnusableImage`); the message names the sample's
            origin, the file and the reason.
    """
    try:
        problem = not_a_regular_file(path)
        if problem:
            raise UnusableImage(problem)
        if os.path.getsize(path) == 0:
            raise UnusableImage("is empty (0 bytes)")
        return decode_image(path)
    except FileNotFoundError:
        raise image_error(path, origin, "does not exist") from None
    except UnusableImage as err:
        raise image_error(path, origin, err.reason) from None


def image_error(path: str, origin: str, reason: str) -> DataError:
    """The error for an unusable image, naming the sample's origin (``file:line``) when known."""
    where = f"{origin}: " if origin else ""
    return DataError(f"{where}image {path} {reason}")


def _check_pixels(size: tuple[int, int], name: str) -> None:
    """Images already in memory get the limit files get from :func:`decode_image` (PIL's
    ``MAX_IMAGE_PIXELS``, the decompression-bomb guard training applies)."""
    width, height = (int(v) for v in size)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise DataError(
            f"{name}: {width}x{height} pixels is more than the {limit:,} an image may have (the "
            "decompression-bomb guard training applies); resize it first"
        )


def to_image(image: ImageInput, name: str = "image") -> Image.Image:
    """Decode any supported image input to RGB, exactly as training images are (:func:`decode_image`).

    Raises:
        DataError: the input is not an image PIL can decode (message names ``name`` or the file).
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.size, name)
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        _check_pixels(image.shape[1::-1] if image.ndim >= 2 else (image.size, 1), name)
        try:
            return to_rgb(Image.fromarray(image))
        except (TypeError, ValueError) as err:
            raise DataError(f"{name}: array of shape {image.shape} is not an image ({err})") from None
    if isinstance(image, bytes | bytearray):
        try:
            if not image:
                raise UnusableImage("is empty (0 bytes)")
            return decode_image(io.BytesIO(image))
        except UnusableImage as err:
            raise DataError(
                f"{name}: the bytes are not an image PIL can decode (the data {err.reason})"
            ) from None
    if isinstance(image, str | Path):
        return open_image(str(image))
    raise DataError(f"{name}: expected a path, bytes, PIL image or array, got {type(image).__name__}")


def content_keys(
    paths: Sequence[str], origins: dict[str, str], skip_bad: bool, bad: dict[str, str]
) -> dict[str, str]:
    """Content keys of the readable images (unreadable ones raise, or are recorded in ``bad``)."""
    keys: dict[str, str] = {}
    for path in paths:
        try:
            keys[path] = file_key(path)
        except OSError as err:
            reason = "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
            error = image_error(path, origins.get(path, ""), reason)
            if not skip_bad:
                raise error from None
            bad[path] = str(error)
    return keys
