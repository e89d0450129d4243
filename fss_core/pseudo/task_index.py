"""The pseudo task index: valid (image, cluster) occurrences, their prototypes, and the
similarity prior that picks supports for each of them (Stage C).

A cluster ``c`` is a valid pseudo-class of an image when

- its area is at least the minimum area (pixels of the original image, scaled down for images
  smaller than ``area_reference``, see :func:`scaled_min_area`), and
- it is not background-like: fewer than ``1 - background_span`` of the image's rows contain
  no pixel of it, or fewer than ``1 - background_span`` of its columns (it spans ≥ 99 % of
  the height or of the width). Sky, grass, walls and padding bands fall out this way.

Each valid occurrence gets a prototype: the mean of the image's L2-normalised embeddings over
the cluster's region. The region is placed where the image actually lies on the extraction
canvas (resized to ``new_h × new_w`` of ``pad_geometry``, top-left, the rest padding, as in
:func:`fss_core.pseudo.masks.cluster_map`): original pixel ``y`` covers canvas rows
``[y, y + 1)·new_h/H`` and cell ``i`` covers canvas rows ``[i, i + 1)·stride``. Each cell is
weighted by the area of the region inside it on the canvas, and the cell features are averaged
with those weights. The valid cells may reach past the image into padding (``ceil(new_h/stride)``
cells of ``stride`` rows): that part of a cell holds no pixel and weighs nothing. This equals the
masked mean over canvas pixels of the features upsampled piecewise-constant (one value per cell),
and costs O(H·W) instead of upsampling C channels to full resolution.

The similarity prior lists, for each occurrence of cluster ``c`` (``n`` occurrences), its
``k_c`` most cosine-similar other occurrences of ``c``, most similar first:
``k_c = n - 1`` (all others) if ``n < 20``, else ``min(⌊n/2⌋, prior_max)``. For clusters with
more than ``prior_candidates`` occurrences the search runs over one seeded random subset of
that many members. The lists are stored as CSR (``prior_offsets``, ``prior_rows``).
"""

from __future__ import annotations

import dataclasses

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from scipy import sparse

from fss_core.data.images import IGNORE_LABEL, load_label
from fss_core.geometry import pad_geometry, scaled_min_area
from fss_core.pseudo.masks import SIZE_MULTIPLE
from storage_schemas import TASKS, TasksAttrs, create_store, open_store, read_attrs

log = logging.getLogger(__name__)

PRIOR_MIN_MEMBERS = 20  # below this many members a cluster's prior lists every other member
PRIOR_FRACTION = 0.5  # otherwise the prior keeps this fraction of the members (capped by prior_max)
_BLOCK_ELEMENTS = 1 << 24  # similarity rows are computed in blocks of at most this many entries (64 MiB)
_ARRAYS = ("occ_image", "occ_cluster", "occ_area", "occ_prototype", "prior_offsets", "prior_rows")


