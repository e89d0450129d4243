"""Pseudo task index: valid pseudo-classes, prototypes, the similarity prior, the tasks store."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from fss_core.data.images import save_label
from fss_core.geometry import PadGeometry, pad_geometry
from fss_core.pseudo.task_index import (
    PseudoTaskIndex,
    build_task_index,
    masked_mean_prototypes,
    scaled_min_area,
    similarity_prior,
    valid_pseudo_classes,
)

C = 5


# --- valid pseudo-classes -------------------------------------------------------------------

def test_valid_classes_reject_stripes_and_small_blobs_and_keep_blobs_with_exact_area():
    mask = np.zeros((40, 60), dtype=np.uint8)  # cluster 0 fills the rest and every column: background-like
    mask[10:14, :] = 1  # full-width stripe
    mask[30:33, 2:5] = 3  # 9 px, below min_area
    mask[18:28, 5:17] = 4  # proper blob, 10 x 12
    mask[30:38, 20:35] = 5  # proper blob, 8 x 15
    assert valid_pseudo_classes(mask, min_area=20) == [(4, 120), (5, 120)]
    assert valid_pseudo_classes(mask, min_area=121) == []


def test_background_span_is_fewer_than_one_percent_empty_rows_or_columns():
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[1:, 40:60] = 1  # 99 of 100 rows: 1 % empty, not fewer -> kept
    mask[:, 70:80] = 2  # full-height stripe -> background-like
    assert [c for c, _ in valid_pseudo_classes(mask, min_area=1)] == [1]
    assert [c for c, _ in valid_pseudo_classes(mask.T, min_area=1)] == [1]  # the same rule on columns


def test_ignore_label_is_never_a_class():
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[5:15, 5:15] = 255
    mask[20:30, 20:30] = 3
    assert valid_pseudo_classes(mask, min_area=1) == [(3, 100)]


def test_min_area_is_the_references_on_full_size_images_and_scaled_on_small_ones():
    assert scaled_min_area(2048, 473, 473, 473) == 2048
    assert scaled_min_area(2048, 473, 375, 500) == 2048  # a PASCAL image: the published 2·32·32
    assert scaled_min_area(2048, 473, 946, 473) == 2048  # larger images are not held to more
    assert scaled_min_area(2048, 473, 96, 128) == round(2048 * (128 / 473) ** 2) == 150
    assert scaled_min_area(2048, None, 100, 100) == 2048
    assert scaled_min_area(1, 473, 10, 10) == 1


# --- prototypes -------------------------------------------------------------------------------

def brute_force_mean(features: np.ndarray, mask: np.ndarray, cluster: int) -> np.ndarray:
    """Masked mean when the cells tile the image evenly (stride 8: ``r·8 = new_h`` always).

    Supersample both to a common grid (H·r × W·c) where every cell and pixel is whole.
    """
    (_, r, c), (h, w) = features.shape, mask.shape
    fine_mask = np.repeat(np.repeat(mask == cluster, r, axis=0), c, axis=1)
    fine_feat = np.repeat(np.repeat(features.astype(np.float64), h, axis=1), w, axis=2)
    return fine_feat[:, fine_mask].mean(axis=1)


def canvas_counts(pixels: int, new: int, cells: int, stride: int) -> np.ndarray:
    """``[pixels, cells]`` integers: overlap of each original pixel with each cell on the canvas.

    Counted on a grid of 1/``pixels`` canvas rows: pixel ``y`` covers fine steps
    ``[y·new, (y+1)·new)`` (canvas rows ``[y, y+1)·new/pixels``) and cell ``i`` covers
    ``[i·stride·pixels, (i+1)·stride·pixels)``; steps past the last cell count to it.
    """
    fine = np.arange(new * pixels)
    counts = np.zeros((pixels, cells), dtype=np.int64)
    np.add.at(counts, (fine // new, np.minimum(fine // (stride * pixels), cells - 1)), 1)
    return counts


def canvas_brute_force_mean(features: np.ndarray, mask: np.ndarray, cluster: int, stride: int,
                            long_side: int) -> np.ndarray:
    """Masked mean over the region placed on the canvas, each cell weighted by its exact overlap."""
    (_, r, c), (h, w) = features.shape, mask.shape
    geometry = pad_geometry(h, w, long_side)
    rows = canvas_counts(h, geometry.new_h, r, stride)
    cols = canvas_counts(w, geometry.new_w, c, stride)
    weights = rows.T @ (mask == cluster).astype(np.int64) @ cols  # [r, c]
    return np.einsum("kij,ij->k", features.astype(np.float64), weights) / weights.sum()


def cells_of(h: int, w: int, stride: int, long_side: int) -> tuple[int, int]:
    return pad_geometry(h, w, long_side).valid_cells(stride)


@pytest.mark.parametrize("hw, long_side", [((40, 60), 48), ((35, 50), 48), ((23, 31), 40), ((48, 64), 64)])
def test_prototype_at_stride_8_is_the_masked_mean_over_evenly_spread_cells(hw, long_side):
    # stride 8 on sides floored to a multiple of 8: the cells tile the image exactly (unchanged by the fix)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((C, *cells_of(*hw, 8, long_side))).astype(np.float32)
    mask = rng.integers(0, 3, size=hw).astype(np.uint8)
    mask[: hw[0] // 2, : hw[1] // 2] = 1
    got = masked_mean_prototypes(features, mask, [0, 1, 2], stride=8, long_side=long_side)
    for i, cluster in enumerate([0, 1, 2]):
        np.testing.assert_allclose(got[i], brute_force_mean(features, mask, cluster), rtol=1e-5, atol=1e-6)


def test_prototype_weights_exactly_the_canvas_cells_the_region_occupies_at_stride_32():
    # 200x472 at long side 473: pasted unscaled (new 200x472), 7x15 cells of 32 px. The last
    # cell row covers canvas rows 192..223, of which only 192..199 are image; the last cell
    # column covers 448..479, of which 448..471 are image.
    h, w = 200, 472
    assert pad_geometry(h, w, 473) == PadGeometry(h, w, 200, 472, 473)
    features = np.random.default_rng(3).standard_normal((C, 7, 15)).astype(np.float32)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[150:171, 440:472] = 1  # rows 150..170, columns 440..471
    # rows: 150..159 in cell 4 (10 rows), 160..170 in cell 5 (11); columns: 440..447 in cell 13 (8),
    # 448..471 in cell 14 (24)
    weights = {(4, 13): 10 * 8, (4, 14): 10 * 24, (5, 13): 11 * 8, (5, 14): 11 * 24}
    expected = sum(n * features[:, i, j].astype(np.float64) for (i, j), n in weights.items()) / (21 * 32)
    got = masked_mean_prototypes(features, mask, [1], stride=32, long_side=473)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)


def test_prototype_of_the_audit_case_places_rows_where_the_image_puts_them():
    # the audit's check: a 200x473 image at stride 32 (7x15 cells), region on rows 150..170;
    # with feature = cell row, the prototype is the region's mean cell row (10·4 + 11·5) / 21
    h, w = 200, 473
    r, c = cells_of(h, w, 32, 473)
    assert (r, c) == (7, 15)
    features = np.broadcast_to(np.arange(r, dtype=np.float32)[None, :, None], (1, r, c)).copy()
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[150:171] = 1
    got = masked_mean_prototypes(features, mask, [1], stride=32, long_side=473)
    assert got[0, 0] == pytest.approx(95 / 21, rel=1e-6)  # 4.524, not the 5.0 of cells stretched over the image


@pytest.mark.parametrize("hw, stride, long_side", [
    ((200, 473), 32, 473),  # resnet50 / moco_v2
    ((473, 300), 32, 473),
    ((23, 31), 16, 40),  # new 24x40 under 2x3 cells of 16: both last rows/columns part padding
    ((333, 500), 16, 473),  # dino_vits16 on a 473 canvas
    ((50, 101), 32, 100),  # new 48x96: the last cell row is half padding
])
def test_prototype_is_the_overlap_weighted_mean_of_canvas_cells(hw, stride, long_side):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((C, *cells_of(*hw, stride, long_side))).astype(np.float32)
    mask = rng.integers(0, 3, size=hw).astype(np.uint8)
    mask[hw[0] // 3:, hw[1] // 2:] = 1
    got = masked_mean_prototypes(features, mask, [0, 1, 2], stride=stride, long_side=long_side)
    for i, cluster in enumerate([0, 1, 2]):
        np.testing.assert_allclose(got[i], canvas_brute_force_mean(features, mask, cluster, stride, long_side),
                                   rtol=1e-5, atol=1e-6)


def test_a_floored_patch_grid_gives_the_uncovered_image_edge_to_the_last_cell():
    # 333x500 at 473, patch 16: the image is 312x472 on the canvas, but a ViT sees only
    # floor(473/16) = 29 patch columns (canvas 0..463); columns past 463 belong to patch 28
    h, w = 333, 500
    assert cells_of(h, w, 16, 473) == (20, 30)
    features = np.random.default_rng(4).standard_normal((C, 20, 29)).astype(np.float32)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, 495:] = 1  # canvas columns ≥ 467.4: no patch of their own
    mask[100:110, :495] = 2  # the rest of the width, ending in the uncovered strip too
    got = masked_mean_prototypes(features, mask, [1, 2], stride=16, long_side=473)
    expected = canvas_brute_force_mean(features, mask, 1, 16, 473)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)
    # every cell row of patch column 28 in proportion to its image rows: 16 each, 8 in the last (304..311)
    row_weights = [16] * 19 + [8]
    np.testing.assert_allclose(got[0], np.average(features[:, :, 28], axis=1, weights=row_weights),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], canvas_brute_force_mean(features, mask, 2, 16, 473), rtol=1e-5, atol=1e-6)


def test_prototype_refuses_cells_that_do_not_fit_the_geometry():
    mask = np.zeros((200, 473), dtype=np.uint8)
    with pytest.raises(ValueError, match="stride 16"):  # 7x15 cells are a stride-32 grid
        masked_mean_prototypes(np.zeros((C, 7, 15), np.float32), mask, [0], stride=16, long_side=473)


# --- similarity prior -------------------------------------------------------------------------

def brute_force_prior(unit: np.ndarray, members: np.ndarray, i: int, k: int) -> list[int]:
    others = [j for j in members if j != i]
    sims = [float(unit[i] @ unit[j]) for j in others]
    return [others[t] for t in np.argsort(sims)[::-1][:k]]


def test_prior_length_rule_and_most_similar_first():
    rng = np.random.default_rng(1)
    sizes = {0: 7, 1: 45, 2: 30, 3: 1}
    occ_cluster = rng.permutation(np.concatenate([[c] * n for c, n in sizes.items()])).astype(np.int16)
    protos = rng.standard_normal((len(occ_cluster), 8)).astype(np.float32)
    offsets, rows = similarity_prior(occ_cluster, protos, prior_max=20, prior_candidates=1000)
    # n < 20: every other member; n >= 20: floor(n/2), capped by prior_max
    expected_k = {0: 6, 1: 20, 2: 15, 3: 0}
    unit = protos.astype(np.float64) / np.linalg.norm(protos, axis=1, keepdims=True)
    for i, c in enumerate(occ_cluster):
        got = rows[offsets[i]:offsets[i + 1]].tolist()
        assert len(got) == expected_k[int(c)]
        assert got == brute_force_prior(unit, np.flatnonzero(occ_cluster == c), i, expected_k[int(c)])


def test_prior_searches_a_seeded_candidate_subset_for_large_clusters():
    rng = np.random.default_rng(2)
    occ_cluster = np.zeros(60, dtype=np.int16)
    protos = rng.standard_normal((60, 4)).astype(np.float32)
    offsets, rows = similarity_prior(occ_cluster, protos, prior_max=100, prior_candidates=25, seed=3)
    lists = [rows[offsets[i]:offsets[i + 1]] for i in range(60)]
    assert all(len(x) == 24 for x in lists)
    assert all(i not in x for i, x in enumerate(lists))
    assert len(set(np.concatenate(lists).tolist())) == 25  # one candidate subset for the whole cluster
    again = similarity_prior(occ_cluster, protos, prior_max=100, prior_candidates=25, seed=3)
    other = similarity_prior(occ_cluster, protos, prior_max=100, prior_candidates=25, seed=4)
    assert np.array_equal(again[1], rows)
    assert not np.array_equal(other[1], rows)


# --- build from masks + an embeddings store --------------------------------------------------

def make_store(tmp_path, masks: dict[str, np.ndarray], valid: dict[str, tuple[int, int]], grid: int = 6,
               stride: int = 8, long_side: int = 48):
    rng = np.random.default_rng(5)
    ids = list(masks)
    features = rng.standard_normal((len(ids), C, grid, grid)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    group = zarr.open_group(tmp_path / "embeddings.zarr", mode="w", zarr_format=3)
    group.create_array("features", data=features.astype(np.float16), chunks=(1, C, grid, grid))
    group.create_array("valid_hw", data=np.asarray([valid[i] for i in ids], dtype=np.int32))
    group.create_array("image_hw", data=np.asarray([masks[i].shape for i in ids], dtype=np.int32))
    group.attrs.update({"image_ids": ids, "stride": stride, "input_long_side": long_side})
    mask_dir = tmp_path / "masks"
    for image_id, mask in masks.items():
        save_label(mask_dir / f"{image_id}.png", mask)
    return group, mask_dir


def blob_mask(h: int, w: int, blobs: dict[int, tuple[slice, slice]]) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    for cluster, window in blobs.items():
        mask[window] = cluster
    return mask


@pytest.fixture
def small_store(tmp_path):
    masks = {
        "b": blob_mask(40, 60, {1: np.s_[5:20, 5:30], 2: np.s_[25:38, 30:55]}),
        "a": blob_mask(35, 50, {1: np.s_[2:30, 10:20], 3: np.s_[1:3, 40:42]}),  # cluster 3: 4 px, too small
        "c": blob_mask(40, 60, {}),  # only background: no occurrence
        "d": blob_mask(40, 48, {2: np.s_[10:30, 10:30], 1: np.s_[32:39, 0:40]}),
    }
    valid = {"b": (4, 6), "a": (4, 6), "c": (4, 6), "d": (5, 6)}  # stride 8 on a 48 canvas
    assert valid == {i: cells_of(*m.shape, 8, 48) for i, m in masks.items()}
    group, mask_dir = make_store(tmp_path, masks, valid)
    return group, mask_dir, masks, valid


def test_build_lists_every_valid_occurrence_with_area_and_prototype(small_store):
    group, mask_dir, masks, valid = small_store
    index = build_task_index(mask_dir, group, ["d", "a", "b", "c"], num_clusters=4, min_area=20,
                             area_reference=None)
    assert index.image_ids == ["b", "a", "c", "d"]  # the store's row order
    occurrences = [(index.image_ids[i], int(c), int(a))
                   for i, c, a in zip(index.occ_image, index.occ_cluster, index.occ_area)]
    assert occurrences == [("b", 1, 375), ("b", 2, 325), ("a", 1, 280), ("d", 1, 280), ("d", 2, 400)]
    features = group["features"][...].astype(np.float32)
    store_row = {image_id: n for n, image_id in enumerate(group.attrs["image_ids"])}
    for row, (image_id, cluster, _) in enumerate(occurrences):
        r, c = valid[image_id]
        block = features[store_row[image_id], :, :r, :c]
        np.testing.assert_allclose(index.occ_prototype[row], brute_force_mean(block, masks[image_id], cluster),
                                   rtol=1e-5, atol=1e-6)
    # cluster 1 has three members: each lists the two others; cluster 2 has two
    for row in range(index.num_occurrences):
        members = {r for r in range(index.num_occurrences) if index.occ_cluster[r] == index.occ_cluster[row]}
        assert set(index.prior(row).tolist()) == members - {row}


def test_build_places_prototypes_with_the_store_stride_and_long_side(tmp_path):
    masks = {"x": blob_mask(200, 473, {1: np.s_[150:171, 100:300], 2: np.s_[20:60, 400:473]})}
    group, mask_dir = make_store(tmp_path, masks, {"x": (7, 15)}, grid=15, stride=32, long_side=473)
    index = build_task_index(mask_dir, group, ["x"], num_clusters=4, min_area=20, area_reference=None)
    assert index.occ_cluster.tolist() == [1, 2]
    block = group["features"][0, :, :7, :15].astype(np.float32)
    for row, cluster in enumerate([1, 2]):
        np.testing.assert_allclose(index.occ_prototype[row],
                                   canvas_brute_force_mean(block, masks["x"], cluster, 32, 473), rtol=1e-5, atol=1e-6)
    del group.attrs["stride"]
    with pytest.raises(ValueError, match="stride"):
        build_task_index(mask_dir, group, ["x"], num_clusters=4, min_area=20)


def test_build_is_deterministic_and_round_trips_through_the_tasks_store(small_store, tmp_path):
    group, mask_dir, _, _ = small_store
    kwargs = dict(num_clusters=4, min_area=20, area_reference=None, seed=7)
    index = build_task_index(mask_dir, group, ["a", "b", "c", "d"], **kwargs)
    again = build_task_index(mask_dir, group, ["a", "b", "c", "d"], **kwargs)
    index.save(tmp_path / "tasks.zarr", build_key="0123456789abcdef")
    loaded = PseudoTaskIndex.load(tmp_path / "tasks.zarr")
    for other in (again, loaded):
        assert other.image_ids == index.image_ids and other.num_clusters == index.num_clusters
        for name in ("occ_image", "occ_cluster", "occ_area", "occ_prototype", "prior_offsets", "prior_rows"):
            assert np.array_equal(getattr(other, name), getattr(index, name)), name
            assert getattr(other, name).dtype == getattr(index, name).dtype, name


def test_min_area_is_scaled_for_small_images(small_store):
    group, mask_dir, _, _ = small_store
    # 35000 px at full size is 35000·(50/473)² = 391 px on the 35x50 image, which its 280 px
    # blob fails, and 35000·(48/473)² = 360 px on the 40x48 one, which its 400 px blob passes
    index = build_task_index(mask_dir, group, ["a", "d"], num_clusters=4, min_area=35000, area_reference=473)
    assert sorted(zip(index.occ_image.tolist(), index.occ_cluster.tolist())) == [(1, 2)]  # d's 400 px blob


def test_min_area_counts_in_the_shrunk_copys_pixels_for_images_above_max_side(tmp_path):
    """On a 200x473 image with max_side 100 (its copy 42x100), min_area 20 means 20 px of the copy,
    20·(473/100)² = 447 px here: the 800 px blob counts, the 400 px one only without max_side."""
    masks = {"x": blob_mask(200, 473, {1: np.s_[10:30, 10:50], 2: np.s_[100:120, 300:320]})}
    group, mask_dir = make_store(tmp_path, masks, {"x": (7, 15)}, grid=15, stride=32, long_side=473)
    kwargs = dict(num_clusters=4, min_area=20, area_reference=None)
    assert build_task_index(mask_dir, group, ["x"], **kwargs).occ_cluster.tolist() == [1, 2]
    assert build_task_index(mask_dir, group, ["x"], max_side=100, **kwargs).occ_cluster.tolist() == [1]


def test_bad_masks_fail_with_the_file_named(tmp_path):
    group, mask_dir = make_store(tmp_path, {"x": blob_mask(40, 60, {5: np.s_[5:20, 5:30]})}, {"x": (4, 6)})
    with pytest.raises(ValueError, match=r"x\.png.*num_clusters"):
        build_task_index(mask_dir, group, ["x"], num_clusters=4, min_area=20)
    group["image_hw"][0] = [41, 60]
    with pytest.raises(ValueError, match=r"x\.png.*41x60"):
        build_task_index(mask_dir, group, ["x"], num_clusters=8, min_area=20)
    with pytest.raises(ValueError, match="not in the store"):
        build_task_index(mask_dir, group, ["nope"], num_clusters=8, min_area=20)


def test_holdout_split_keeps_images_disjoint_and_priors_inside_each_part():
    import numpy as np

    from fss_core.pseudo.task_index import PseudoTaskIndex

    rng = np.random.default_rng(0)
    m = 40
    occ_image = np.repeat(np.arange(20), 2).astype(np.int32)
    occ_cluster = np.tile([0, 1], 20).astype(np.int16)
    rows, offsets = [], [0]
    for r in range(m):  # each occurrence's prior: every other occurrence of its cluster, shuffled
        same = [x for x in np.flatnonzero(occ_cluster == occ_cluster[r]) if x != r]
        rows.extend(rng.permutation(same))
        offsets.append(len(rows))
    index = PseudoTaskIndex([f"im{i}" for i in range(20)], 2, 1, 0.99, 10, 100, occ_image, occ_cluster,
                            np.ones(m, np.int64), rng.normal(size=(m, 4)).astype(np.float32),
                            np.array(offsets, np.int64), np.array(rows, np.int32))
    train, held = index.split_holdout(0.2, seed=1)
    assert set(train.occ_image) & set(held.occ_image) == set()
    assert len(set(held.occ_image)) == 4 and train.num_occurrences + held.num_occurrences == m
    for part in (train, held):
        for r in range(part.num_occurrences):
            prior = part.prior_rows[part.prior_offsets[r]:part.prior_offsets[r + 1]]
            assert all(part.occ_cluster[p] == part.occ_cluster[r] and p != r for p in prior)
            assert len(prior) == int((part.occ_cluster == part.occ_cluster[r]).sum()) - 1  # nothing lost
