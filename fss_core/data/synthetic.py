"""Synthetic segmentation data in the PASCAL VOC layout, for tests and the demo.

Each object class is a distribution over shape, colour and texture. Classes come in groups of
four that share one hue range, and each instance draws its own colour from that range, so a
pixel's colour says little about its class: telling classes apart needs the outline and the
surface pattern, as with real categories. One to three objects (at most two classes) lie on
smooth, randomly coloured backgrounds cluttered with lines and small polygons that belong to no
class. Labels carry VOC's ignore band (255, 2 px wide) along every object outline.

Every image is drawn by its own generator seeded with ``(seed, index)``: a seed gives
byte-identical files, and any subset of images can be drawn independently (in parallel).

Written layout::

    out_dir/JPEGImages/synth_000000.jpg          RGB, longer side = size
    out_dir/SegmentationClassAug/synth_000000.png  palette PNG: 0 bg, 1..classes, 255 ignore
    out_dir/lists/{train,val}.txt                PFENet format: "JPEGImages/x.jpg SegmentationClassAug/x.png"
    out_dir/classes.json                         id -> name and the class's distribution
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fss_core.data.images import IGNORE_LABEL, save_label, save_rgb

log = logging.getLogger(__name__)

SHAPES = ("ellipse", "polygon", "star", "ring", "cross", "crescent", "rounded_rect", "blob", "gear", "arrow")
TEXTURES = ("plain", "stripes", "checker", "dots", "rings", "gradient", "grid", "speckle")
CLASSES_PER_HUE = 4
MAX_CLASSES = 254  # 0 is background and 255 the ignore band

_CLASS_MODEL_SEED = 0x5EEDC1A5  # class k's distribution is the same in every dataset
_GOLDEN = 0.6180339887  # spreads the hue groups around the colour wheel for any class count
_PRIMARY_AREA = (0.14, 0.35)  # fraction of the image covered by the round-robin class's object
_OTHER_AREA = (0.05, 0.22)
_MIN_PRIMARY_VISIBLE = 0.08  # labelled pixels of the primary object after occlusion and band
_MIN_PIECE = 0.002  # labelled pixels of any visible piece of an object: no ignore-only slivers
_MAX_OCCLUDED = 0.3  # a later object may hide at most this fraction of an earlier one
_PLACEMENT_TRIES = 12
_LAYOUT_TRIES = 50
_HUE_NAMES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.54, "cyan"),
              (0.72, "blue"), (0.80, "violet"), (0.96, "magenta"), (1.01, "red"))


@dataclass(frozen=True)
class ClassSpec:
    """One object class: the distribution its instances are drawn from.

    Ranges are ``(low, high)`` pairs sampled uniformly per instance. Texture lengths are in
    pixels at a 128 px image and scale with the image size.
    """

    id: int
    name: str
    shape: str
    shape_params: dict
    hue: tuple[float, float]
    saturation: tuple[float, float]
    value: tuple[float, float]
    texture: str
    texture_params: dict

    def to_json(self) -> dict:
        """The class as JSON-ready data: name, shape, colour and texture parameters."""
        d = asdict(self)
        return {
            "name": d["name"],
            "shape": {"kind": d["shape"], **d["shape_params"]},
            "colour": {"hue": d["hue"], "saturation": d["saturation"], "value": d["value"]},
            "texture": {"kind": d["texture"], **d["texture_params"]},
        }


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote."""

    root: Path
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    class_names: dict[int, str]
    train_list: Path
    val_list: Path
    classes_json: Path

    @property
    def image_dir(self) -> Path:
        return self.root / "JPEGImages"

    @property
    def label_dir(self) -> Path:
        return self.root / "SegmentationClassAug"

    @property
    def n_images(self) -> int:
        return len(self.train_ids) + len(self.val_ids)