@dataclass(eq=False)
class PseudoTaskIndex:
    """Valid pseudo-class occurrences and their similarity prior.

    Arrays (``M`` occurrences, ``C`` channels, ``P`` prior entries):

    - ``occ_image [M]`` int32: row into ``image_ids``; rows are sorted by image, then cluster.
    - ``occ_cluster [M]`` int16, ``occ_area [M]`` int64 (pixels at original resolution).
    - ``occ_prototype [M, C]`` float32: masked mean embedding of the occurrence.
    - ``prior_offsets [M + 1]`` int64, ``prior_rows [P]`` int32: occurrence ``i``'s support
      candidates are ``prior_rows[prior_offsets[i]:prior_offsets[i + 1]]``, most similar first.

    ``min_area`` (original pixels, scaled for small images, see :func:`scaled_min_area`), ``background_span``,
    ``prior_max`` and ``prior_candidates`` record how it was built.
    """

    image_ids: list[str]
    num_clusters: int
    min_area: int
    background_span: float
    prior_max: int
    prior_candidates: int
    occ_image: np.ndarray
    occ_cluster: np.ndarray
    occ_area: np.ndarray
    occ_prototype: np.ndarray
    prior_offsets: np.ndarray
    prior_rows: np.ndarray

    def __post_init__(self) -> None:
        m = len(self.occ_image)
        for name in ("occ_cluster", "occ_area"):
            if getattr(self, name).shape != (m,):
                raise ValueError(f"PseudoTaskIndex.{name}: shape {getattr(self, name).shape}, expected ({m},)")
        if self.occ_prototype.ndim != 2 or len(self.occ_prototype) != m:
            raise ValueError(f"PseudoTaskIndex.occ_prototype: shape {self.occ_prototype.shape}, expected ({m}, C)")
        if self.prior_offsets.shape != (m + 1,) or self.prior_offsets[0] != 0 \
                or self.prior_offsets[-1] != len(self.prior_rows) or np.any(np.diff(self.prior_offsets) < 0):
            raise ValueError("PseudoTaskIndex.prior_offsets: not a CSR offset array over prior_rows "
                             f"(shape {self.prior_offsets.shape}, {len(self.prior_rows)} prior rows, {m} occurrences)")
        if m and (self.occ_image.min() < 0 or self.occ_image.max() >= len(self.image_ids)):
            raise ValueError(f"PseudoTaskIndex.occ_image: values outside 0..{len(self.image_ids) - 1}")
        if m and (self.occ_cluster.min() < 0 or self.occ_cluster.max() >= self.num_clusters):
            raise ValueError(f"PseudoTaskIndex.occ_cluster: values outside 0..{self.num_clusters - 1}")
        if len(self.prior_rows) and (self.prior_rows.min() < 0 or self.prior_rows.max() >= m):
            raise ValueError(f"PseudoTaskIndex.prior_rows: values outside 0..{m - 1}")

    def select(self, keep: np.ndarray) -> PseudoTaskIndex:
        """The index restricted to occurrences ``keep`` [M] bool; priors keep only kept rows, in order."""
        keep = np.asarray(keep, dtype=bool)
        new_row = np.full(len(keep), -1, dtype=np.int64)
        new_row[keep] = np.arange(int(keep.sum()))
        counts = np.diff(self.prior_offsets)
        owner = np.repeat(np.arange(len(keep)), counts)  # occurrence owning each prior entry
        mapped = new_row[self.prior_rows]
        kept_entry = keep[owner] & (mapped >= 0)
        new_counts = np.bincount(owner[kept_entry], minlength=len(keep))[keep]
        return dataclasses.replace(
            self, occ_image=self.occ_image[keep], occ_cluster=self.occ_cluster[keep], occ_area=self.occ_area[keep],
            occ_prototype=self.occ_prototype[keep],
            prior_offsets=np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64),
            prior_rows=mapped[kept_entry].astype(np.int32),
        )

    def split_holdout(self, fraction: float, seed: int) -> tuple[PseudoTaskIndex, PseudoTaskIndex]:
        """(train, held-out) indices over disjoint images: a seeded ``fraction`` of the indexed
        images (at least one) is held out for model selection and never seen in training."""
        images = np.unique(self.occ_image)
        n_out = max(1, int(round(fraction * len(images))))
        if n_out >= len(images):
            raise ValueError(f"cannot hold out {n_out} of {len(images)} indexed images")
        held = np.random.default_rng(seed).choice(images, size=n_out, replace=False)
        out = np.isin(self.occ_image, held)
        return self.select(~out), self.select(out)

    @property
    def num_occurrences(self) -> int:
        """Number of valid (image, cluster) occurrences ``M``."""
        return len(self.occ_image)

    def prior(self, row: int) -> np.ndarray:
        """Support candidates ``[k]`` (occurrence rows, most similar first) of occurrence ``row``."""
        return self.prior_rows[self.prior_offsets[row]:self.prior_offsets[row + 1]]

    def save(self, path: str | os.PathLike, build_key: str) -> None:
        """Write the index as a ``tasks.zarr`` store (layout ``storage_schemas.TASKS``), replacing ``path``."""
        attrs = TasksAttrs(
            build_key=build_key,
            image_ids=list(self.image_ids),
            num_clusters=self.num_clusters,
            channels=self.occ_prototype.shape[1],
            min_area=self.min_area,
            background_span=self.background_span,
            prior_min_members=PRIOR_MIN_MEMBERS,
            prior_fraction=PRIOR_FRACTION,
            prior_max_k=self.prior_max,
            prior_max_candidates=self.prior_candidates,
        )
        sizes = {"occurrence": self.num_occurrences, "channel": self.occ_prototype.shape[1],
                 "prior_entry": len(self.prior_rows)}
        group = create_store(path, TASKS, sizes, attrs)
        for name in _ARRAYS:
            values = getattr(self, name)
            if values.size:
                group[name][...] = values

    @classmethod
    def load(cls, path: str | os.PathLike) -> PseudoTaskIndex:
        """Read an index written by :meth:`save` (the store is validated against ``TASKS``)."""
        group = open_store(path, TASKS)
        attrs = read_attrs(group, TASKS)
        arrays = {name: np.asarray(group[name][...]) for name in _ARRAYS}
        return cls(image_ids=list(attrs.image_ids), num_clusters=attrs.num_clusters, min_area=attrs.min_area,
                   background_span=attrs.background_span, prior_max=attrs.prior_max_k,
                   prior_candidates=attrs.prior_max_candidates, **arrays)


