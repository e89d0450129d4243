"""Dask k-means of embeddings: exact Lloyd, determinism, warm start, valid cells only, sampling."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from fss_core.clustering import (
    assign,
    clustering_images,
    kmeans,
    kmeans_fit,
    nearest_centroid_scores,
    valid_vectors,
)

PAD_VALUE = 1000.0  # written in padding cells and unfinished images: a centroid near it means they were read


def _lloyd(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Textbook Lloyd iterations until the assignment stops changing."""
    labels = None
    while True:
        new_labels = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        if labels is not None and np.array_equal(labels, new_labels):
            return centroids
        labels = new_labels
        centroids = np.stack([x[labels == j].mean(0) for j in range(len(centroids))])


def _store(path, features: np.ndarray, valid_hw: np.ndarray, done: np.ndarray, shard_images: int | None):
    """An embeddings group laid out like the pipeline's: one image per chunk, optional shards."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    n, c, g, _ = features.shape
    shards = None if shard_images is None else (shard_images, c, g, g)
    group.create_array("features", shape=features.shape, dtype="float16", chunks=(1, c, g, g),
                       shards=shards)[:] = features
    group.create_array("valid_hw", shape=(n, 2), dtype="int32")[:] = valid_hw
    group.create_array("done", shape=(n,), dtype="bool")[:] = done
    return group


def _padded_store(tmp_path):
    """Five images on a 4x4 grid with non-square valid regions; padding and the unfinished image hold PAD_VALUE."""
    rng = np.random.default_rng(0)
    valid_hw = np.array([[2, 3], [4, 1], [3, 4], [1, 2], [4, 4]])
    done = np.array([True, True, True, True, False])
    features = np.full((5, 3, 4, 4), PAD_VALUE, dtype=np.float32)
    expected = []
    for i, (r, c) in enumerate(valid_hw):
        cells = rng.normal(size=(3, r, c)) + rng.choice([-2.0, 2.0], size=(1, r, c))
        features[i, :, :r, :c] = cells
        if done[i]:
            expected.append(cells.astype(np.float16).astype(np.float32).reshape(3, -1).T)
    return _store(tmp_path / "emb.zarr", features, valid_hw, done, shard_images=2), np.concatenate(expected)


@pytest.mark.parametrize("as_dask", [True, False])
def test_exact_lloyd_with_trailing_partial_block(as_dask, monkeypatch):
    # 11 rows in blocks of 4, 4, 3: the third cluster lives only in the trailing partial block
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [5, 5], [5, 6], [6, 5], [6, 6],
                  [20, 0], [21, 0], [20, 1]], dtype=np.float32)
    init = np.array([[0, 0], [6, 6], [10, 10]], dtype=np.float32)
    monkeypatch.setattr(kmeans, "NUMPY_BLOCK_ROWS", 4)
    result = kmeans_fit(da.from_array(x, chunks=(4, 2)) if as_dask else x, k=3, init=init, tol=0.0)
    expected = _lloyd(x.astype(np.float64), init.astype(np.float64))
    np.testing.assert_allclose(result.centroids, expected, atol=1e-6)
    assert result.n_points == len(x)
    assert result.converged
    true_inertia = ((x[:, None] - expected[None]) ** 2).sum(-1).min(1).sum()
    assert result.inertia == pytest.approx(true_inertia, rel=1e-6)


def test_same_seed_same_centroids_and_seed_matters():
    x = np.random.default_rng(1).random((4000, 3), dtype=np.float32)
    first = kmeans_fit(x, k=6, seed=7, init_sample=500)
    again = kmeans_fit(x, k=6, seed=7, init_sample=500)
    other = kmeans_fit(x, k=6, seed=8, init_sample=500)
    assert np.array_equal(first.centroids, again.centroids)
    assert first.history == again.history
    assert not np.array_equal(first.centroids, other.centroids)


def test_warm_start_from_true_centroids_converges_at_once():
    rng = np.random.default_rng(2)
    centers = rng.uniform(-50, 50, size=(5, 4)).astype(np.float32)
    x = (centers[rng.integers(0, 5, 6000)] + rng.normal(size=(6000, 4))).astype(np.float32)
    result = kmeans_fit(x, k=5, init=centers)
    assert result.converged and result.n_iter <= 2
    assert np.abs(result.centroids - centers).max() < 0.2


def test_history_decreases_and_inertia_is_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 5)).astype(np.float32)
    result = kmeans_fit(da.from_array(x, chunks=(700, 5)), k=8, init=x[:8], max_iter=30)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.history, result.history[1:]))
    exact = ((x[:, None].astype(np.float64) - result.centroids[None]) ** 2).sum(-1).min(1).sum()
    assert result.inertia == pytest.approx(exact, rel=1e-5)


def test_empty_cluster_is_reseeded_on_the_farthest_row():
    rng = np.random.default_rng(4)
    outlier = np.array([[100.0, 0.0]], dtype=np.float32)
    x = np.concatenate([rng.normal(5, 0.1, size=(200, 2)), rng.normal(-5, 0.1, size=(200, 2)), outlier])
    x = x.astype(np.float32)
    init = np.array([[5, 5], [-5, -5], [500, 500]], dtype=np.float32)  # the last one attracts nothing
    result = kmeans_fit(x, k=3, init=init, tol=0.0)
    assert np.isfinite(result.centroids).all()
    assert (np.bincount(assign(x, result.centroids), minlength=3) > 0).all()
    np.testing.assert_array_equal(result.centroids[2], outlier[0])


def test_reads_only_valid_cells_of_done_images(tmp_path):
    group, expected = _padded_store(tmp_path)
    vectors = valid_vectors(group, images_per_block=2)
    assert vectors.shape == expected.shape
    np.testing.assert_array_equal(vectors.compute(), expected)
    result = kmeans_fit(vectors, k=2, seed=0)
    assert result.n_points == len(expected) == 2 * 3 + 4 * 1 + 3 * 4 + 1 * 2
    assert np.abs(result.centroids).max() < PAD_VALUE / 10


def test_sample_cap_reads_only_sampled_images(tmp_path):
    n, g = 12, 3
    features = np.zeros((n, 2, g, g), dtype=np.float32)
    features[:, 0] = np.arange(n)[:, None, None]  # channel 0 names the image
    valid_hw = np.array([[g, g - i % 2] for i in range(n)])
    group = _store(tmp_path / "emb.zarr", features, valid_hw, np.ones(n, bool), shard_images=None)
    chosen = clustering_images(group, sample_images=4, seed=3)
    assert len(chosen) == 4 and np.array_equal(chosen, clustering_images(group, sample_images=4, seed=3))
    for i in sorted(set(range(n)) - set(chosen.tolist())):  # any read of another image now fails
        (tmp_path / "emb.zarr" / "features" / "c" / str(i) / "0" / "0" / "0").write_bytes(b"not a chunk")
    with pytest.raises(Exception):
        group["features"][int(min(set(range(n)) - set(chosen.tolist())))]
    vectors = valid_vectors(group, images_per_block=5, sample_images=4, seed=3).compute()
    assert sorted(set(vectors[:, 0].astype(int).tolist())) == chosen.tolist()
    assert len(vectors) == int(valid_hw[chosen].prod(axis=1).sum())


def test_distributed_client_gives_the_same_fit(tmp_path):
    distributed = pytest.importorskip("distributed")
    group, _ = _padded_store(tmp_path)
    x = np.random.default_rng(5).normal(size=(2000, 3)).astype(np.float32)
    local_store = kmeans_fit(valid_vectors(group, images_per_block=2), k=3, seed=1)
    local_array = kmeans_fit(x, k=4, seed=1)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        remote_store = kmeans_fit(valid_vectors(group, images_per_block=2), k=3, seed=1, client=client)
        remote_array = kmeans_fit(x, k=4, seed=1, client=client)
    assert np.array_equal(local_store.centroids, remote_store.centroids)
    assert remote_store.n_points == local_store.n_points
    assert np.array_equal(local_array.centroids, remote_array.centroids)


def test_scores_rank_like_nearest_centroid():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(8, 5, 7)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=0, keepdims=True)
    centroids = rng.normal(size=(4, 8)).astype(np.float32) * 0.5
    scores = nearest_centroid_scores(feats, centroids)
    assert scores.shape == (4, 5, 7)
    sq_dist = ((feats[None] - centroids[:, :, None, None]) ** 2).sum(1)
    np.testing.assert_allclose(scores, -sq_dist, atol=1e-5)
    np.testing.assert_array_equal(scores.argmax(0).ravel(), assign(feats.reshape(8, -1).T, centroids))


def test_bad_store_names_the_field(tmp_path):
    group, _ = _padded_store(tmp_path)
    group["valid_hw"][1] = [5, 1]
    with pytest.raises(ValueError, match="valid_hw"):
        valid_vectors(group)
    del group["done"]
    with pytest.raises(ValueError, match="done"):
        valid_vectors(tmp_path / "emb.zarr")