def synthesize(
    out_dir: str | os.PathLike,
    seed: int = 0,
    classes: int = 20,
    images: int = 400,
    size: int = 128,
    val_fraction: float = 0.25,
    objects: tuple[int, int] = (1, 3),
) -> SynthSummary:
    """Write a synthetic VOC-layout dataset of ``images`` images into ``out_dir``.

    Image ``i``'s main object is of class ``i % classes + 1`` (round-robin), and each class's
    images are split so that every class has images in both lists; ``val_fraction`` is met per
    class up to rounding. Existing files of the same ids are overwritten.

    Args:
        out_dir: dataset root (created).
        seed: non-negative; the same seed gives byte-identical files.
        classes: number of object classes, 1..254.
        images: number of images; at least two per class.
        size: longer image side in pixels (about half the images are slightly non-square).
        val_fraction: share of each class's images listed in ``val.txt``, in (0, 1).
        objects: (min, max) objects per image, 1 <= min <= max <= 6.
    """
    _validate(seed, classes, images, size, val_fraction, objects)
    start = time.perf_counter()
    root = Path(out_dir)
    for sub in ("JPEGImages", "SegmentationClassAug", "lists"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    specs = class_model(classes)
    is_val = split_assignment(images, classes, val_fraction)
    ids = [f"synth_{i:06d}" for i in range(images)]
    for i, image_id in enumerate(ids):
        rgb, label = render_image(i, seed, specs, size, objects)
        save_rgb(root / "JPEGImages" / f"{image_id}.jpg", rgb, quality=92)
        save_label(root / "SegmentationClassAug" / f"{image_id}.png", label)

    train_ids = tuple(x for x, v in zip(ids, is_val) if not v)
    val_ids = tuple(x for x, v in zip(ids, is_val) if v)
    lists = {}
    for split, split_ids in (("train", train_ids), ("val", val_ids)):
        lists[split] = root / "lists" / f"{split}.txt"
        lines = "".join(f"JPEGImages/{x}.jpg SegmentationClassAug/{x}.png\n" for x in split_ids)
        _write_text(lists[split], lines)
    classes_json = root / "classes.json"
    _write_text(classes_json, json.dumps({str(s.id): s.to_json() for s in specs}, indent=2) + "\n")
    log.info("synthesized %d images (%d train, %d val, %d classes, %d px) into %s in %.1f s",
             images, len(train_ids), len(val_ids), classes, size, root, time.perf_counter() - start)
    return SynthSummary(root, train_ids, val_ids, {s.id: s.name for s in specs},
                        lists["train"], lists["val"], classes_json)


def append_train_images(root: str | os.PathLike, count: int, classes: int, size: int, seed: int = 99,
                        first_index: int = 10_000) -> list[str]:
    """Draw ``count`` more images into the dataset at ``root`` and append them to ``lists/train.txt``:
    new unlabelled data arriving, which retraining picks up. Image ``i`` is drawn as index
    ``first_index + i`` with ``seed`` (one or two objects) and named ``new_{i:04d}``. Returns the ids."""
    root = Path(root)
    specs = class_model(classes)
    ids = [f"new_{i:04d}" for i in range(count)]
    for i, image_id in enumerate(ids):
        rgb, label = render_image(first_index + i, seed, specs, size, (1, 2))
        save_rgb(root / "JPEGImages" / f"{image_id}.jpg", rgb)
        save_label(root / "SegmentationClassAug" / f"{image_id}.png", label)
    with open(root / "lists" / "train.txt", "a") as fh:
        fh.writelines(f"JPEGImages/{x}.jpg SegmentationClassAug/{x}.png\n" for x in ids)
    return ids


def class_model(classes: int) -> list[ClassSpec]:
    """The distributions of classes ``1..classes``; class k is the same whatever the count."""
    return [_class_spec(k) for k in range(1, classes + 1)]


def split_assignment(images: int, classes: int, val_fraction: float) -> list[bool]:
    """``is_val[i]`` for each image: the last ``round(n_c * val_fraction)`` of each class's
    ``n_c`` round-robin images (at least one, never all) go to val."""
    is_val = [False] * images
    for c in range(classes):
        members = list(range(c, images, classes))
        n_val = min(len(members) - 1, max(1, int(len(members) * val_fraction + 0.5)))
        for i in members[len(members) - n_val:]:
            is_val[i] = True
    return is_val


def render_image(
    index: int, seed: int, specs: Sequence[ClassSpec], size: int, objects: tuple[int, int] = (1, 3)
) -> tuple[np.ndarray, np.ndarray]:
    """Draw image ``index`` of the dataset with ``seed``: RGB ``uint8 [H, W, 3]`` and its label
    ``uint8 [H, W]`` (0 background, class ids, 255 along object outlines); ``max(H, W) == size``."""
    rng = np.random.default_rng([seed, index])
    h, w = _image_shape(rng, size)
    image = _background(rng, h, w, size)
    primary = specs[index % len(specs)]
    object_classes = _object_classes(rng, specs, primary, objects)
    for _ in range(_LAYOUT_TRIES):
        placed = _layout(rng, object_classes, h, w, size)
        instances = _instance_map(placed, h, w)
        band = _outline_band(instances)
        if _legible(instances, band):
            break
    else:  # only reachable with a broken shape family; fail loudly rather than emit a bad image
        raise RuntimeError(f"image {index}: no layout keeps the objects legible")
    for obj in placed:
        _paint(rng, image, obj, size)
    image = _finish(rng, image)

    label = np.array([0] + [obj.spec.id for obj in placed], dtype=np.uint8)[instances]
    label[band] = IGNORE_LABEL
    return image, label


# --- the class model -------------------------------------------------------------------------


def _class_spec(k: int) -> ClassSpec:
    rng = np.random.default_rng([_CLASS_MODEL_SEED, k])
    shape = SHAPES[(k - 1) % len(SHAPES)]
    # Stepping textures by 3 (coprime with 8) gives the four classes of a hue group four textures.
    texture = TEXTURES[(3 * (k - 1)) % len(TEXTURES)]
    hue = ((k - 1) // CLASSES_PER_HUE * _GOLDEN) % 1.0
    sat_lo = round(float(rng.uniform(0.45, 0.6)), 3)
    val_lo = round(float(rng.uniform(0.55, 0.7)), 3)
    return ClassSpec(
        id=k,
        name=f"c{k:03d}_{_hue_name(hue)}_{texture}_{shape}",
        shape=shape,
        shape_params=_SHAPE_PARAMS[shape](rng),
        hue=(round(hue - 0.045, 3), round(hue + 0.045, 3)),
        saturation=(sat_lo, round(sat_lo + 0.3, 3)),
        value=(val_lo, round(min(1.0, val_lo + 0.3), 3)),
        texture=texture,
        texture_params=_TEXTURE_PARAMS[texture](rng),
    )


def _hue_name(hue: float) -> str:
    return next(name for upper, name in _HUE_NAMES if hue < upper)


def _span(rng: np.random.Generator, lo: float, hi: float, width: float) -> list[float]:
    """A class-level range ``[a, a + width]`` with ``a`` drawn from ``[lo, hi]``."""
    a = float(rng.uniform(lo, hi))
    return [round(a, 3), round(a + width, 3)]


_SHAPE_PARAMS: dict[str, Callable[[np.random.Generator], dict]] = {
    "ellipse": lambda r: {"aspect": _span(r, 0.45, 0.65, 0.15)},
    "polygon": lambda r: {"sides": int(r.integers(3, 7)), "aspect": [0.75, 1.0]},
    "star": lambda r: {"points": int(r.integers(4, 9)), "inner_ratio": _span(r, 0.35, 0.5, 0.1)},
    "ring": lambda r: {"inner_ratio": _span(r, 0.42, 0.55, 0.08), "aspect": [0.8, 1.0]},
    "cross": lambda r: {"arm_width": _span(r, 0.28, 0.38, 0.08)},
    "crescent": lambda r: {"cut_offset": _span(r, 0.4, 0.5, 0.1), "cut_radius": 0.85},
    "rounded_rect": lambda r: {"aspect": _span(r, 0.4, 0.6, 0.2), "corner": _span(r, 0.15, 0.3, 0.1)},
    "blob": lambda r: {"harmonics": int(r.integers(2, 5)), "amplitude": _span(r, 0.12, 0.2, 0.08)},
    "gear": lambda r: {"teeth": int(r.integers(7, 13)), "depth": _span(r, 0.16, 0.24, 0.06)},
    "arrow": lambda r: {"shaft_width": _span(r, 0.25, 0.33, 0.08), "head_length": _span(r, 0.4, 0.5, 0.1)},
}

_TEXTURE_PARAMS: dict[str, Callable[[np.random.Generator], dict]] = {
    "plain": lambda r: {},
    "stripes": lambda r: {"period": _span(r, 6.0, 9.0, 2.0), "angle": round(float(r.uniform(0, math.pi)), 3)},
    "checker": lambda r: {"period": _span(r, 7.0, 10.0, 2.0)},
    "dots": lambda r: {"period": _span(r, 7.0, 10.0, 2.0), "radius": _span(r, 0.22, 0.28, 0.06)},
    "rings": lambda r: {"period": _span(r, 6.0, 9.0, 2.0)},
    "gradient": lambda r: {"angle": round(float(r.uniform(0, 2 * math.pi)), 3), "strength": [0.6, 0.9]},
    "grid": lambda r: {"period": _span(r, 8.0, 11.0, 2.0), "line_width": 0.3},
    "speckle": lambda r: {"period": _span(r, 9.0, 12.0, 3.0)},
}


# --- shapes: unit polygons (extent ~[-1, 1]) as (vertices [N, 2], fill 1 = add / 0 = cut) -------


def _circle(n: int, rx: float = 1.0, ry: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), ry * np.sin(t)], axis=1)