def valid_pseudo_classes(mask: np.ndarray, min_area: int, background_span: float = 0.99) -> list[tuple[int, int]]:
    """The valid pseudo-classes of one mask, as ``(cluster, area)`` sorted by cluster.

    ``mask`` is ``uint8 [H, W]`` of cluster ids (255 = ignore, never a class). A cluster is
    kept if its area is ``>= min_area`` and it is not background-like (see module doc).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    h, w = mask.shape
    areas = np.bincount(mask.ravel(), minlength=256)
    rows_with = np.zeros((256, h), dtype=bool)
    rows_with[mask, np.arange(h)[:, None]] = True
    cols_with = np.zeros((256, w), dtype=bool)
    cols_with[mask, np.arange(w)[None, :]] = True
    empty_rows = h - rows_with.sum(axis=1)
    empty_cols = w - cols_with.sum(axis=1)
    # rounding keeps "fewer than 1 %" exact: (1 - 0.99) * 100 must be 1, not 1.0000000000000009
    free = round(1 - background_span, 9)
    background = (empty_rows < round(free * h, 9)) | (empty_cols < round(free * w, 9))
    keep = (areas >= max(min_area, 1)) & ~background
    keep[IGNORE_LABEL] = False
    return [(int(c), int(areas[c])) for c in np.flatnonzero(keep)]


def _cell_overlap(pixels: int, canvas_pixels: int, cells: int, stride: int) -> sparse.csr_matrix:
    """``[cells, pixels]`` sparse: how much of each original pixel lies in each cell, on the canvas.

    The ``pixels`` of the image are resized onto canvas span ``[0, canvas_pixels)``, so pixel
    ``p`` covers ``[p, p + 1)·canvas_pixels/pixels``; cell ``i`` covers ``[i, i + 1)·stride``.
    Lengths are in canvas units. Image content past the last cell (a patch grid that floors,
    as a ViT's does, has no cell there) counts to the last cell, as the cluster map clamps it.
    """
    scale = canvas_pixels / pixels
    starts = np.arange(pixels) * scale
    ends = np.arange(1, pixels + 1) * scale
    edges = np.arange(cells + 1) * float(stride)
    edges[-1] = max(edges[-1], canvas_pixels)
    lo = np.maximum(edges[:-1, None], starts[None, :])
    hi = np.minimum(edges[1:, None], ends[None, :])
    return sparse.csr_matrix(np.clip(hi - lo, 0.0, None))


def masked_mean_prototypes(features: np.ndarray, mask: np.ndarray, clusters: Sequence[int], stride: int,
                           long_side: int) -> np.ndarray:
    """Mean embedding of each cluster's region.

    ``features`` is ``[C, r, c]``, the image's valid cells from an extraction at ``stride`` on
    a ``long_side`` canvas; ``mask`` ``[H, W]`` cluster ids at original resolution. Returns
    ``[len(clusters), C]`` float32: for each cluster the mean of the cell features, each cell
    weighted by the area of the cluster inside it once the image is placed on the canvas (see
    the module doc). Raises ValueError when ``r × c`` is not the valid grid of that geometry.
    """
    channels, r, c = features.shape
    h, w = mask.shape
    geometry = pad_geometry(h, w, long_side, SIZE_MULTIPLE)
    rows_expected, cols_expected = geometry.valid_cells(stride)
    # a backbone whose grid floors (ViT patches) may have one cell fewer than the image reaches
    if not (rows_expected - 1 <= r <= rows_expected and cols_expected - 1 <= c <= cols_expected):
        raise ValueError(f"features hold {r}x{c} cells, but a {h}x{w} image on a {long_side} canvas "
                         f"(resized to {geometry.new_h}x{geometry.new_w}) at stride {stride} has "
                         f"{rows_expected}x{cols_expected} valid cells")
    rows = _cell_overlap(h, geometry.new_h, r, stride)
    cols = _cell_overlap(w, geometry.new_w, c, stride)
    coverage = np.empty((len(clusters), r * c))
    for k, cluster in enumerate(clusters):
        # [H, W] -> [r, W] -> [r, c]: area of the cluster inside each cell
        per_row = rows @ (mask == cluster).astype(np.float64)
        coverage[k] = (cols @ per_row.T).T.ravel()
    sums = coverage @ features.reshape(channels, r * c).astype(np.float64).T
    return (sums / coverage.sum(axis=1, keepdims=True)).astype(np.float32)


def prior_length(n: int, prior_max: int) -> int:
    """``k_c`` of a cluster with ``n`` occurrences: every other one below 20, else ``min(⌊n/2⌋, prior_max)``."""
    if n < PRIOR_MIN_MEMBERS:
        return max(n - 1, 0)
    return min(math.floor(PRIOR_FRACTION * n), prior_max)


def similarity_prior(occ_cluster: np.ndarray, prototypes: np.ndarray, prior_max: int = 5000,
                     prior_candidates: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For each occurrence, its ``k_c`` most cosine-similar other occurrences of the same cluster.

    ``occ_cluster [M]``, ``prototypes [M, C]``. Returns CSR ``(offsets [M + 1] int64,
    rows [P] int32)``, each list most similar first. A cluster with more than
    ``prior_candidates`` members is searched over one random subset of that size, drawn
    from ``seed`` and the cluster id; its lists then hold ``min(k_c, prior_candidates - 1)``.
    """
    occ_cluster = np.asarray(occ_cluster)
    norms = np.linalg.norm(prototypes, axis=1, keepdims=True)
    unit = (prototypes / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    plans = []
    lengths = np.zeros(len(occ_cluster), dtype=np.int64)
    for cluster in np.unique(occ_cluster):
        members = np.flatnonzero(occ_cluster == cluster)
        candidates = members
        if len(members) > prior_candidates:
            rng = np.random.default_rng([seed, int(cluster)])
            candidates = np.sort(rng.choice(members, prior_candidates, replace=False))
        k = min(prior_length(len(members), prior_max), len(candidates) - 1)
        lengths[members] = k
        plans.append((members, candidates, k))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.empty(offsets[-1], dtype=np.int32)
    for members, candidates, k in plans:
        if k == 0:
            continue
        block = max(1, _BLOCK_ELEMENTS // len(candidates))
        for start in range(0, len(members), block):
            queries = members[start:start + block]
            sims = unit[queries] @ unit[candidates].T  # [b, n_cand]
            pos = np.minimum(np.searchsorted(candidates, queries), len(candidates) - 1)
            is_self = candidates[pos] == queries
            sims[np.flatnonzero(is_self), pos[is_self]] = -np.inf  # an occurrence is never its own support
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
            best = candidates[np.take_along_axis(top, order, axis=1)]
            rows[offsets[queries][:, None] + np.arange(k)] = best
    return offsets, rows


def build_task_index(
    mask_dir: str | os.PathLike,
    embeddings: zarr.Group | str | os.PathLike,
    image_ids: Sequence[str],
    num_clusters: int,
    min_area: int,
    area_reference: int | None = 473,
    max_side: int | None = None,
    background_span: float = 0.99,
    prior_max: int = 5000,
    prior_candidates: int = 20000,
    seed: int = 0,
) -> PseudoTaskIndex:
    """Build the pseudo task index of ``image_ids`` from their pseudo masks and embeddings.

    - ``mask_dir/{image_id}.png``: pseudo mask ``[H, W]`` of cluster ids in ``0..num_clusters-1``.
    - ``embeddings``: the embeddings store (group or path) with ``features [N, C, G, G]``,
      ``valid_hw [N, 2]``, ``image_hw [N, 2]`` and attributes ``image_ids``, ``stride`` and
      ``input_long_side`` (the canvas geometry that places each mask on its cells).

    ``min_area`` counts in pixels of the image, or of its copy shrunk to ``max_side`` when it is
    larger (the size its pseudo mask was made at: :func:`fss_core.geometry.scaled_min_area`).

    The index lists the given images in the store's row order; images without a valid
    pseudo-class have no occurrence. Deterministic for a given ``seed``.
    """
    group = embeddings if isinstance(embeddings, zarr.Group) else zarr.open_group(os.fspath(embeddings), mode="r")
    where = f"embeddings store {group.store_path}"
    for name in ("features", "valid_hw", "image_hw"):
        if name not in group:
            raise ValueError(f"{where}: array {name!r} is missing")
    store_ids = list(group.attrs.get("image_ids", []))
    if len(store_ids) != group["features"].shape[0]:
        raise ValueError(f"{where}: attribute 'image_ids' lists {len(store_ids)} ids "
                         f"but 'features' has {group['features'].shape[0]} rows")
    stride, long_side = group.attrs.get("stride"), group.attrs.get("input_long_side")
    if stride is None or long_side is None:
        raise ValueError(f"{where}: attributes 'stride' and 'input_long_side' are required "
                         f"(got {stride!r}, {long_side!r})")
    store_row = {image_id: n for n, image_id in enumerate(store_ids)}
    unknown = [i for i in image_ids if i not in store_row]
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} image ids are not in the store, e.g. {unknown[:3]}")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image_ids contains duplicates")
    store_rows = sorted(store_row[i] for i in image_ids)
    features, valid_hw, image_hw = group["features"], group["valid_hw"][...], group["image_hw"][...]
    done = group["done"][...] if "done" in group else None
    mask_dir = Path(mask_dir)

    occ_image, occ_cluster, occ_area, prototypes = [], [], [], []
    for index_row, n in enumerate(store_rows):
        image_id = store_ids[n]
        if done is not None and not done[n]:
            raise ValueError(f"{where}: image {image_id!r} (row {n}) is not marked done")
        path = mask_dir / f"{image_id}.png"
        mask = load_label(path)
        h, w = (int(v) for v in image_hw[n])
        if mask.shape != (h, w):
            raise ValueError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, the embeddings store "
                             f"records the image as {h}x{w}")
        ids = mask[mask != IGNORE_LABEL]
        if ids.size and ids.max() >= num_clusters:
            raise ValueError(f"{path}: cluster id {int(ids.max())} >= num_clusters {num_clusters}")
        classes = valid_pseudo_classes(mask, scaled_min_area(min_area, area_reference, h, w, max_side),
                                       background_span)
        if not classes:
            continue
        r, c = (int(v) for v in valid_hw[n])
        block = np.asarray(features[n, :, :r, :c], dtype=np.float32)
        prototypes.append(masked_mean_prototypes(block, mask, [cl for cl, _ in classes], int(stride),
                                                 int(long_side)))
        occ_image += [index_row] * len(classes)
        occ_cluster += [cl for cl, _ in classes]
        occ_area += [area for _, area in classes]

    channels = group["features"].shape[1]
    occ_prototype = np.concatenate(prototypes) if prototypes else np.zeros((0, channels), np.float32)
    occ_cluster_arr = np.asarray(occ_cluster, dtype=np.int16)
    offsets, rows = similarity_prior(occ_cluster_arr, occ_prototype, prior_max, prior_candidates, seed)
    log.info("task index: %d occurrences over %d of %d images, %d prior entries",
             len(occ_cluster), len(set(occ_image)), len(store_rows), len(rows))
    return PseudoTaskIndex(
        image_ids=[store_ids[n] for n in store_rows],
        num_clusters=num_clusters,
        min_area=min_area,
        background_span=background_span,
        prior_max=prior_max,
        prior_candidates=prior_candidates,
        occ_image=np.asarray(occ_image, dtype=np.int32),
        occ_cluster=occ_cluster_arr,
        occ_area=np.asarray(occ_area, dtype=np.int64),
        occ_prototype=occ_prototype,
        prior_offsets=offsets,
        prior_rows=rows,
    )
