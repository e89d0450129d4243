"""Stage B: pseudo masks — the nearest centroid of every pixel, snapped to superpixels.

For one image, the nearest-centroid scores of its **valid** feature cells only (the padding
cells of the square canvas never reach the mask) are interpolated bilinearly to every pixel
of the original image, each pixel takes the best cluster, and every Felzenszwalb superpixel
of the original image then takes its most frequent cluster — the last superpixel included.

Geometry: the image occupies ``[0, new_h) × [0, new_w)`` of the canvas (``pad_geometry``) and
cell ``(i, j)`` is centred at ``((i + ½)·stride, (j + ½)·stride)``. Original pixel ``y`` sits at
canvas row ``(y + ½)·new_h/H``, i.e. at cell coordinate ``(y + ½)·new_h/(H·stride) − ½``,
where the scores are interpolated (clamped to the outermost valid cells). This is one exact
bilinear map from cells to pixels, instead of resizing the scores twice.

Output: one palette PNG per image, ``{image_id}.png``, at the original size, pixel = cluster
id; the folder's ``meta.json`` (:class:`PseudoMasksMeta`) is written once every mask exists,
and its ``quality.json`` (the quality report, written by the pipeline) belongs to that build only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb
from tqdm import tqdm

from fss_core.clustering.kmeans import nearest_centroid_scores
from fss_core.data.images import is_reduced_decode, load_rgb, save_label
from fss_core.geometry import pad_geometry, scaled_min_area, working_size
from storage_schemas import (
    EMBEDDINGS,
    FelzenszwalbParams,
    PseudoMasksMeta,
    StoreValidationError,
    StoreVersionError,
    open_store,
    read_attrs,
    read_json_meta,
    write_json_meta,
)

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 8  # the extraction geometry floors both resized sides to a multiple of 8
META_NAME = "meta.json"
QUALITY_NAME = "quality.json"  # the quality report of the masks; removed when another build starts
PENDING_NAME = ".pending_build_key"  # the build key of the masks being written; gone once meta.json is
REFERENCE_FELZENSZWALB = FelzenszwalbParams(scale=100, sigma=0.8, min_size=200)
_STRIPE_VALUES = 1 << 24  # scores held at once while interpolating: K × rows × W ≤ 16 M floats


def cluster_map(features: np.ndarray, valid_hw: tuple[int, int], image_hw: tuple[int, int], stride: int,
                long_side: int, centroids: np.ndarray, out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Nearest centroid of every original pixel, before the superpixel vote: ``int64 [H, W]``.

    ``features [C, G, G]`` is one image's row of the embeddings store; only the valid cells
    ``[:, :r, :c]`` are read. See the module doc for the cell-to-pixel map. ``out_hw``: the map
    for the same image at another size (a shrunk copy), the cells' geometry still that of
    ``image_hw`` at extraction.
    """
    r, c = (int(v) for v in valid_hw)
    if features.ndim != 3 or not (1 <= r <= features.shape[1] and 1 <= c <= features.shape[2]):
        raise ValueError(f"features must be [C, G, G] holding the {r}x{c} valid cells, got shape {features.shape}")
    geometry = pad_geometry(*(int(v) for v in image_hw), long_side, SIZE_MULTIPLE)
    h, w = (int(v) for v in (out_hw or image_hw))
    scores = nearest_centroid_scores(np.asarray(features[:, :r, :c], dtype=np.float32), centroids)  # [K, r, c]
    y0, y1, wy = _interpolation(h, r, geometry.new_h / (h * stride))
    x0, x1, wx = _interpolation(w, c, geometry.new_w / (w * stride))
    by_col = scores[:, :, x0] * (1 - wx) + scores[:, :, x1] * wx  # [K, r, W]
    labels = np.empty((h, w), dtype=np.int64)
    stripe = max(1, _STRIPE_VALUES // (len(scores) * w))
    for top in range(0, h, stripe):
        rows = slice(top, top + stripe)
        up = by_col[:, y0[rows], :] * (1 - wy[rows, None]) + by_col[:, y1[rows], :] * wy[rows, None]
        labels[rows] = up.argmax(axis=0)
    return labels


def _interpolation(pixels: int, cells: int, cells_per_pixel: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel centre: the two neighbouring cells and the weight of the second (edges clamped)."""
    u = np.clip((np.arange(pixels) + 0.5) * cells_per_pixel - 0.5, 0, cells - 1)
    first = np.floor(u).astype(np.int64)
    second = np.minimum(first + 1, cells - 1)
    return first, second, (u - first).astype(np.float32)


def superpixel_vote(labels: np.ndarray, segments: np.ndarray, num_clusters: int) -> np.ndarray:
    """Every segment of ``segments [H, W]`` (ids ≥ 0) takes its most frequent label of ``labels [H, W]``.

    Ties go to the smaller cluster id. Every segment id is voted, the largest included.
    """
    segments = np.asarray(segments, dtype=np.int64)
    counts = np.bincount((segments * num_clusters + labels).ravel(),
                         minlength=(int(segments.max()) + 1) * num_clusters)
    winners = counts.reshape(-1, num_clusters).argmax(axis=1)
    return winners[segments]


def min_size_for(params: FelzenszwalbParams, area_reference: int | None, h: int, w: int) -> int:
    """Felzenszwalb ``min_size`` for an ``h × w`` image.

    ``params.min_size`` is in pixels of the original image, as the reference sets it; an image
    whose longer side is below ``area_reference`` has it scaled by :func:`small_image_scale`, so
    a small image is cut into about as many superpixels as a large one (the same rule as the
    pseudo-class ``min_area``). ``area_reference=None`` never scales.
    """
    return scaled_min_area(params.min_size, area_reference, h, w)


def pseudo_mask(features: np.ndarray, valid_hw: tuple[int, int], image_hw: tuple[int, int], stride: int,
                long_side: int, centroids: np.ndarray, rgb: np.ndarray,
                params: FelzenszwalbParams = REFERENCE_FELZENSZWALB, area_reference: int | None = None,
                max_side: int | None = None) -> np.ndarray:
    """One image's pseudo mask ``uint8 [H, W]`` of cluster ids ``0 … K−1``.

    ``features [C, G, G]`` (float16/32, the store's row), ``valid_hw`` its valid cells,
    ``image_hw`` the original size, ``stride``/``long_side`` the extraction geometry,
    ``centroids [K, C]``, ``rgb uint8 [H, W, 3]`` the original image (for the superpixels), or
    its copy already shrunk to ``max_side``.
    ``params`` defaults to the reference's Felzenszwalb settings; ``area_reference`` scales
    their ``min_size`` for small images (:func:`min_size_for`; None = unscaled, as the reference).
    ``max_side``: an image with a longer side is shrunk to it (:func:`working_size`), its mask
    made there (``min_size`` in the shrunk image's pixels) and enlarged to ``H × W`` by nearest
    neighbour. Felzenszwalb on a 12-megapixel photo takes over a minute and 4 GB; on its 640 px
    copy, a fraction of a second. None: always at the original size, as the reference.
    """
    h, w = (int(v) for v in image_hw)
    num_clusters = len(centroids)
    if not 1 <= num_clusters <= 255:
        raise ValueError(f"pseudo masks hold cluster ids 0..254 in uint8; got {num_clusters} centroids")
    work_h, work_w = working_size(h, w, max_side)
    if rgb.shape not in ((h, w, 3), (work_h, work_w, 3)):
        raise ValueError(f"image is {rgb.shape}, expected ({h}, {w}, 3) as recorded at extraction")
    if rgb.shape[:2] != (work_h, work_w):
        rgb = np.asarray(Image.fromarray(rgb).resize((work_w, work_h), Image.BILINEAR))
    labels = cluster_map(features, valid_hw, image_hw, stride, long_side, centroids, out_hw=(work_h, work_w))
    segments = felzenszwalb(rgb, scale=params.scale, sigma=params.sigma,
                            min_size=min_size_for(params, area_reference, work_h, work_w))
    mask = superpixel_vote(labels, segments, num_clusters).astype(np.uint8)
    if (work_h, work_w) != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return mask


# --- the folder of masks ------------------------------------------------------------------------

def start_pseudo_masks(out_dir: str | os.PathLike, build_key: str) -> bool:
    """Prepare ``out_dir`` for masks built with ``build_key``; True if they are already complete.

    If the folder belongs to another build (or to none), its ``meta.json``, its quality report
    and every ``*.png`` under it are removed first, so it never looks complete while being
    rewritten and no stale mask or report survives. ``build_key`` is then recorded as the
    pending build: :func:`write_pseudo_masks` keeps the masks that a killed run of this same
    build already wrote. Call once, before the mapped writers. Unfinished temporary files of
    killed writers are removed either way.
    """
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    if meta is not None and meta.build_key == build_key:
        return True
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.rglob(".*.png.tmp*"):  # a killed writer's unfinished file
        leftover.unlink(missing_ok=True)
    if _current_key(out_dir) == build_key:
        return False
    (out_dir / META_NAME).unlink(missing_ok=True)
    (out_dir / QUALITY_NAME).unlink(missing_ok=True)
    stale = list(out_dir.rglob("*.png"))
    for path in stale:
        path.unlink()
    tmp = out_dir / f"{PENDING_NAME}.tmp{os.getpid()}"
    tmp.write_text(build_key + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / PENDING_NAME)
    log.info("pseudo masks %s: started build %s (%d stale masks removed)", out_dir, build_key, len(stale))
    return False


def write_pseudo_masks(
    rows: Sequence[int],
    store_path: str | os.PathLike,
    centroids: np.ndarray,
    image_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    params: FelzenszwalbParams,
    build_key: str,
    area_reference: int | None = None,
    max_side: int | None = None,
    progress: bool = False,
) -> int:
    """Write the pseudo masks of embeddings-store ``rows`` (images ``image_paths``, same order); returns masks written.

    Each goes to ``out_dir/{image_id}.png`` (palette PNG, atomic). An existing file is kept
    only when ``out_dir`` is being built, or was built, with the same ``build_key`` (see
    :func:`start_pseudo_masks`, which clears the masks of any other build); otherwise it is
    overwritten. Every row must be ``done``.
    """
    rows = list(rows)
    if len(image_paths) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(image_paths)} image paths")
    out_dir = Path(out_dir)
    resume = _current_key(out_dir) == build_key
    group = open_store(store_path, EMBEDDINGS)
    attrs = read_attrs(group, EMBEDDINGS)
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != attrs.channels:
        raise ValueError(f"centroids must be [K, {attrs.channels}] for embeddings store {store_path}, "
                         f"got {centroids.shape}")
    done, image_hw, valid_hw = (np.asarray(group[name][:]) for name in ("done", "image_hw", "valid_hw"))
    written = 0
    for row, image_path in tqdm(list(zip(rows, image_paths)), desc="pseudo masks", unit="img", disable=not progress):
        image_id = attrs.image_ids[row]
        target = out_dir / f"{image_id}.png"
        if resume and target.exists():
            continue
        if not done[row]:
            raise ValueError(f"embeddings store {store_path}: image {image_id!r} (row {row}) is not extracted yet")
        full_hw = tuple(int(v) for v in image_hw[row])
        work_hw = working_size(*full_hw, max_side)
        rgb = load_rgb(image_path, at_least=max(work_hw) if work_hw != full_hw else None)
        if rgb.shape[:2] != full_hw and (work_hw == full_hw or not is_reduced_decode(rgb.shape[:2], full_hw)):
            raise ValueError(f"{image_path}: image is {rgb.shape[0]}x{rgb.shape[1]} but was "
                             f"{full_hw[0]}x{full_hw[1]} when embedded; re-run extraction")
        if rgb.shape[:2] != full_hw:  # decoded at a reduced scale: shrunk to the working size here
            rgb = np.asarray(Image.fromarray(rgb).resize(work_hw[::-1], Image.BILINEAR))
        mask = pseudo_mask(group["features"][row], valid_hw[row], image_hw[row], attrs.stride,
                           attrs.input_long_side, centroids, rgb, params, area_reference, max_side)
        save_label(target, mask)
        written += 1
    log.info("pseudo masks: %d written, %d kept, into %s", written, len(rows) - written, out_dir)
    return written


def finish_pseudo_masks(out_dir: str | os.PathLike, meta: PseudoMasksMeta,
                        image_ids: Sequence[str] | None = None) -> None:
    """Mark ``out_dir`` complete: write ``meta.json`` (atomic) and drop the pending build key.

    With ``image_ids``, first check that each has its mask: a folder missing one is never
    marked complete (ValueError naming the first missing ids).
    """
    out_dir = Path(out_dir)
    if image_ids is not None:
        missing = [i for i in image_ids if not (out_dir / f"{i}.png").is_file()]
        if missing:
            raise ValueError(f"pseudo masks {out_dir}: {len(missing)} of {len(image_ids)} masks are missing, "
                             f"e.g. {missing[:3]}; not marked complete")
    write_json_meta(out_dir / META_NAME, meta)
    (out_dir / PENDING_NAME).unlink(missing_ok=True)


def _read_meta(out_dir: Path) -> PseudoMasksMeta | None:
    path = out_dir / META_NAME
    if not path.exists():
        return None
    try:
        return read_json_meta(path, PseudoMasksMeta)
    except StoreVersionError:
        raise  # masks of another code version: refused, not deleted
    except StoreValidationError as exc:
        log.warning("%s", exc)
        return None


def _current_key(out_dir: Path) -> str | None:
    """The build key the folder's masks belong to: the pending build's, else the complete one's."""
    pending = out_dir / PENDING_NAME
    if pending.exists():
        return pending.read_text(encoding="utf-8").strip()
    meta = _read_meta(out_dir)
    return meta.build_key if meta is not None else None
