"""Episode augmentations and the deterministic evaluation transform.

A sample travels as three aligned arrays: the image ``float32 [H, W, 3]`` on the 0..255
scale, the label ``uint8 [H, W]`` (0 background, 1 foreground, 255 ignore) and the padding
mask ``bool [H, W]`` (True where the pixel was never image content). Geometric steps move all
three together: the image bilinearly, label and padding by nearest neighbour; pixels that
enter from outside the image get the mean colour, label 255 and padding True.

Training pipeline, in order: random isotropic scale, random rotation (p = 0.5), 5×5 Gaussian
blur (p = 0.5), horizontal flip (p = 0.5), random crop to ``size × size`` that tries to keep
the foreground, then tensors normalised with the ImageNet mean/std. Every random draw comes
from the ``numpy.random.Generator`` passed in, so a sample is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import correlate1d

from fss_core.data.images import IGNORE_LABEL
from fss_core.geometry import pad_geometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_RGB = tuple(255.0 * m for m in IMAGENET_MEAN)  # fill colour of rotation borders and crop padding
_MEAN_PLANES = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
_STD_PLANES = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]

ROTATE_P = 0.5
BLUR_P = 0.5
FLIP_P = 0.5
BLUR_KERNEL = 5
CROP_TRIES = 30
CROP_KEEP = 0.85  # a crop is accepted once it keeps this fraction of the foreground pixels

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # image [H, W, 3] float32, label [H, W] uint8, padding [H, W] bool


def _image_op(image: np.ndarray, op) -> np.ndarray:
    """Apply a PIL operation to each channel of ``float32 [H, W, 3]`` (mode "F", no rounding)."""
    out = None
    for ch in range(3):
        result = np.asarray(op(Image.fromarray(np.ascontiguousarray(image[..., ch])), ch))
        if out is None:
            out = np.empty((*result.shape, 3), dtype=np.float32)
        out[..., ch] = result
    return out


def _label_op(label: np.ndarray, padding: np.ndarray, op) -> tuple[np.ndarray, np.ndarray]:
    """Apply a PIL operation to the label (uint8) and the padding mask (as 0/1 uint8)."""
    new_label = np.asarray(op(Image.fromarray(label), IGNORE_LABEL))
    new_padding = np.asarray(op(Image.fromarray(padding.astype(np.uint8)), 1)).astype(bool)
    return new_label, new_padding


def rand_scale(image: np.ndarray, label: np.ndarray, padding: np.ndarray, rng: np.random.Generator,
               scale_range: tuple[float, float]) -> Arrays:
    """Resize by one factor ``s ~ U[scale_range]`` on both axes (image bilinear, labels nearest)."""
    s = rng.uniform(*scale_range)
    h, w = label.shape
    new_wh = (max(1, round(w * s)), max(1, round(h * s)))
    if new_wh == (w, h):
        return image, label, padding
    image = _image_op(image, lambda im, _: im.resize(new_wh, Image.BILINEAR))
    label, padding = _label_op(label, padding, lambda im, _: im.resize(new_wh, Image.NEAREST))
    return image, label, padding


def rand_rotate(image: np.ndarray, label: np.ndarray, padding: np.ndarray, rng: np.random.Generator,
                max_degrees: float) -> Arrays:
    """With p = 0.5 rotate about the centre by ``U[-max_degrees, max_degrees]``, keeping the size.

    Corners that come from outside the image get the mean colour, label 255 and padding True.
    """
    if rng.random() >= ROTATE_P:
        return image, label, padding
    angle = rng.uniform(-max_degrees, max_degrees)
    if angle == 0:
        return image, label, padding
    image = _image_op(image, lambda im, ch: im.rotate(angle, resample=Image.BILINEAR, fillcolor=MEAN_RGB[ch]))
    label, padding = _label_op(label, padding,
                               lambda im, fill: im.rotate(angle, resample=Image.NEAREST, fillcolor=fill))
    return image, label, padding


def _gaussian_kernel(size: int) -> np.ndarray:
    """1-D Gaussian of ``size`` taps with the sigma OpenCV derives for sigma = 0."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def rand_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With p = 0.5 blur ``[H, W, 3]`` with a 5×5 Gaussian (borders mirrored)."""
    if rng.random() >= BLUR_P:
        return image
    kernel = _gaussian_kernel(BLUR_KERNEL)
    return correlate1d(correlate1d(image, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")


def rand_hflip(image: np.ndarray, label: np.ndarray, padding: np.ndarray, rng: np.random.Generator) -> Arrays:
    """With p = 0.5 mirror all three arrays left-right."""
    if rng.random() >= FLIP_P:
        return image, label, padding
    return image[:, ::-1], label[:, ::-1], padding[:, ::-1]


def rand_crop(image: np.ndarray, label: np.ndarray, padding: np.ndarray, rng: np.random.Generator,
              size: int) -> Arrays:
    """Crop to ``size × size``, trying to keep the foreground (label 1).

    A side shorter than ``size`` is first padded, centred (image: mean colour, label 255,
    padding True). Up to 30 random crops are drawn; the first that keeps ≥ 85 % of the
    foreground pixels is taken, otherwise the one that kept the most.
    """
    h, w = label.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        inside = (slice(pad_h // 2, pad_h // 2 + h), slice(pad_w // 2, pad_w // 2 + w))
        h, w = h + pad_h, w + pad_w
        canvas = np.empty((h, w, 3), dtype=image.dtype)
        canvas[:] = MEAN_RGB
        canvas[inside] = image
        canvas_label = np.full((h, w), IGNORE_LABEL, dtype=label.dtype)
        canvas_label[inside] = label
        canvas_padding = np.ones((h, w), dtype=bool)
        canvas_padding[inside] = padding
        image, label, padding = canvas, canvas_label, canvas_padding
    foreground = label == 1
    total = int(foreground.sum())
    best, best_kept = (0, 0), -1
    for _ in range(CROP_TRIES):
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        kept = int(foreground[top:top + size, left:left + size].sum())
        if kept > best_kept:
            best, best_kept = (top, left), kept
        if kept >= CROP_KEEP * total:
            break
    top, left = best
    window = (slice(top, top + size), slice(left, left + size))
    return image[window], label[window], padding[window]


def to_tensors(image: np.ndarray, label: np.ndarray, padding: np.ndarray) -> tuple[torch.Tensor, ...]:
    """``(image [3, H, W] float32 ImageNet-normalised, label [H, W] int64, padding [H, W] bool)``."""
    planes = np.array(np.asarray(image, dtype=np.float32).transpose(2, 0, 1), dtype=np.float32, order="C")
    planes /= 255.0  # the same float32 operations, in place, channel by channel
    planes -= _MEAN_PLANES
    planes /= _STD_PLANES
    return (torch.from_numpy(planes),
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(padding, dtype=bool)))


class TrainTransform:
    """The training augmentation: scale, rotate, blur, flip, crop to ``size``, normalise."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.9, 1.1), rotate_degrees: float = 10.0):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.size = size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotate_degrees = float(rotate_degrees)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """``image uint8 [H, W, 3]``, ``label uint8 [H, W]`` → ``(image [3, S, S], label [S, S] int64,
        padding [S, S] bool)`` with ``S = size``."""
        arrays = (np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.uint8),
                  np.zeros(label.shape, dtype=bool))
        arrays = rand_scale(*arrays, rng, self.scale_range)
        arrays = rand_rotate(*arrays, rng, self.rotate_degrees)
        arrays = (rand_blur(arrays[0], rng), *arrays[1:])
        arrays = rand_hflip(*arrays, rng)
        return to_tensors(*rand_crop(*arrays, rng, self.size))


class EvalTransform:
    """Deterministic: longer side → ``size`` (both sides floored to ×8), pasted top-left on a
    ``size × size`` canvas; outside the image: black (0 before normalisation, as the evaluation
    protocol and the embedding extraction pad), label 255, padding True."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``image uint8 [H, W, 3]``, ``label uint8 [H, W]`` → ``(image [3, S, S], label [S, S] int64,
        padding [S, S] bool)`` with ``S = size``."""
        h, w = label.shape
        geo = pad_geometry(h, w, self.size)
        new_wh = (geo.new_w, geo.new_h)
        resized = _image_op(np.asarray(image, dtype=np.float32), lambda im, _: im.resize(new_wh, Image.BILINEAR))
        resized_label = np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize(new_wh, Image.NEAREST))
        canvas = np.zeros((self.size, self.size, 3), dtype=np.float32)
        canvas[:geo.new_h, :geo.new_w] = resized
        canvas_label = np.full((self.size, self.size), IGNORE_LABEL, dtype=np.uint8)
        canvas_label[:geo.new_h, :geo.new_w] = resized_label
        padding = np.ones((self.size, self.size), dtype=bool)
        padding[:geo.new_h, :geo.new_w] = False
        return to_tensors(canvas, canvas_label, padding)