def _polar(radius: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _u(rng: np.random.Generator, span: Sequence[float]) -> float:
    return float(rng.uniform(span[0], span[1]))


def _shape_ellipse(p: dict, rng: np.random.Generator) -> list:
    return [(_circle(64, 1.0, _u(rng, p["aspect"])), 1)]


def _shape_polygon(p: dict, rng: np.random.Generator) -> list:
    n = p["sides"]
    pts = _polar(np.ones(n), np.arange(n) * 2 * math.pi / n - math.pi / 2)
    return [(pts * [1.0, _u(rng, p["aspect"])], 1)]


def _shape_star(p: dict, rng: np.random.Generator) -> list:
    n = p["points"]
    radius = np.tile([1.0, _u(rng, p["inner_ratio"])], n)
    return [(_polar(radius, np.arange(2 * n) * math.pi / n), 1)]


def _shape_ring(p: dict, rng: np.random.Generator) -> list:
    aspect, inner = _u(rng, p["aspect"]), _u(rng, p["inner_ratio"])
    return [(_circle(64, 1.0, aspect), 1), (_circle(48, inner, inner * aspect), 0)]


def _shape_cross(p: dict, rng: np.random.Generator) -> list:
    a = _u(rng, p["arm_width"])
    quarter = np.array([[a, 1], [a, a], [1, a]])
    # The same corner turned four times by 90 degrees traces the whole plus sign.
    turns = [quarter @ np.array([[c, s], [-s, c]]) for c, s in ((1, 0), (0, -1), (-1, 0), (0, 1))]
    return [(np.concatenate(turns), 1)]


def _shape_crescent(p: dict, rng: np.random.Generator) -> list:
    r = p["cut_radius"]
    return [(_circle(64), 1), (_circle(64, r, r, cx=_u(rng, p["cut_offset"])), 0)]


def _shape_rounded_rect(p: dict, rng: np.random.Generator) -> list:
    aspect = _u(rng, p["aspect"])
    r = _u(rng, p["corner"]) * aspect
    arcs = []
    # Quarter circles at the four corners, counter-clockwise from the (+x, +y) one.
    for cx, cy, start in ((1 - r, aspect - r, 0.0), (r - 1, aspect - r, 0.5),
                          (r - 1, r - aspect, 1.0), (1 - r, r - aspect, 1.5)):
        t = np.linspace(start * math.pi, (start + 0.5) * math.pi, 8)
        arcs.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    return [(np.concatenate(arcs), 1)]


def _shape_blob(p: dict, rng: np.random.Generator) -> list:
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 2 + p["harmonics"]):
        radius += _u(rng, p["amplitude"]) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    return [(_polar(radius / radius.max(), t), 1)]


