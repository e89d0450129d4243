"""Image and label I/O with Pillow.

Every image is returned as RGB ``uint8 [H, W, 3]`` with its EXIF orientation applied, so
a photo taken in portrait is seen the way a person sees it. Grayscale, palette, CMYK and
RGBA images are converted (alpha is dropped); 16-bit and 32-bit grayscale are scaled to
8 bits, not clipped. An image larger than ``Image.MAX_IMAGE_PIXELS`` (Pillow's
decompression-bomb limit, about 89 megapixels) is refused before it is decoded. Labels are
single-channel ``uint8 [H, W]`` (class ids, 255 = ignore); palette PNGs are read by index,
not colour, and 1-bit PNGs as 0/1. Binary masks (``load_mask``) are 0/1, every nonzero pixel
foreground. Labels and masks are never read from JPEG, whose compression alters their values.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Other raster formats Pillow decodes: the dataset readers do not take them, and say so when they skip one.
OTHER_IMAGE_SUFFIXES = (
    ".tif", ".tiff", ".gif", ".jpe", ".jfif", ".jp2", ".j2k", ".jpx", ".mpo", ".apng", ".avif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".dib", ".pcx", ".psd", ".qoi", ".sgi",
)  # fmt: skip
IGNORE_LABEL = 255


class ImageReadError(ValueError):
    """A file could not be decoded as an image; the message says which file and why."""


def load_rgb(path: str | os.PathLike, at_least: int | None = None) -> np.ndarray:
    """Read an image as RGB ``uint8 [H, W, 3]``, EXIF orientation applied.

    ``at_least``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (the codec's own scaling,
    several times faster than decoding it whole) as long as its longer side stays at least
    ``at_least``; the caller resizes what it gets (:func:`is_reduced_decode` tells such a result
    from a wrong size). Other formats are decoded whole.
    """
    try:
        with Image.open(path) as im:
            _check_pixels(im)
            if at_least is not None and max(im.size) >= 2 * at_least:
                ratio = at_least / max(im.size)
                im.draft(None, (max(1, math.ceil(im.width * ratio)), max(1, math.ceil(im.height * ratio))))
            im = ImageOps.exif_transpose(im)
            if im.mode in _WIDE_GRAY:
                return np.repeat(_gray_to_uint8(im)[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's failure modes
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc


_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_DECODE_SCALES = (2, 4, 8)  # the reductions a JPEG decoder can apply


def is_reduced_decode(got_hw: tuple[int, int], full_hw: tuple[int, int]) -> bool:
    """Whether an image of size ``full_hw`` decoded at a reduced scale (``load_rgb(at_least=...)``)
    comes out at ``got_hw``."""
    h, w = full_hw
    return any(tuple(got_hw) == (-(-h // s), -(-w // s)) for s in _DECODE_SCALES)


def _check_pixels(im: Image.Image) -> None:
    """Refuse an image above Pillow's decompression-bomb limit (Pillow itself only warns below 2x)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise ImageReadError(f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the "
                             f"decompression-bomb limit of {limit} pixels")


def _gray_to_uint8(im: Image.Image) -> np.ndarray:
    """A 16/32-bit integer or float grayscale image scaled to ``uint8 [H, W]`` by its bit depth."""
    values = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(values.astype(np.float64))
        top = 1.0 if values.max(initial=0) <= 1.0 else 65535.0 if values.max(initial=0) > 255 else 255.0
    else:
        top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def exif_orientation(path: str | os.PathLike) -> int:
    """The image's EXIF orientation tag: 1 (as stored) when it has none; 2-8 rotate or mirror it
    for display, as :func:`load_rgb` does."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) after EXIF orientation, decoding the whole file to prove it is readable."""
    return load_rgb(path).shape[:2]


def load_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as ``uint8 [H, W]`` of class ids (palette indices for "P" images, 0/1 for 1-bit)."""
    try:
        with Image.open(path) as im:
            _check_pixels(im)
            _refuse_lossy(im, "label")
            # "1" (1-bit) is read as booleans, so 0/1: converting it to "L" would turn class 1 into 255
            if im.mode not in ("1", "P", "L", "I", "I;16"):
                im = im.convert("L")
            arr = np.asarray(im)
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: not a readable label image ({exc})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable label image ({exc})") from exc
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise ImageReadError(f"{path}: label values exceed 255")
        arr = arr.astype(np.uint8)
    return arr.copy()


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary mask file as ``uint8 [H, W]`` of 0/1, where every nonzero pixel is foreground.

    Any lossless format and mode: 1-bit; 8-, 16- or 32-bit grey; palette (by index, not colour);
    colour (nonzero in any channel). A pixel whose alpha is 0 is background, so a drawing on a
    transparent canvas reads as its strokes. JPEG is refused: its compression leaves faint
    nonzero values around the edges and across the background, which would all be foreground.
    """
    try:
        with Image.open(path) as im:
            _check_pixels(im)
            _refuse_lossy(im, "mask")
            if im.mode in ("1", "L", "P") + _WIDE_GRAY:
                mask = np.nan_to_num(np.asarray(im)) != 0
                if im.mode == "P" and "transparency" in im.info:
                    mask &= np.asarray(im.convert("RGBA"))[..., 3] > 0
            else:
                rgba = np.asarray(im.convert("RGBA"))
                mask = rgba[..., :3].any(axis=-1) & (rgba[..., 3] > 0)
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: not a usable mask ({exc})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable mask image ({exc})") from exc
    return mask.astype(np.uint8)


_LOSSY_FORMATS = ("JPEG", "MPO")  # MPO: the multi-picture JPEG some cameras write


def _refuse_lossy(im: Image.Image, what: str) -> None:
    if im.format in _LOSSY_FORMATS:
        raise ImageReadError(f"a {what} cannot be a JPEG: its compression changes pixel values around edges "
                             f"and in flat areas; save the {what} as PNG")


def label_palette() -> list[int]:
    """A 256-entry RGB palette (the VOC bit-interleaving scheme), 255 drawn white."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    palette[255 * 3 : 256 * 3] = [255, 255, 255]
    return palette


def save_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write ``uint8 [H, W]`` ids as a palette PNG, atomically (temp file + rename)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.min(initial=0) < 0 or label.max(initial=0) > 255:
            raise ValueError("label ids must lie in 0..255")
        label = label.astype(np.uint8)
    im = Image.fromarray(label, mode="P")
    im.putpalette(label_palette())
    _atomic_save(im, Path(path), format="PNG")


def save_rgb(path: str | os.PathLike, image: np.ndarray, quality: int = 92) -> None:
    """Write ``uint8 [H, W, 3]`` as JPEG or PNG (by suffix), atomically."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    _atomic_save(Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB"), path, format=fmt, **kwargs)


def _atomic_save(im: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    im.save(tmp, **kwargs)
    os.replace(tmp, path)
