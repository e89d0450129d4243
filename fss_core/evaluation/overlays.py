"""Pictures of episodes for people: the query with its prediction and ground truth, and the supports.

Panels, left to right, all scaled to one height: the query with the prediction (red), the query
with the ground truth (green; ignored pixels grey), then each support with its mask (blue).
Masks are tinted and outlined; a caption sits above each panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_erosion

from fss_core.data.images import IGNORE_LABEL

PANEL_HEIGHT = 240
CAPTION_HEIGHT = 18
GAP = 6
TINT_ALPHA = 0.45
PRED_COLOUR = (230, 40, 40)
GT_COLOUR = (40, 200, 60)
SUPPORT_COLOUR = (40, 110, 240)
IGNORE_COLOUR = (160, 160, 160)


def _tinted(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``rgb uint8 [H, W, 3]`` with ``mask == 1`` tinted and outlined in ``colour`` and 255 greyed."""
    out = rgb.astype(np.float32)
    for value, tint in ((1, colour), (IGNORE_LABEL, IGNORE_COLOUR)):
        region = mask == value
        out[region] = (1 - TINT_ALPHA) * out[region] + TINT_ALPHA * np.asarray(tint, dtype=np.float32)
    foreground = mask == 1
    outline = foreground & ~binary_erosion(foreground, iterations=max(1, max(mask.shape) // 200))
    out[outline] = colour
    return out.astype(np.uint8)


def _panel(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], caption: str) -> Image.Image:
    """One captioned panel of height ``CAPTION_HEIGHT + PANEL_HEIGHT``."""
    image = Image.fromarray(_tinted(rgb, mask, colour))
    width = max(1, round(image.width * PANEL_HEIGHT / image.height))
    image = image.resize((width, PANEL_HEIGHT), Image.BILINEAR)
    panel = Image.new("RGB", (width, CAPTION_HEIGHT + PANEL_HEIGHT), "white")
    panel.paste(image, (0, CAPTION_HEIGHT))
    ImageDraw.Draw(panel).text((2, 3), caption, fill="black")
    return panel


def render_overlay(
    query_rgb: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray,
    supports: Sequence[tuple[np.ndarray, np.ndarray]],
) -> Image.Image:
    """Side-by-side picture of one episode.

    Args:
        query_rgb: ``uint8 [H, W, 3]``.
        pred: ``[H, W]`` prediction, 1 = foreground.
        gt: ``[H, W]`` ground truth, 1 = foreground, 255 = ignored.
        supports: ``(rgb uint8 [h, w, 3], mask [h, w])`` per shot, mask 1 = foreground, 255 = ignored.

    Returns:
        An RGB image of height ``CAPTION_HEIGHT + PANEL_HEIGHT``.
    """
    if pred.shape != query_rgb.shape[:2] or gt.shape != query_rgb.shape[:2]:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must match the query's size {query_rgb.shape[:2]}")
    panels = [_panel(query_rgb, pred, PRED_COLOUR, "prediction"), _panel(query_rgb, gt, GT_COLOUR, "ground truth")]
    for shot, (rgb, mask) in enumerate(supports, start=1):
        panels.append(_panel(rgb, mask, SUPPORT_COLOUR, f"support {shot}"))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + GAP * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + GAP
    return canvas