def _shape_gear(p: dict, rng: np.random.Generator) -> list:
    n, depth = p["teeth"], _u(rng, p["depth"])
    step = 2 * math.pi / n
    # Four corners per tooth: top start, top end, valley start, valley end.
    radius = np.tile([1.0, 1.0, 1.0 - depth, 1.0 - depth], n)
    angles = (np.arange(n)[:, None] * step + np.array([0.0, 0.45, 0.5, 0.95]) * step).ravel()
    return [(_polar(radius, angles), 1)]


def _shape_arrow(p: dict, rng: np.random.Generator) -> list:
    w, head = _u(rng, p["shaft_width"]) / 2, 1 - 2 * _u(rng, p["head_length"])
    pts = [[-1, -w], [head, -w], [head, -0.6], [1, 0], [head, 0.6], [head, w], [-1, w]]
    return [(np.array(pts, dtype=float), 1)]


_SHAPES: dict[str, Callable[[dict, np.random.Generator], list]] = {
    "ellipse": _shape_ellipse, "polygon": _shape_polygon, "star": _shape_star, "ring": _shape_ring,
    "cross": _shape_cross, "crescent": _shape_crescent, "rounded_rect": _shape_rounded_rect,
    "blob": _shape_blob, "gear": _shape_gear, "arrow": _shape_arrow,
}


