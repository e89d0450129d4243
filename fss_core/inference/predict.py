"""Few-shot segmentation of your own images: a few annotated supports in, one mask per query out.

Inputs:

- images: a file path (any format Pillow reads; EXIF orientation applied) or an array
  ``uint8 [H, W, 3]`` RGB (``[H, W]`` grey and ``[H, W, 4]`` RGBA are accepted too);
- support masks: a file path or an array ``[H, W]`` of the support image's size, where every
  nonzero pixel is foreground — so {0, 1}, {0, 255}, 16-bit, a palette or an RGB drawing all
  work, and fully transparent pixels are background. There is no ignore value. Mask files must
  be lossless (PNG, BMP, TIFF, ...): a JPEG mask is refused, as its compression noise would be
  read as foreground.

Each query gets a ``uint8 [H, W]`` mask at its original size, 0 = background, 1 = foreground.
``save_masks`` writes them as palette PNGs with values 0/1 (the format of the dataset labels
and of the evaluation predictions; index 1 shows dark red).

All shots of a query go through the model in one forward pass, and queries are batched. The same
inputs, ``batch_size`` and ``seed`` give the same masks (the seed feeds the model's random
prototype clustering, one generator per batch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fss_core.data.images import ImageReadError, load_mask, load_rgb, save_label
from fss_core.evaluation.protocol import (
    DEFAULT_IMAGE_SIZE,
    EpisodeInput,
    ModelPredictor,
    Predictor,
    episode_generator,
    logits_to_mask,
    to_canvas,
)

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike | np.ndarray
DEFAULT_BATCH_SIZE = 4


class PredictInputError(ValueError):
    """An input to ``predict`` or ``save_masks`` is unusable; the message names it and says why."""


def _describe(source: ImageSource) -> str:
    return "array" if isinstance(source, np.ndarray) else str(source)


def _load_image(source: ImageSource, what: str) -> np.ndarray:
    """An image path or array → RGB ``uint8 [H, W, 3]``."""
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise PredictInputError(f"{what}: file not found: {source}")
        try:
            return load_rgb(source)
        except ImageReadError as exc:
            raise PredictInputError(f"{what}: {exc}") from exc
    if not isinstance(source, np.ndarray):
        raise PredictInputError(f"{what}: expected a file path or a numpy array, got {type(source).__name__}")
    if source.dtype != np.uint8:
        raise PredictInputError(f"{what}: image arrays must be uint8 (0..255), got {source.dtype}")
    if source.ndim == 2:
        return np.repeat(source[..., None], 3, axis=-1)
    if source.ndim == 3 and source.shape[-1] in (3, 4):
        return np.ascontiguousarray(source[..., :3])
    raise PredictInputError(f"{what}: image arrays must be [H, W], [H, W, 3] or [H, W, 4], got {source.shape}")


def _load_mask(source: ImageSource, what: str) -> np.ndarray:
    """A mask path or array → ``uint8 [H, W]``, 1 wherever the input is nonzero."""
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise PredictInputError(f"{what}: mask file not found: {source}")
        try:
            mask = load_mask(source)
        except ImageReadError as exc:
            raise PredictInputError(f"{what}: {exc}") from exc
    elif isinstance(source, np.ndarray):
        mask = source
    else:
        raise PredictInputError(f"{what}: expected a mask file path or a numpy array, got {type(source).__name__}")
    if mask.ndim != 2:
        raise PredictInputError(f"{what}: a mask must be 2-D [H, W], got shape {mask.shape} ({_describe(source)})")
    return (mask != 0).astype(np.uint8)


def _load_supports(supports: Sequence[tuple[ImageSource, ImageSource]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read and check every (image, mask) pair: same size, at least one foreground pixel."""
    if not supports:
        raise PredictInputError("no support given: pass at least one (image, mask) pair")
    loaded = []
    for shot, pair in enumerate(supports, start=1):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise PredictInputError(f"support {shot}: expected an (image, mask) pair, got {type(pair).__name__}")
        image_source, mask_source = pair
        rgb = _load_image(image_source, f"support {shot} image")
        mask = _load_mask(mask_source, f"support {shot} mask")
        if mask.shape != rgb.shape[:2]:
            raise PredictInputError(
                f"support {shot}: mask {_describe(mask_source)} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{_describe(image_source)} is {rgb.shape[1]}x{rgb.shape[0]} (width x height); they must match"
            )
        if not mask.any():
            raise PredictInputError(f"support {shot}: mask {_describe(mask_source)} has no foreground pixel")
        loaded.append((rgb, mask))
    return loaded


