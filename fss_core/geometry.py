"""The input geometry shared by extraction, training and evaluation.

An image of size (h, w) is resized so that its longer side is ``long_side``, both sides
floored to a multiple of ``multiple``, and pasted at the top-left of a square canvas of
side ``long_side``. Only the top-left ``valid`` region holds image content; the rest is
padding that must never reach a mask or a loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PadGeometry:
    """Where an (h, w) image lands on the square canvas."""

    orig_h: int
    orig_w: int
    new_h: int  # resized height, a multiple of `multiple`
    new_w: int
    canvas: int  # side of the square canvas

    def valid_cells(self, stride: int) -> tuple[int, int]:
        """Feature cells (rows, cols) at ``stride`` that overlap image content."""
        return math.ceil(self.new_h / stride), math.ceil(self.new_w / stride)


def pad_geometry(h: int, w: int, long_side: int, multiple: int = 8) -> PadGeometry:
    """Geometry of the reference preprocessing: longer side → ``long_side``, floor to ×multiple."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = long_side / max(h, w)
    new_h = max(multiple, int(h * scale + 0.5) // multiple * multiple)
    new_w = max(multiple, int(w * scale + 0.5) // multiple * multiple)
    return PadGeometry(h, w, min(new_h, long_side), min(new_w, long_side), long_side)


def small_image_scale(h: int, w: int, reference: int | None, max_side: int | None = None) -> float:
    """The factor an area threshold, set in pixels of full-size images, takes for an ``h × w`` image.

    1 when the image's longer side reaches ``reference`` (PASCAL's and COCO's images: the
    published thresholds apply unchanged) or when ``reference`` is None; for a smaller image,
    ``(longer side / reference)²``, so that a region counts from the same share of a
    ``reference``-sided canvas as on a full-size image. An image whose longer side exceeds
    ``max_side`` is treated as its copy shrunk to ``max_side`` (:func:`working_size`): the
    factor is ``(longer side / max_side)²``, the threshold in that copy's pixels.
    """
    longer = max(h, w)
    if max_side is not None and longer > max_side:
        return (longer / max_side) ** 2 * small_image_scale(*working_size(h, w, max_side), reference)
    if reference is None or longer >= reference:
        return 1.0
    return (longer / reference) ** 2


def scaled_min_area(min_area: int, reference: int | None, h: int, w: int, max_side: int | None = None) -> int:
    """An area threshold of ``min_area`` pixels (on full-size images) for an ``h × w`` image,
    scaled by :func:`small_image_scale`; at least 1."""
    return max(1, round(min_area * small_image_scale(h, w, reference, max_side)))


def working_size(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    """``(h, w)`` shrunk so that the longer side is ``max_side`` (sides rounded, at least 1); the
    size itself when it is not larger, or when ``max_side`` is None."""
    longer = max(h, w)
    if max_side is None or longer <= max_side:
        return h, w
    scale = max_side / longer
    return max(1, round(h * scale)), max(1, round(w * scale))