# --- textures: t in [0, 1] per pixel, mixing the base colour (0) with its dark shade (1) -------


def _texture(spec: ClassSpec, u: np.ndarray, v: np.ndarray, extent: float, px: float,
             rng: np.random.Generator) -> np.ndarray:
    """Pattern value ``[N]`` at object-frame pixel offsets ``u, v`` (``[N]`` each).

    ``px`` converts the class's 128-px lengths to this image; ``extent`` is the object's scale.
    """
    p = spec.texture_params
    kind = spec.texture
    if kind == "plain":
        return np.zeros_like(u)
    if kind == "gradient":
        a = p["angle"] + rng.normal(0, 0.1)
        along = (u * math.cos(a) + v * math.sin(a)) / extent
        return _u(rng, p["strength"]) * np.clip(0.5 + 0.5 * along, 0, 1)
    period = max(3.0, _u(rng, p["period"]) * px)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    uu, vv = u + phase_u, v + phase_v
    if kind == "stripes":
        a = p["angle"] + rng.normal(0, 0.08)
        return (np.sin(2 * math.pi * (uu * math.cos(a) + vv * math.sin(a)) / period) > 0).astype(float)
    if kind == "checker":
        return ((np.floor(uu / period) + np.floor(vv / period)) % 2).astype(float)
    if kind == "dots":
        du, dv = uu % period - period / 2, vv % period - period / 2
        return (du**2 + dv**2 < (_u(rng, p["radius"]) * period) ** 2).astype(float)
    if kind == "rings":
        return (np.sin(2 * math.pi * np.hypot(u, v) / period) > 0).astype(float)
    if kind == "grid":
        line = p["line_width"] * period
        return ((uu % period < line) | (vv % period < line)).astype(float)
    if kind == "speckle":
        # A few random plane waves summed and thresholded: irregular, camouflage-like patches.
        field = np.zeros_like(u)
        for a in rng.uniform(0, 2 * math.pi, size=4):
            k = 2 * math.pi / (period * rng.uniform(0.8, 1.25))
            field += np.cos(k * (u * math.cos(a) + v * math.sin(a)) + rng.uniform(0, 2 * math.pi))
        return (field > 0).astype(float)
    raise ValueError(f"unknown texture {kind!r}")


