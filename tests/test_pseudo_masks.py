"""Pseudo masks: original size, no padding artefacts on non-square images, full superpixel vote, resume."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import felzenszwalb

from fss_core.data.images import load_label, save_rgb
from fss_core.embeddings.extract import create_embeddings_store
from fss_core.pseudo.masks import (
    REFERENCE_FELZENSZWALB,
    cluster_map,
    finish_pseudo_masks,
    min_size_for,
    pseudo_mask,
    start_pseudo_masks,
    superpixel_vote,
    write_pseudo_masks,
)
from storage_schemas import FelzenszwalbParams, PseudoMasksMeta

LONG_SIDE, STRIDE, GRID = 64, 8, 8
A, B, PAD = 0, 1, 2
CENTROIDS = np.eye(3, dtype=np.float32)  # cluster k's feature is the unit vector e_k
KEY = "00112233aabbccdd"


def _features(valid_hw: tuple[int, int], split: int, axis: int) -> np.ndarray:
    """[3, G, G]: valid cells before ``split`` along ``axis`` are A, the other valid cells B, padding PAD."""
    r, c = valid_hw
    labels = np.full((GRID, GRID), PAD)
    rows, cols = np.mgrid[:r, :c]
    labels[:r, :c] = np.where((rows, cols)[axis] < split, A, B)
    return np.moveaxis(CENTROIDS[labels], -1, 0).astype(np.float16)


def _two_colour_image(h: int, w: int, boundary: int, axis: int) -> np.ndarray:
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    before = (np.arange(h)[:, None] if axis == 0 else np.arange(w)[None, :]) < boundary
    rgb[:] = np.where(before[..., None], [200, 40, 40], [40, 40, 200])
    return rgb


# (H, W), valid cells (r, c) of the 64-px canvas at stride 8, the A/B split (cells) and its axis
CASES = [((40, 100), (3, 8), 4, 1), ((40, 100), (3, 8), 3, 1), ((100, 40), (8, 3), 4, 0), ((100, 40), (8, 3), 5, 0)]


@pytest.mark.parametrize("image_hw, valid_hw, split, axis", CASES)
def test_non_square_masks_have_original_size_and_no_padding(tmp_path, image_hw, valid_hw, split, axis):
    h, w = image_hw
    new_side = valid_hw[axis] * STRIDE  # the long side is 64 = 8 cells: the split is at split*8 canvas px
    expected = split * STRIDE * image_hw[axis] / new_side  # the A/B boundary in original pixels
    cell = STRIDE * image_hw[axis] / new_side  # one feature cell in original pixels
    features = _features(valid_hw, split, axis)
    coords = np.arange(image_hw[axis])

    raw = cluster_map(features, valid_hw, image_hw, STRIDE, LONG_SIDE, CENTROIDS)
    assert raw.shape == image_hw and PAD not in raw
    line = raw[:, 0] if axis == 0 else raw[0]
    assert set(np.unique(raw)) == {A, B} and (raw == (line[:, None] if axis == 0 else line[None])).all()
    assert (line[coords < expected - 1] == A).all() and (line[coords > expected + 1] == B).all()

    rgb = _two_colour_image(h, w, round(expected), axis)
    store = tmp_path / "e.zarr"
    group = create_embeddings_store(store, ["wide/one"], np.array([image_hw]), 3, GRID, build_key=KEY,
                                    extractor="hand", stride=STRIDE, long_side=LONG_SIDE, shard_size=1)
    assert tuple(group["valid_hw"][0]) == valid_hw
    group["features"][0] = features
    group["done"][0] = True
    save_rgb(tmp_path / "one.png", rgb)
    start_pseudo_masks(tmp_path / "masks", KEY)
    assert write_pseudo_masks([0], store, CENTROIDS, [tmp_path / "one.png"], tmp_path / "masks",
                              REFERENCE_FELZENSZWALB, KEY) == 1
    mask = load_label(tmp_path / "masks" / "wide" / "one.png")
    assert mask.shape == image_hw and PAD not in mask
    line = mask[:, w // 2] if axis == 0 else mask[h // 2]
    assert (line[coords < expected - cell] == A).all() and (line[coords >= expected + cell] == B).all()


def test_vote_covers_every_segment_including_the_last():
    segments = np.array([[0, 0, 1, 1],
                         [0, 0, 1, 2],
                         [3, 3, 2, 2]])
    labels = np.array([[1, 1, 0, 0],
                       [1, 2, 0, 3],
                       [2, 2, 3, 1]])
    voted = superpixel_vote(labels, segments, num_clusters=4)
    assert voted.tolist() == [[1, 1, 0, 0],
                              [1, 1, 0, 3],
                              [2, 2, 3, 3]]  # segment 3, the last id, takes its own majority (2), not 0


def test_last_felzenszwalb_segment_is_voted_in_a_full_mask():
    rgb = _two_colour_image(60, 80, 40, axis=1)
    segments = felzenszwalb(rgb, **REFERENCE_FELZENSZWALB.model_dump())
    assert segments.max() >= 1  # several superpixels, so a skipped last one would show
    features = np.zeros((2, GRID, GRID), dtype=np.float32)
    features[1] = 1.0  # every cell is cluster 1
    mask = pseudo_mask(features, (6, 8), (60, 80), STRIDE, LONG_SIDE, np.eye(2, dtype=np.float32), rgb)
    assert mask.dtype == np.uint8 and mask.shape == (60, 80)
    assert (mask == 1).all()


def test_min_size_scales_with_image_area_only_when_asked():
    params = FelzenszwalbParams(scale=100, sigma=0.8, min_size=200)
    assert min_size_for(params, None, 128, 128) == 200
    assert min_size_for(params, 473, 473, 473) == 200
    assert min_size_for(params, 473, 375, 500) == 200  # full-size images: the reference's 200
    assert min_size_for(params, 473, 96, 128) == round(200 * (128 / 473) ** 2) == 15


@pytest.mark.parametrize("image_hw, valid_hw, split, axis", [((400, 1000), (3, 8), 4, 1), ((1000, 400), (8, 3), 5, 0)])
def test_a_large_image_is_masked_on_its_shrunk_copy_and_the_mask_enlarged(monkeypatch, image_hw, valid_hw, split,
                                                                          axis):
    """Above ``max_side`` the superpixels are cut on the copy shrunk to it, with ``min_size`` in the
    copy's pixels; the mask comes back at the original size with the A/B boundary where the
    full-size computation puts it (within one pixel of the copy)."""
    import fss_core.pseudo.masks as masks

    h, w = image_hw
    new_side = valid_hw[axis] * STRIDE
    expected = split * STRIDE * image_hw[axis] / new_side  # the boundary in original pixels
    rgb = _two_colour_image(h, w, round(expected), axis)
    seen = []
    monkeypatch.setattr(masks, "felzenszwalb", lambda image, **kw: seen.append((image.shape, kw["min_size"]))
                        or felzenszwalb(image, **kw))
    features = _features(valid_hw, split, axis)
    full = pseudo_mask(features, valid_hw, image_hw, STRIDE, LONG_SIDE, CENTROIDS, rgb, area_reference=473)
    shrunk = pseudo_mask(features, valid_hw, image_hw, STRIDE, LONG_SIDE, CENTROIDS, rgb, area_reference=473,
                         max_side=250)
    copy = (100, 250) if axis == 1 else (250, 100)  # 250 px on the longer side
    assert seen == [((h, w, 3), 200), ((*copy, 3), round(200 * (250 / 473) ** 2))]
    assert shrunk.shape == full.shape == image_hw and shrunk.dtype == np.uint8
    step = image_hw[axis] / 250  # one pixel of the copy, in original pixels
    differ = np.nonzero((shrunk != full).any(axis=1 - axis))[0]
    assert differ.size == 0 or np.abs(differ - expected).max() <= step + 1, (differ, expected)


def test_area_thresholds_count_in_the_shrunk_copys_pixels_above_max_side():
    from fss_core.geometry import scaled_min_area, working_size

    assert working_size(3000, 4000, 640) == (480, 640) and working_size(375, 500, 640) == (375, 500)
    assert working_size(3000, 4000, None) == (3000, 4000)
    assert scaled_min_area(2048, 473, 3000, 4000, 640) == round(2048 * (4000 / 640) ** 2)  # 2048 px of the copy
    assert scaled_min_area(2048, 473, 3000, 4000) == 2048  # no max_side: the reference's absolute 2048 px
    assert scaled_min_area(2048, 473, 375, 500, 640) == 2048  # PASCAL- and COCO-sized: unchanged
    assert scaled_min_area(2048, 473, 96, 128, 640) == round(2048 * (128 / 473) ** 2)
    # a copy below area_reference takes the small-image scaling as well, in its own pixels
    assert scaled_min_area(2048, 473, 1000, 1000, 200) == round(2048 * (1000 / 200) ** 2 * (200 / 473) ** 2)


def test_masks_resume_only_within_the_same_build(tmp_path):
    rng = np.random.default_rng(0)
    store = tmp_path / "e.zarr"
    group = create_embeddings_store(store, ["a", "b"], np.array([[30, 40], [40, 30]]), 3, GRID, build_key=KEY,
                                    extractor="hand", stride=STRIDE, long_side=LONG_SIDE, shard_size=2)
    features = rng.normal(size=(2, 3, GRID, GRID))
    group["features"][:] = features / np.linalg.norm(features, axis=1, keepdims=True)
    group["done"][:] = True
    paths = []
    for name, hw in (("a", (30, 40)), ("b", (40, 30))):
        save_rgb(tmp_path / f"{name}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        paths.append(tmp_path / f"{name}.png")
    out = tmp_path / "masks"
    params = REFERENCE_FELZENSZWALB

    assert start_pseudo_masks(out, KEY) is False
    assert write_pseudo_masks([0], store, CENTROIDS, paths[:1], out, params, KEY) == 1  # then killed
    assert not (out / "meta.json").exists()
    assert write_pseudo_masks([0, 1], store, CENTROIDS, paths, out, params, KEY) == 1  # resumed: "a" kept
    finish_pseudo_masks(out, PseudoMasksMeta(build_key=KEY, num_clusters=3, felzenszwalb=params, image_count=2))
    assert start_pseudo_masks(out, KEY) is True
    assert write_pseudo_masks([0, 1], store, CENTROIDS, paths, out, params, KEY) == 0

    other = "ffeeddccbbaa9988"
    assert start_pseudo_masks(out, other) is False
    assert not (out / "meta.json").exists()  # never looks complete while being rewritten
    assert write_pseudo_masks([0, 1], store, CENTROIDS, paths, out, params, other) == 2


def test_unextracted_row_is_refused(tmp_path):
    store = tmp_path / "e.zarr"
    create_embeddings_store(store, ["a"], np.array([[30, 40]]), 3, GRID, build_key=KEY, extractor="hand",
                            stride=STRIDE, long_side=LONG_SIDE, shard_size=1)
    save_rgb(tmp_path / "a.png", np.zeros((30, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="not extracted"):
        write_pseudo_masks([0], store, CENTROIDS, [tmp_path / "a.png"], tmp_path / "m", REFERENCE_FELZENSZWALB, KEY)


def test_a_new_build_removes_the_quality_report_of_the_previous_one(tmp_path):
    out = tmp_path / "masks"
    start_pseudo_masks(out, KEY)
    finish_pseudo_masks(out, PseudoMasksMeta(build_key=KEY, num_clusters=3, felzenszwalb=REFERENCE_FELZENSZWALB,
                                             image_count=0))
    (out / "quality.json").write_text("{}")
    assert start_pseudo_masks(out, KEY) is True
    assert (out / "quality.json").exists()  # the complete build keeps its report
    assert start_pseudo_masks(out, "ffeeddccbbaa9988") is False
    assert not (out / "quality.json").exists()


def test_quality_after_a_kill_between_meta_and_report_is_the_new_builds(tmp_path):
    """Build A, then build B killed after its meta.json but before its quality.json: the rerun
    of B reports B's quality, never A's."""
    from fss_core.config import load_config
    from fss_core.pseudo.quality import evaluate_pseudo_masks
    from tasks.cluster import run_cluster
    from tasks.extract import extract_block, finish_extraction, prepare_extraction
    from tasks.ingest import run_ingest, training_rows
    from tasks.pseudo import (
        _Labelled,
        dataset_num_classes,
        felzenszwalb_params,
        finish_pseudo,
        prepare_pseudo,
        pseudo_block,
    )
    from tasks.workspace import source_root
    from tests.tiny_config import TINY

    ws = tmp_path / "ws"

    def config(*extra):
        return load_config(None, [*TINY, f"runtime.workspace={ws}", "runtime.n_workers=1", *extra])

    def write_masks(cfg):
        plan = prepare_pseudo(cfg, cluster_key)
        for rows, paths in zip(plan.blocks, plan.paths):
            pseudo_block(cfg, plan.build_key, rows, paths)
        return plan

    cfg_a, cfg_b = config(), config("pseudo.felzenszwalb_scale=20")
    run_ingest(cfg_a)
    extraction = prepare_extraction(cfg_a)
    for rows, paths in zip(extraction.blocks, extraction.paths):
        extract_block(cfg_a, extraction.backbone, rows, paths)
    extraction = finish_extraction(cfg_a, extraction, [0])
    cluster_key = run_cluster(cfg_a, extraction.output_key).build_key

    quality_a = finish_pseudo(cfg_a, write_masks(cfg_a))
    report_a = (ws / "pseudo_masks" / "quality.json").read_text()
    plan_b = write_masks(cfg_b)
    finish_pseudo_masks(ws / "pseudo_masks", PseudoMasksMeta(  # killed here, before quality.json
        build_key=plan_b.build_key, num_clusters=cfg_b.cluster.num_clusters,
        felzenszwalb=felzenszwalb_params(cfg_b), image_count=len(plan_b.image_ids)), plan_b.image_ids)

    rerun = prepare_pseudo(cfg_b, cluster_key)
    assert rerun.complete
    quality_b = finish_pseudo(cfg_b, rerun)
    root = source_root(cfg_b)
    labelled = [_Labelled(r.image_id, root / r.label_path) for r in training_rows(cfg_b) if r.label_path]
    truth = evaluate_pseudo_masks(ws / "pseudo_masks", labelled, cfg_b.cluster.num_clusters,
                                  dataset_num_classes(cfg_b) + 1, seed=cfg_b.cluster.seed)
    assert truth.miou != quality_a.miou  # the two builds are told apart
    assert (quality_b.miou, quality_b.pixel_accuracy) == (truth.miou, truth.pixel_accuracy)
    assert finish_pseudo(cfg_b, prepare_pseudo(cfg_b, cluster_key)) == quality_b  # the report is kept for B
    (ws / "pseudo_masks" / "quality.json").write_text(report_a)  # A's report next to B's masks, however it got there
    assert finish_pseudo(cfg_b, prepare_pseudo(cfg_b, cluster_key)) == quality_b


def test_a_large_jpeg_is_decoded_small_for_its_mask_and_the_mask_has_the_original_size(tmp_path, monkeypatch):
    import fss_core.pseudo.masks as masks

    image_hw, valid_hw, split, axis = (400, 1000), (3, 8), 4, 1
    expected = split * STRIDE * image_hw[axis] / (valid_hw[axis] * STRIDE)  # 500: the A/B boundary
    rgb = _two_colour_image(*image_hw, round(expected), axis)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    store = tmp_path / "e.zarr"
    group = create_embeddings_store(store, ["photo"], np.array([image_hw]), 3, GRID, build_key=KEY,
                                    extractor="hand", stride=STRIDE, long_side=LONG_SIDE, shard_size=1)
    group["features"][0] = _features(valid_hw, split, axis)
    group["done"][0] = True
    decoded = []
    real_load = masks.load_rgb
    monkeypatch.setattr(masks, "load_rgb", lambda path, **kw: decoded.append(real_load(path, **kw).shape) or
                        real_load(path, **kw))
    start_pseudo_masks(tmp_path / "masks", KEY)
    write_pseudo_masks([0], store, CENTROIDS, [tmp_path / "photo.jpg"], tmp_path / "masks", REFERENCE_FELZENSZWALB,
                       KEY, area_reference=473, max_side=100)
    assert decoded == [(50, 125, 3)]  # 1/8 of 400x1000: the smallest decode keeping 100 px on the longer side
    mask = load_label(tmp_path / "masks" / "photo.png")
    assert mask.shape == image_hw
    line = mask[200]
    assert (line[: int(expected) - 10] == A).all() and (line[int(expected) + 10:] == B).all()
