"""Stage A: pixel embeddings of every image into ``embeddings.zarr``.

Each image goes through the reference geometry (:func:`preprocess`): resized so its longer
side is ``L``, both sides floored to a multiple of 8, pasted at the top-left of a black
``L × L`` canvas and ImageNet-normalised. The backbone's ``embedding_layer`` map of the canvas,
L2-normalised over channels, is stored as ``features[N, C, G, G]`` float16, with
``valid_hw[N, 2]`` = the feature cells that overlap image content (the rest is padding and is
never read downstream), ``image_hw[N, 2]`` = the original size and ``done[N]``.

The unit of work is a contiguous run of rows. A write into a shard rewrites the whole shard
file (zarr's sharding), so each shard has one writer at a time: a run that starts or ends
inside a shard writes that shard's rows holding a lock for it (``shard_lock``), and a run of
whole shards (:func:`shard_blocks`) needs none. Within a shard, features are written first and
``done`` last, so a killed run leaves no row marked done without its features; a rerun
computes only the rows not yet done.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import zarr
from PIL import Image
from tqdm import tqdm

from fss_core.data.images import is_reduced_decode, load_rgb
from fss_core.embeddings.pca import Projection, load_projection
from fss_core.geometry import PadGeometry, pad_geometry
from fss_core.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from storage_schemas import (
    EMBEDDINGS,
    EmbeddingsAttrs,
    Normalisation,
    StoreValidationError,
    StoreVersionError,
    create_store,
    open_store,
    read_attrs,
    write_attrs,
    write_unit,
)
from storage_schemas.stores import IMAGES_PER_BLOCK

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 8  # both resized sides are floored to a multiple of 8, as in the reference
PREFETCH_BATCHES = 2  # batches decoded ahead of the forward pass
NORMALISATION = Normalisation(mean=tuple(255 * m for m in IMAGENET_MEAN), std=tuple(255 * s for s in IMAGENET_STD))
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_PADDING = (torch.zeros(3, 1, 1) - _MEAN) / _STD  # a black pixel, normalised
NORMALISE_BYTES = 4 * 2**20  # float32 rows normalised at a time: heap memory reused, not fresh pages per batch
WRITE_BUFFER_BYTES = 256 * 2**20  # float16 features a writer holds to write a shard in as few calls as possible


# --- one image, one batch ---------------------------------------------------------------------

def preprocess(rgb: np.ndarray, long_side: int, out: torch.Tensor | None = None,
               size: tuple[int, int] | None = None) -> tuple[torch.Tensor, PadGeometry]:
    """RGB ``uint8 [H, W, 3]`` → (ImageNet-normalised canvas ``[3, L, L]`` float32, its geometry).

    The image is resized (PIL bilinear) to ``(new_h, new_w)`` of :func:`pad_geometry` and
    pasted at the top-left of an ``L × L`` canvas of zeros; the zeros are set before
    normalisation, so the padding is black, as in the reference. ``out``: the canvas to fill
    (a slot of a batch), instead of a new one. ``size``: the image's own ``(H, W)`` when ``rgb``
    is a smaller decode of it (:func:`fss_core.data.images.load_rgb` with ``at_least``); the
    geometry is the image's.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {rgb.dtype} {rgb.shape}")
    geometry = pad_geometry(*(size or rgb.shape[:2]), long_side, SIZE_MULTIPLE)
    canvas = torch.empty(3, long_side, long_side) if out is None else out
    if canvas.shape != (3, long_side, long_side) or canvas.dtype != torch.float32:
        raise ValueError(f"out must be a float32 [3, {long_side}, {long_side}] tensor, got {canvas.dtype} "
                         f"{list(canvas.shape)}")
    resized = Image.fromarray(rgb).resize((geometry.new_w, geometry.new_h), Image.Resampling.BILINEAR)
    # In place, one pass per step, the arithmetic of ((pixels / 255) - mean) / std on a black canvas.
    h, w = geometry.new_h, geometry.new_w
    canvas[:, h:, :] = _PADDING
    canvas[:, :h, w:] = _PADDING
    content = canvas[:, :h, :w]
    content.copy_(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    content.div_(255.0).sub_(_MEAN).div_(_STD)
    return canvas, geometry


def embed_batch(backbone: Backbone, batch: torch.Tensor, device: str | torch.device = "cpu",
                amp: bool = False) -> torch.Tensor:
    """Canvases ``[B, 3, L, L]`` → embeddings ``[B, C, G, G]`` float32 on the CPU, unit L2 norm per cell.

    ``backbone`` must already sit on ``device`` in eval mode. ``amp`` runs the backbone under
    reduced-precision autocast where the hardware does it natively (:func:`autocast_dtype`);
    the output is normalised in float32 either way. On CUDA the batch is fed channels-last.
    """
    return normalised(backbone_features(backbone, batch, device, amp))


def backbone_features(backbone: Backbone, batch: torch.Tensor, device: str | torch.device = "cpu",
                      amp: bool = False) -> torch.Tensor:
    """The forward pass of :func:`embed_batch` alone: canvases ``[B, 3, L, L]`` → the backbone's
    ``embedding_layer`` map ``[B, C, G, G]`` on ``device``, in the autocast dtype, not normalised."""
    device = torch.device(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    dtype = autocast_dtype(device) if amp else None
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return backbone(x)[backbone.embedding_layer]


def normalised(features: torch.Tensor) -> torch.Tensor:
    """Backbone features ``[B, C, G, G]`` → float32 on the CPU with unit L2 norm over channels."""
    with torch.inference_mode():
        out = features.to(torch.float32, copy=True)
        # torch.nn.functional.normalize's arithmetic, in place: a quarter of its CPU time
        out /= _norms(out)
        return out.cpu()


def _norms(features: torch.Tensor) -> torch.Tensor:
    """The L2 norm over channels ``[B, 1, G, G]`` of float32 features, floored as F.normalize does."""
    return torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min_(1e-12)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: bfloat16 (float16 on CUDA without bf16); None on a CPU
    without native bf16 instructions, where emulated bf16 is slower than float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = any(capabilities.get(flag) for flag in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    return torch.bfloat16 if native else None


def _on_device(backbone: Backbone, device: str) -> Backbone:
    """The backbone in eval mode on ``device`` (channels-last weights on CUDA, to match the input)."""
    backbone = backbone.to(device).eval()
    return backbone.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else backbone


def feature_grid(backbone: Backbone, long_side: int) -> int:
    """Side ``G`` of the embedding map of an ``L × L`` canvas (one forward pass of zeros)."""
    device = next(backbone.parameters()).device
    with torch.inference_mode():
        out = backbone(torch.zeros(1, 3, long_side, long_side, device=device))[backbone.embedding_layer]
    if out.shape[-2] != out.shape[-1]:
        raise ValueError(f"backbone maps a square {long_side}x{long_side} canvas to a non-square "
                         f"{out.shape[-2]}x{out.shape[-1]} grid")
    return int(out.shape[-1])


def valid_cells(geometry: PadGeometry, stride: int, grid: int) -> tuple[int, int]:
    """Feature cells (rows, cols) that overlap image content, within the ``grid × grid`` map."""
    rows, cols = geometry.valid_cells(stride)
    return min(rows, grid), min(cols, grid)  # a backbone that floors (ViT patches) has fewer cells


def sample_valid_vectors(image_paths: Sequence[str | os.PathLike], backbone: Backbone, long_side: int,
                         batch_size: int, max_vectors: int, seed: int, device: str = "cpu",
                         amp: bool = False) -> np.ndarray:
    """Unprojected embeddings of the valid cells of ``image_paths``, as ``[n, C]`` float32.

    Each image contributes at most ``ceil(max_vectors / len(image_paths))`` cells drawn with
    ``seed``; padding cells are never included. This is the sample a PCA projection is fitted on.
    """
    if not image_paths:
        raise ValueError("no images to sample embeddings from")
    per_image = -(-max_vectors // len(image_paths))
    rng = np.random.default_rng(seed)
    backbone = _on_device(backbone, device)
    stride = backbone.strides[backbone.embedding_layer]
    parts = []
    for start in range(0, len(image_paths), batch_size):
        loaded = [preprocess(load_rgb(p), long_side) for p in image_paths[start : start + batch_size]]
        features = embed_batch(backbone, torch.stack([t for t, _ in loaded]), device, amp).numpy()
        for f, (_, geometry) in zip(features, loaded):
            rows, cols = valid_cells(geometry, stride, f.shape[-1])
            cells = f[:, :rows, :cols].reshape(f.shape[0], -1).T
            take = rng.choice(len(cells), size=min(per_image, len(cells)), replace=False)
            parts.append(cells[np.sort(take)])
    return np.concatenate(parts)


# --- the store --------------------------------------------------------------------------------

def shard_blocks(n_rows: int, shard: int) -> list[range]:
    """Row blocks ``[0, shard), [shard, 2·shard), …`` covering ``n_rows`` (the last may be shorter)."""
    if shard < 1:
        raise ValueError(f"shard must be >= 1, got {shard}")
    return [range(start, min(start + shard, n_rows)) for start in range(0, n_rows, shard)]


def create_embeddings_store(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    image_hw: np.ndarray,
    channels: int,
    grid: int,
    *,
    build_key: str,
    extractor: str,
    stride: int,
    long_side: int,
    checkpoint_sha256: str | None = None,
    pca: int | None = None,
    shard_size: int = IMAGES_PER_BLOCK,
    image_sha256: Sequence[str] | None = None,
) -> zarr.Group:
    """Open the embeddings store at ``path`` for extraction, creating it only when needed.

    - A valid store with the same ``build_key`` and the same ``image_ids`` is reopened as is
      (its ``done`` mask makes the rerun resume).
    - Same key, and its ids are a prefix of ``image_ids`` (new images were ingested): the
      store is extended with the new rows (:func:`extend_embeddings_store`).
    - Otherwise (no store, another key, ids removed or reordered) it is created afresh.

    ``image_hw [N, 2]`` is the original (H, W) of each image; ``valid_hw`` is derived from it.
    ``channels`` is the stored width (the PCA dimension when ``pca`` is set). ``image_sha256``
    (one per image; None: image content is not tracked) is recorded per row: in a reopened or
    extended store, a row whose image now has another sha256 is marked not done, so the next
    extraction computes that row again and keeps the others (:func:`record_image_content`).
    Returns the group opened read-write.
    """
    image_ids = list(image_ids)
    image_hw = _checked_hw(image_hw, len(image_ids), "image_hw")
    shas = None if image_sha256 is None else list(image_sha256)
    if shas is not None and len(shas) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image ids but {len(shas)} image sha256s")
    existing = _same_key_store(path, build_key, channels, grid, shard_size)
    if existing is not None:
        old_ids = list(existing.attrs["image_ids"])
        if image_ids[: len(old_ids)] == old_ids:
            group = existing
            if len(old_ids) < len(image_ids):
                group = extend_embeddings_store(path, image_ids[len(old_ids) :], image_hw[len(old_ids) :],
                                                None if shas is None else shas[len(old_ids) :])
            changed = record_image_content(group, shas)
            _record_pending_sizes(group, image_hw)
            log.info("embeddings store %s reopened: %d of %d images done (%d of them changed since)", path,
                     int(group["done"][:].sum()), len(image_ids), changed)
            return group
        log.warning("embeddings store %s lists other images than the manifest; rebuilding it", path)
    attrs = EmbeddingsAttrs(build_key=build_key, extractor=extractor, checkpoint_sha256=checkpoint_sha256,
                            input_long_side=long_side, stride=stride, normalisation=NORMALISATION,
                            channels=channels, pca=pca, image_ids=image_ids, image_sha256=shas)
    sizes = {"image": len(image_ids), "channel": channels, "row": grid, "col": grid}
    group = create_store(path, EMBEDDINGS, sizes, attrs, write_units={"image": shard_size})
    _write_sizes(group, 0, image_hw, long_side, stride, grid)
    log.info("embeddings store %s created: %d images, %d x %d x %d features, shards of %d images",
             path, len(image_ids), channels, grid, grid, shard_size)
    return group


def extend_embeddings_store(path: str | os.PathLike, new_image_ids: Sequence[str],
                            new_image_hw: np.ndarray, new_image_sha256: Sequence[str] | None = None) -> zarr.Group:
    """Append rows for ``new_image_ids`` to the store at ``path``; old rows and their ``done`` stay.

    Every array grows along the image axis (new rows start not done) and the ids are appended
    to ``image_ids``, their ``new_image_sha256`` to ``image_sha256`` (which becomes None, not
    recorded, when either part is unknown). Arrays are resized before the attributes are
    rewritten: a run killed in between leaves a store that :func:`open_store` rejects, which is
    then rebuilt.
    """
    group = open_store(path, EMBEDDINGS, mode="r+")
    attrs = read_attrs(group, EMBEDDINGS)
    new_image_ids = list(new_image_ids)
    new_image_hw = _checked_hw(new_image_hw, len(new_image_ids), "new_image_hw")
    clash = sorted(set(new_image_ids) & set(attrs.image_ids))
    if clash or len(set(new_image_ids)) != len(new_image_ids):
        raise ValueError(f"embeddings store {path}: new image ids repeat existing or each other, e.g. "
                         f"{(clash or new_image_ids)[:3]}")
    old_n = len(attrs.image_ids)
    n = old_n + len(new_image_ids)
    shas = None
    if attrs.image_sha256 is not None and new_image_sha256 is not None:
        shas = attrs.image_sha256 + list(new_image_sha256)
    for name in ("features", "valid_hw", "image_hw", "done"):
        array = group[name]
        array.resize((n, *array.shape[1:]))
    write_attrs(group, EmbeddingsAttrs.model_validate(
        {**attrs.model_dump(), "image_ids": attrs.image_ids + new_image_ids, "image_sha256": shas}))
    _write_sizes(group, old_n, new_image_hw, attrs.input_long_side, attrs.stride, group["features"].shape[-1])
    log.info("embeddings store %s extended from %d to %d images", path, old_n, n)
    return group


def record_image_content(group: zarr.Group, image_sha256: Sequence[str] | None) -> int:
    """Record the sha256 of each row's image (``image_sha256``, one per row) in the open store.

    A done row whose recorded sha256 differs (its image was rewritten under the same id) is
    marked not done first, then the new sha256s are recorded, so that a run killed in between
    finds the row still out of date. A store that records no sha256s (written before rows
    recorded them) adopts the given ones: its done rows are trusted, not computed again.
    ``image_sha256`` None (content not tracked) changes nothing. Returns how many rows were
    marked not done.
    """
    if image_sha256 is None:
        return 0
    attrs = read_attrs(group, EMBEDDINGS)
    shas = list(image_sha256)
    if len(shas) != len(attrs.image_ids):
        raise ValueError(f"the store has {len(attrs.image_ids)} rows but {len(shas)} image sha256s were given")
    if attrs.image_sha256 == shas:
        return 0
    stale = []
    if attrs.image_sha256 is not None:
        done = np.asarray(group["done"][:])
        stale = [i for i, (old, new) in enumerate(zip(attrs.image_sha256, shas)) if old != new and done[i]]
        for lo, hi in _runs(stale):
            group["done"][lo:hi] = False
    write_attrs(group, EmbeddingsAttrs.model_validate({**attrs.model_dump(), "image_sha256": shas}))
    if stale:
        log.info("embeddings store %s: %d images changed since they were extracted; marked not done",
                 group.store_path, len(stale))
    return len(stale)


def stored_images(path: str | os.PathLike) -> dict[str, str | None]:
    """The images whose features the store at ``path`` holds (its done rows): image id → sha256
    of the image they were computed from (None where the store records none). Empty when there
    is no valid store."""
    try:
        group = open_store(path, EMBEDDINGS)
    except StoreValidationError:
        return {}
    attrs = read_attrs(group, EMBEDDINGS)
    shas = attrs.image_sha256 or [None] * len(attrs.image_ids)
    done = np.asarray(group["done"][:])
    return {image_id: sha for image_id, sha, is_done in zip(attrs.image_ids, shas, done) if is_done}


def _same_key_store(path: str | os.PathLike, build_key: str, channels: int, grid: int,
                    shard_size: int) -> zarr.Group | None:
    """The store at ``path`` opened read-write if it is valid, was built with ``build_key`` and has this layout."""
    try:
        group = open_store(path, EMBEDDINGS, mode="r+")
    except StoreVersionError:
        raise  # another code version's store: refused, not rebuilt over
    except StoreValidationError as exc:
        log.info("no reusable embeddings store at %s: %s", path, exc)
        return None
    features = group["features"]
    if group.attrs.get("build_key") != build_key:
        return None
    if features.shape[1:] != (channels, grid, grid) or write_unit(features)[0] != shard_size:
        log.warning("embeddings store %s has the build key but another layout; rebuilding it", path)
        return None
    return group


def _checked_hw(image_hw: np.ndarray, n: int, name: str) -> np.ndarray:
    image_hw = np.asarray(image_hw, dtype=np.int64).reshape(-1, 2) if n else np.zeros((0, 2), np.int64)
    if image_hw.shape != (n, 2):
        raise ValueError(f"{name}: expected shape ({n}, 2), got {image_hw.shape}")
    if (image_hw <= 0).any():
        raise ValueError(f"{name}: image sizes must be positive")
    return image_hw


def _write_sizes(group: zarr.Group, start: int, image_hw: np.ndarray, long_side: int, stride: int,
                 grid: int) -> None:
    """``image_hw`` and the derived ``valid_hw`` of rows ``start … start + len(image_hw)``."""
    if not len(image_hw):
        return
    valid = [valid_cells(pad_geometry(int(h), int(w), long_side, SIZE_MULTIPLE), stride, grid) for h, w in image_hw]
    stop = start + len(image_hw)
    group["image_hw"][start:stop] = image_hw.astype(np.int32)
    group["valid_hw"][start:stop] = np.asarray(valid, dtype=np.int32)


def _record_pending_sizes(group: zarr.Group, image_hw: np.ndarray) -> None:
    """``image_hw`` (and ``valid_hw``) of every row still to compute, from ``image_hw [N, 2]``: an
    image that changed since its row was computed may have another size, and extraction lays each
    image out by the size recorded here. Computed rows keep theirs."""
    pending = np.flatnonzero(~np.asarray(group["done"][:], dtype=bool))
    if not pending.size:
        return
    recorded = np.asarray(group["image_hw"][:])
    recorded[pending] = image_hw[pending]
    attrs = read_attrs(group, EMBEDDINGS)
    _write_sizes(group, 0, recorded, attrs.input_long_side, attrs.stride, group["features"].shape[-1])


# --- the unit of work -------------------------------------------------------------------------

def extract_rows(
    store_path: str | os.PathLike,
    rows: Sequence[int],
    image_paths: Sequence[str | os.PathLike],
    backbone: Backbone,
    long_side: int,
    batch_size: int,
    device: str = "cpu",
    amp: bool = True,
    projection: Projection | None = None,
    progress: bool = False,
    shard_lock: Callable[[int], AbstractContextManager] | None = None,
) -> int:
    """Extract the embeddings of store rows ``rows`` (images ``image_paths``, same order); returns rows computed.

    ``rows`` is a contiguous run. Without ``shard_lock`` it must start on a shard boundary and
    end on one (or at the store's end), so that no other writer touches its shards. With it,
    the run may start or end inside a shard that another writer fills too: that shard's writes
    happen inside ``shard_lock(shard index)``, which must exclude every other writer of the
    store's shard for as long as it is held (one lock per shard, shared by all writers).
    Rows already ``done`` are skipped; the others are computed shard by shard, writing
    ``features``, ``valid_hw`` and ``image_hw`` first and ``done`` last. The forward pass runs
    on the calling thread while one background thread decodes the next batches and normalises
    and writes the previous ones, in order. ``projection`` (None: the store's own, when it was
    built with ``pca``) maps the embeddings to the stored width. ``amp``: reduced-precision
    autocast where the hardware has it (see :func:`embed_batch`; the stored float16 loses more).
    """
    rows = list(rows)
    if len(image_paths) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(image_paths)} image paths")
    group = open_store(store_path, EMBEDDINGS, mode="r+")
    attrs = read_attrs(group, EMBEDDINGS)
    projection = _checked_projection(group, attrs, projection, store_path)
    stride = backbone.strides[backbone.embedding_layer]
    if (attrs.input_long_side, attrs.stride) != (long_side, stride):
        raise ValueError(f"embeddings store {store_path} was built for long side {attrs.input_long_side} and "
                         f"stride {attrs.stride}; asked for {long_side} and stride {stride}")
    features = group["features"]
    n, channels, grid, _ = features.shape
    unit = write_unit(features)[0]
    _check_rows(rows, n, unit, store_path, aligned=shard_lock is None)
    path_of = dict(zip(rows, image_paths))
    done = np.asarray(group["done"][:])
    recorded_hw = np.asarray(group["image_hw"][:])  # each image's size, from ingest
    todo = [r for r in rows if not done[r]]
    if not todo:
        return 0

    backbone = _on_device(backbone, device)
    by_shard: dict[int, list[int]] = {}
    for r in todo:
        by_shard.setdefault(r // unit, []).append(r)
    blocks = list(by_shard.items())  # (shard index, its rows to compute), in row order
    # a shard the run covers only in part has another writer: its writes happen under its lock
    start, stop = rows[0], rows[-1] + 1
    locks = {k: shard_lock(k) if shard_lock is not None and (k * unit < start or min((k + 1) * unit, n) > stop)
             else nullcontext() for k in by_shard}
    batches = [b[i : i + batch_size] for _, b in blocks for i in range(0, len(b), batch_size)]
    start_time = time.perf_counter()
    bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not progress)
    # The forward pass runs here while one background thread, in submission order, decodes the
    # next batches and normalises and writes the previous ones: the backbone never waits for work
    # another core can do, and keeps its own core (two background threads would at times both run
    # beside it on two cores; docs/benchmarks.md, "extraction").
    background = ThreadPoolExecutor(1, thread_name_prefix="extract-io")
    writer = _OrderedWriter(background, max_pending=PREFETCH_BATCHES)
    buffer = _ShardBuffer(features, max(len(b) for _, b in blocks), projection)
    try:
        # Batches are decoded into a ring of canvas buffers, reused instead of allocated anew:
        # fresh pages for every batch slow the forward pass that reads them. Batch k's slot is
        # refilled once the forward pass of batch k is over (at most PREFETCH_BATCHES are ahead).
        ring = torch.empty(PREFETCH_BATCHES + 1, min(batch_size, len(todo)), 3, long_side, long_side)
        loads = deque(background.submit(_load_batch, [path_of[r] for r in b], [recorded_hw[r] for r in b], long_side,
                                        ring[k])
                      for k, b in enumerate(batches[:PREFETCH_BATCHES]))
        next_batch = len(loads)
        last_shard = blocks[-1][0]
        for shard, block_todo in blocks:
            sizes = np.empty((len(block_todo), 2, 2), dtype=np.int32)  # (image_hw, valid_hw) per row
            for first in range(0, len(block_todo), batch_size):
                batch_rows = block_todo[first : first + batch_size]
                canvases, geometries = loads.popleft().result()
                if next_batch < len(batches):
                    loads.append(background.submit(_load_batch, [path_of[r] for r in batches[next_batch]],
                                                   [recorded_hw[r] for r in batches[next_batch]], long_side,
                                                   ring[next_batch % len(ring)]))
                    next_batch += 1
                computed = backbone_features(backbone, canvases, device, amp)
                stored_channels = projection.dim if projection is not None else computed.shape[1]
                if (stored_channels, *computed.shape[2:]) != (channels, grid, grid):
                    raise ValueError(f"embeddings store {store_path} holds [{channels}, {grid}, {grid}] features; "
                                     f"the backbone gives {[stored_channels, *computed.shape[2:]]}")
                for i, geometry in enumerate(geometries, first):
                    sizes[i] = (geometry.orig_h, geometry.orig_w), valid_cells(geometry, stride, grid)
                writer.submit(buffer.add, batch_rows, computed, locks[shard])
                if shard == last_shard and first + batch_size < len(block_todo):
                    # Nothing follows the last shard to hide its write behind, so it is written
                    # batch by batch: the run then ends on one batch's write, not a whole shard's
                    # (each write rewrites the shard file, a cost the forward pass hides).
                    writer.submit(buffer.flush, holds_batch=False)
                bar.update(len(batch_rows))
            writer.submit(buffer.flush, holds_batch=False)
            writer.submit(_finish_block, group, block_todo, sizes, locks[shard], holds_batch=False)
        writer.wait()
    finally:
        writer.close()
        background.shutdown(wait=True, cancel_futures=True)
    bar.close()
    elapsed = time.perf_counter() - start_time
    log.info("extracted %d images of rows %d-%d in %.1f s (%.1f img/s)", len(todo), rows[0], rows[-1],
             elapsed, len(todo) / max(elapsed, 1e-9))
    return len(todo)


def _load_batch(paths: Sequence[str | os.PathLike], sizes: Sequence[tuple[int, int]], long_side: int,
                out: torch.Tensor) -> tuple[torch.Tensor, list[PadGeometry]]:
    """Decode and preprocess images into the first ``B`` canvases of ``out``: (those canvases
    ``[B, 3, L, L]``, their geometries). ``sizes``: each image's ``(H, W)`` as the store records
    it (from ingest); a JPEG at least twice the canvas is decoded at a reduced scale, no smaller
    than the canvas (several times faster than whole), its geometry still that of its size."""
    canvases = out[: len(paths)]
    geometries = []
    for path, size, canvas in zip(paths, sizes, canvases):
        size = (int(size[0]), int(size[1]))
        rgb = load_rgb(path, at_least=long_side)
        if rgb.shape[:2] != size and not is_reduced_decode(rgb.shape[:2], size):
            raise ValueError(f"{path}: image is {rgb.shape[0]}x{rgb.shape[1]} but was {size[0]}x{size[1]} "
                             f"when ingested; re-run the pipeline to ingest it again")
        geometries.append(preprocess(rgb, long_side, out=canvas, size=size)[1])
    return canvases, geometries


class _ShardBuffer:
    """Normalised float16 features of a shard's rows, held until the shard is complete (or the
    buffer holds :data:`WRITE_BUFFER_BYTES`), then written in one call per run of rows.

    A write into part of a shard rewrites the whole shard file (zarr's sharding), so writing a
    shard batch by batch costs a multiple of writing it once. Used from one thread at a time."""

    def __init__(self, features: zarr.Array, rows: int, projection: Projection | None):
        _, channels, grid, _ = features.shape
        per_row = channels * grid * grid * np.dtype(np.float16).itemsize
        # Each chunk is one image's unit-norm features, never all fill value: zarr's scan of every
        # chunk for that (to skip writing it) is a wasted pass over the data.
        self.features = features.with_config({"write_empty_chunks": True})
        self.projection = projection
        self.values = np.empty((max(1, min(rows, WRITE_BUFFER_BYTES // per_row)), channels, grid, grid), np.float16)
        self.rows: list[int] = []
        self.lock: AbstractContextManager = nullcontext()

    def add(self, rows: list[int], computed: torch.Tensor, lock: AbstractContextManager) -> None:
        """Backbone features of ``rows`` → normalised (projected) float16 rows of the buffer.
        ``lock``: held while writing these rows' shard (every row of the buffer is of one shard
        until :meth:`flush`)."""
        self.lock = lock
        done = 0
        while done < len(rows):
            if len(self.rows) == len(self.values):
                self.flush()
            take = min(len(rows) - done, len(self.values) - len(self.rows))
            slot = torch.from_numpy(self.values[len(self.rows) : len(self.rows) + take])
            with torch.inference_mode():
                part = computed[done : done + take]
                if self.projection is not None:
                    slot.copy_(self.projection.apply(normalised(part)))
                else:  # the arithmetic of normalised(), rounded once, to float16; a few MiB of float32 at a time
                    step = max(1, NORMALISE_BYTES // (part[0].numel() * 4))
                    for i in range(0, take, step):
                        rows32, target = part[i : i + step].to(torch.float32), slot[i : i + step]
                        if rows32.device == target.device:
                            torch.div(rows32, _norms(rows32), out=target)
                        else:  # computed on the accelerator: normalised there, float16 across
                            target.copy_((rows32 / _norms(rows32)).half())
            self.rows += rows[done : done + take]
            done += take

    def flush(self) -> None:
        """Write the buffered rows to the store and empty the buffer."""
        if self.rows:
            with self.lock:
                for lo, hi in _runs(self.rows):
                    offset = self.rows.index(lo)
                    self.features[lo:hi] = self.values[offset : offset + hi - lo]
        self.rows = []


def _finish_block(group: zarr.Group, block_todo: list[int], sizes: np.ndarray,
                  lock: AbstractContextManager) -> None:
    """After a shard's features: its rows' sizes, then ``done`` last, so a row is never marked
    done before its features exist. The small arrays are chunked by shard too, hence ``lock``."""
    runs = _runs(block_todo)
    with lock:
        for lo, hi in runs:
            offset = block_todo.index(lo)
            group["image_hw"][lo:hi] = sizes[offset : offset + hi - lo, 0]
            group["valid_hw"][lo:hi] = sizes[offset : offset + hi - lo, 1]
        for lo, hi in runs:
            group["done"][lo:hi] = True


class _OrderedWriter:
    """Store writes run one at a time, in submission order, on a one-thread ``pool``.

    Once a write fails, the later ones are skipped (a shard's ``done`` is never written after
    its features were lost) and the first error is raised by :meth:`submit` or :meth:`wait`.
    At most ``max_pending`` writes that hold a batch wait: :meth:`submit` blocks beyond that,
    bounding memory. Writes that hold none (a shard's flush and its small arrays) do not count:
    were they counted, the end of every shard would make the forward pass wait for the next
    batch's decoding, queued behind them on the same thread (docs/benchmarks.md, "extraction").
    """

    def __init__(self, pool: ThreadPoolExecutor, max_pending: int):
        self._pool = pool
        self._pending: deque = deque()  # (future, holds a batch)
        self._max_pending = max_pending
        self._failed = False

    def _run(self, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def submit(self, fn, *args, holds_batch: bool = True) -> None:
        self._pending.append((self._pool.submit(self._run, fn, *args), holds_batch))
        while sum(held for _, held in self._pending) > self._max_pending:
            self._pending.popleft()[0].result()

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()

    def close(self) -> None:
        """Drop the writes still queued (after an error elsewhere): they are skipped, not run."""
        self._failed = True


def _check_rows(rows: list[int], n: int, unit: int, where: str | os.PathLike, aligned: bool) -> None:
    """``rows`` must be a contiguous run; when ``aligned``, from a shard boundary to a shard
    boundary (or the end)."""
    if not rows:
        raise ValueError("rows is empty")
    start, stop = rows[0], rows[-1] + 1
    if rows != list(range(start, stop)) or start < 0 or stop > n:
        raise ValueError(f"rows must be a contiguous run inside 0..{n - 1}, got {rows[0]}..{rows[-1]} "
                         f"({len(rows)} rows)")
    if aligned and (start % unit or (stop % unit and stop != n)):
        raise ValueError(f"rows {start}..{stop - 1} do not cover whole shards of {unit} images of the "
                         f"embeddings store {where}; another writer could share a shard: pass shard_lock")


def _runs(sorted_rows: list[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[lo, hi)`` of consecutive values in an increasing list."""
    runs = []
    for r in sorted_rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(lo, hi) for lo, hi in runs]


def _checked_projection(group: zarr.Group, attrs: EmbeddingsAttrs, projection: Projection | None,
                        where: str | os.PathLike) -> Projection | None:
    """The projection to apply: the given one or the store's, consistent with ``attrs.pca``."""
    if attrs.pca is None:
        if projection is not None:
            raise ValueError(f"embeddings store {where} was built without PCA but a projection was given")
        return None
    projection = projection if projection is not None else load_projection(group)
    if projection is None:
        raise StoreValidationError(f"embeddings store {where}: built with pca={attrs.pca} but holds no "
                                   f"projection (arrays 'pca_mean', 'pca_components')")
    if projection.dim != attrs.pca:
        raise ValueError(f"embeddings store {where}: pca={attrs.pca}, projection has dim {projection.dim}")
    return projection