# --- one image ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placed:
    spec: ClassSpec
    mask: np.ndarray  # bool [H, W], before occlusion by later objects
    centre: tuple[float, float]  # (x, y) pixels
    angle: float
    scale: float  # pixels per unit of the shape's polygon coordinates


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(H, W): square half the time, else one side shortened to 75–100 % of ``size``."""
    if rng.random() < 0.5:
        return size, size
    short = int(round(size * rng.uniform(0.75, 1.0)))
    return (short, size) if rng.random() < 0.5 else (size, short)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _random_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple:
    return tuple(int(c) for c in _hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val)))


def _smooth_noise(rng: np.random.Generator, cells: int, h: int, w: int, colours: Callable) -> np.ndarray:
    """float ``[H, W, 3]``: a ``cells``×``cells`` grid of colours, bilinearly enlarged."""
    grid = np.stack([[colours() for _ in range(cells)] for _ in range(cells)]).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _background(rng: np.random.Generator, h: int, w: int, size: int) -> np.ndarray:
    """float ``[H, W, 3]``: smooth random colours, fine mottling and distractor lines/polygons."""
    base = _smooth_noise(rng, int(rng.integers(2, 6)), h, w,
                         lambda: _hsv(rng.random(), rng.uniform(0.1, 0.75), rng.uniform(0.25, 0.9)))
    mottle = _smooth_noise(rng, max(4, size // 12), h, w, lambda: rng.uniform(0, 40, size=3))
    canvas = Image.fromarray(np.clip(base + mottle - 20, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    width = max(1, size // 64)
    for _ in range(int(rng.integers(2, 7))):
        ends = rng.uniform(-0.1, 1.1, size=4) * [w, h, w, h]
        draw.line([tuple(ends[:2]), tuple(ends[2:])], fill=_random_colour(rng, (0.2, 0.9), (0.2, 1.0)),
                  width=int(rng.integers(1, width + 2)))
    for _ in range(int(rng.integers(2, 6))):
        n = int(rng.integers(3, 7))
        radius = rng.uniform(0.03, 0.07) * size * rng.uniform(0.6, 1.0, size=n)
        centre = rng.uniform(0, 1, size=2) * [w, h]
        pts = _polar(radius, np.sort(rng.uniform(0, 2 * math.pi, size=n))) + centre
        draw.polygon([tuple(p) for p in pts], fill=_random_colour(rng, (0.2, 0.9), (0.2, 1.0)))
    return np.asarray(canvas, dtype=np.float32).copy()


def _object_classes(rng: np.random.Generator, specs: Sequence[ClassSpec], primary: ClassSpec,
                    objects: tuple[int, int]) -> list[ClassSpec]:
    """The primary class first, then objects of it or of one other class (half the time)."""
    n = int(rng.integers(objects[0], objects[1] + 1))
    if n == 1 or len(specs) == 1 or rng.random() < 0.5:
        return [primary] * n
    other = specs[(primary.id - 1 + int(rng.integers(1, len(specs)))) % len(specs)]
    return [primary, other] + [primary if rng.random() < 0.5 else other for _ in range(n - 2)]


def _rasterise(polygons: list, h: int, w: int, centre: tuple[float, float], angle: float,
               scale: float) -> np.ndarray:
    """bool ``[H, W]``: unit ``polygons`` rotated by ``angle``, scaled and moved to ``centre``."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]]) * scale
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for vertices, fill in polygons:
        pts = vertices @ rot + centre
        draw.polygon([tuple(p) for p in pts], fill=fill)
    return np.asarray(canvas, dtype=bool)


def _layout(rng: np.random.Generator, object_classes: list[ClassSpec], h: int, w: int,
            size: int) -> list[_Placed]:
    """Shapes, sizes and positions; a later object may hide at most 30 % of an earlier one."""
    placed: list[_Placed] = []
    visible: list[np.ndarray] = []
    for j, spec in enumerate(object_classes):
        for _ in range(_PLACEMENT_TRIES):
            polygons = _SHAPES[spec.shape](spec.shape_params, rng)
            unit_area = np.count_nonzero(_rasterise(polygons, 128, 128, (64.0, 64.0), 0.0, 60.0)) / 60.0**2
            target = rng.uniform(*(_PRIMARY_AREA if j == 0 else _OTHER_AREA)) * h * w
            scale = min(math.sqrt(target / unit_area), 0.55 * min(h, w))
            margin = 0.8 * scale
            centre = (rng.uniform(min(margin, w / 2), max(w - margin, w / 2)),
                      rng.uniform(min(margin, h / 2), max(h - margin, h / 2)))
            angle = float(rng.uniform(0, 2 * math.pi))
            mask = _rasterise(polygons, h, w, centre, angle, scale)
            if all(np.count_nonzero(vis & ~mask) >= (1 - _MAX_OCCLUDED) * np.count_nonzero(prev.mask)
                   for prev, vis in zip(placed, visible)):
                visible = [vis & ~mask for vis in visible] + [mask]
                placed.append(_Placed(spec, mask, centre, angle, scale))
                break
    return placed