def predict(
    model_or_predictor: torch.nn.Module | Predictor,
    supports: Sequence[tuple[ImageSource, ImageSource]],
    queries: Sequence[ImageSource],
    image_size: int = DEFAULT_IMAGE_SIZE,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[np.ndarray]:
    """Segment, in every query, what the support masks mark.

    Args:
        model_or_predictor: an FSS network (run through ``ModelPredictor`` on ``device``) or any
            ``Predictor`` (``EpisodeInput`` → logits ``[B, 2, L, L]``).
        supports: ``(image, mask)`` per shot; the mask at its image's size, nonzero = foreground.
        queries: images to segment.
        image_size: side ``L`` of the square canvas the images are fitted into.
        device: where a network runs (ignored for a ready ``Predictor``).
        seed: seeds the predictor's random draws; every query starts from the same draws, so its
            mask does not depend on which other queries are segmented with it.
        batch_size: queries per forward pass.

    Returns:
        One ``uint8 [H, W]`` mask per query at the query's size, 0 = background, 1 = foreground.

    Raises:
        PredictInputError: no support, a missing or unreadable file, a mask whose size differs
            from its image's, or an empty mask.
    """
    if batch_size < 1:
        raise PredictInputError(f"batch_size must be >= 1, got {batch_size}")
    predictor = ModelPredictor(model_or_predictor, device) if isinstance(model_or_predictor, torch.nn.Module) \
        else model_or_predictor
    support_canvases = [to_canvas(rgb, mask, image_size) for rgb, mask in _load_supports(supports)]
    support_imgs = torch.stack([c.image for c in support_canvases])  # [S, 3, L, L]
    support_masks = torch.stack([c.mask for c in support_canvases])
    support_padding = torch.stack([c.padding for c in support_canvases])
    masks = []
    for start in range(0, len(queries), batch_size):
        batch = [
            _load_image(source, f"query {start + offset + 1}")
            for offset, source in enumerate(queries[start : start + batch_size])
        ]
        canvases = [to_canvas(rgb, np.zeros(rgb.shape[:2], dtype=np.uint8), image_size) for rgb in batch]
        n = len(canvases)
        episode = EpisodeInput(
            query_img=torch.stack([c.image for c in canvases]),
            support_imgs=support_imgs.expand(n, *support_imgs.shape),
            support_masks=support_masks.expand(n, *support_masks.shape),
            query_padding=torch.stack([c.padding for c in canvases]),
            support_padding=support_padding.expand(n, *support_padding.shape),
            # every query starts from the same draws: the supports' prototypes are the same for
            # each, and a query's mask does not depend on the other queries in its batch
            generator=[episode_generator(seed, 0) for _ in range(n)],
        )
        logits = predictor(episode)
        if tuple(logits.shape) != (n, 2, image_size, image_size):
            raise ValueError(f"predictor returned logits of shape {tuple(logits.shape)}, "
                             f"expected {(n, 2, image_size, image_size)}")
        masks.extend(logits_to_mask(logits[i], c.geometry) for i, c in enumerate(canvases))
    log.info("segmented %d queries with %d supports", len(masks), len(support_canvases))
    return masks


def save_masks(masks: Sequence[np.ndarray], names: Sequence[str], out_dir: str | os.PathLike) -> list[Path]:
    """Write each mask as ``out_dir/{name}.png`` (palette PNG, 0 = background, 1 = foreground).

    Returns the written paths, in order.
    """
    if len(masks) != len(names):
        raise PredictInputError(f"{len(masks)} masks but {len(names)} names")
    if len(set(names)) != len(names):
        raise PredictInputError("mask names must be unique")
    paths = []
    for mask, name in zip(masks, names):
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise PredictInputError(f"mask name {name!r} must be a plain, non-hidden file name without folders")
        mask = np.asarray(mask)
        if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
            raise PredictInputError(f"mask {name!r} must be 2-D with values 0 and 1")
        path = Path(out_dir) / f"{name}.png"
        save_label(path, mask.astype(np.uint8))
        paths.append(path)
    return paths