def _instance_map(placed: list[_Placed], h: int, w: int) -> np.ndarray:
    """int ``[H, W]``: 0 background, j + 1 where object j is the topmost (later ones on top)."""
    instances = np.zeros((h, w), dtype=np.int64)
    for j, obj in enumerate(placed):
        instances[obj.mask] = j + 1
    return instances


def _legible(instances: np.ndarray, band: np.ndarray) -> bool:
    """The main object (instance 1) keeps 8 % of the image outside the band, and no object is
    left as a sliver: every connected piece keeps 0.2 % of the image outside the band."""
    area = instances.size
    if np.count_nonzero((instances == 1) & ~band) < _MIN_PRIMARY_VISIBLE * area:
        return False
    for j in range(1, int(instances.max()) + 1):
        pieces, n = ndimage.label(instances == j, structure=np.ones((3, 3)))
        inside = np.bincount(pieces[~band], minlength=n + 1)[1:]
        if inside.min(initial=area) < _MIN_PIECE * area:
            return False
    return True


def _outline_band(instances: np.ndarray) -> np.ndarray:
    """bool ``[H, W]``: both pixels of every 4-neighbour pair that crosses an object outline."""
    band = np.zeros(instances.shape, dtype=bool)
    for axis in (0, 1):
        step = np.diff(instances, axis=axis) != 0
        lead = [slice(None), slice(None)]
        trail = [slice(None), slice(None)]
        lead[axis], trail[axis] = slice(None, -1), slice(1, None)
        band[tuple(lead)] |= step
        band[tuple(trail)] |= step
    return band


def _paint(rng: np.random.Generator, image: np.ndarray, obj: _Placed, size: int) -> None:
    """Fill ``obj.mask`` of float ``image [H, W, 3]`` with an instance colour and texture."""
    spec = obj.spec
    hue, sat, val = _u(rng, spec.hue), _u(rng, spec.saturation), _u(rng, spec.value)
    base, shade = _hsv(hue, sat, val), _hsv(hue, sat * 0.7, val * 0.4)
    ys, xs = np.nonzero(obj.mask)
    dx, dy = xs - obj.centre[0], ys - obj.centre[1]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    u, v = dx * c + dy * s, -dx * s + dy * c  # pixel offsets in the object's own frame
    t = _texture(spec, u, v, obj.scale, size / 128.0, rng)[:, None]
    image[ys, xs] = base * (1 - t) + shade * t


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]``: a light [1, 2, 1] blur (soft edges) plus sensor-like noise."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    image = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    image = (image[:, :-2] + 2 * image[:, 1:-1] + image[:, 2:]) / 4
    image = image + rng.normal(0, 3.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- arguments and files -----------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(seed, classes, images, size, val_fraction, objects) -> None:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"synthesize: seed must be a non-negative integer, got {seed!r}")
    if not _is_int(classes) or not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"synthesize: classes must be an integer in 1..{MAX_CLASSES}, got {classes!r}")
    if not _is_int(images) or images < 2 * classes:
        raise ValueError(f"synthesize: images must be an integer >= 2 * classes = {2 * classes} "
                         f"(every class needs an image in train and in val), got {images!r}")
    if not _is_int(size) or not 32 <= size <= 4096:
        raise ValueError(f"synthesize: size must be an integer in 32..4096 pixels, got {size!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"synthesize: val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    if (not isinstance(objects, (tuple, list)) or len(objects) != 2 or not all(_is_int(n) for n in objects)
            or not 1 <= objects[0] <= objects[1] <= 6):
        raise ValueError(f"synthesize: objects must be (min, max) with 1 <= min <= max <= 6, got {objects!r}")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
