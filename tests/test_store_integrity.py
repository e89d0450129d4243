"""Stores are never misread: another schema version or another build is refused with a message
naming both, a whole-store rebuild is swapped in only once finished, and a half-written store is
rebuilt or resumed, never taken as whole. (Kills at random points: tests/test_crash_resume.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from fss_core.config import load_config
from fss_core.embeddings.extract import create_embeddings_store
from fss_core.embeddings.pca import Projection, load_projection, save_projection
from fss_core.pseudo.masks import finish_pseudo_masks, start_pseudo_masks
from storage_schemas import (
    CLUSTERS,
    EMBEDDINGS,
    ClustersAttrs,
    FelzenszwalbParams,
    PseudoMasksMeta,
    StoreKeyError,
    StoreValidationError,
    StoreVersionError,
    create_store,
    open_store,
    remove_stale_builds,
    store_build,
    write_json_meta,
)

KEY, OTHER = "0123456789abcdef", "fedcba9876543210"
PARAMS = FelzenszwalbParams(scale=100, sigma=0.8, min_size=20)


def clusters_store(path, key: str = KEY, centroid: float = 1.0):
    attrs = ClustersAttrs(build_key=key, num_clusters=2, seed=0, iterations=1, inertia=0.0, points_used=4,
                          images_sampled=1, converged=True, image_ids=["a"])
    group = create_store(path, CLUSTERS, {"cluster": 2, "channel": 3, "image": 1, "row": 2, "col": 2}, attrs)
    group["centroids"][:] = centroid
    return group


def embeddings_store(path, key: str = KEY):
    return create_embeddings_store(path, ["a", "b"], np.array([[30, 40], [40, 30]]), 3, 4, build_key=key,
                                   extractor="hand", stride=8, long_side=32, shard_size=2)


# ------------------------------------------------------------------ another build, another version


def test_a_store_of_another_build_is_refused_naming_both_keys(tmp_path):
    clusters_store(tmp_path / "clusters.zarr", key=KEY)
    with pytest.raises(StoreKeyError) as err:
        open_store(tmp_path / "clusters.zarr", CLUSTERS, build_key=OTHER)
    assert f"was built with build key {KEY}, this run expects {OTHER}" in str(err.value)
    assert "another config" in str(err.value)
    open_store(tmp_path / "clusters.zarr", CLUSTERS, build_key=KEY)  # the right key opens


def test_extraction_refuses_a_store_of_another_schema_version_instead_of_rebuilding_it(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = embeddings_store(path)
    group["done"][:] = True
    group.attrs["schema_version"] = 2  # written by a newer release of the code
    with pytest.raises(StoreVersionError, match="schema_version 2, this code reads 1"):
        embeddings_store(path)
    assert zarr.open_group(str(path), mode="r")["done"][:].all()  # left as it was


def test_pseudo_masks_of_another_schema_version_are_refused_not_deleted(tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    (out / "a.png").write_bytes(b"png")
    meta = PseudoMasksMeta(build_key=KEY, num_clusters=2, felzenszwalb=PARAMS, image_count=1).model_dump(mode="json")
    (out / "meta.json").write_text(json.dumps({**meta, "schema_version": 7}))
    with pytest.raises(StoreVersionError, match="schema_version 7, this code reads 1"):
        start_pseudo_masks(out, OTHER)
    assert (out / "a.png").exists()


def test_pipeline_readers_refuse_stores_of_another_build(tmp_path):
    """Pseudo masks are never drawn from other clusters, the task index never from other masks,
    and extraction never reports another build's store as its own."""
    from tasks.extract import ExtractPlan, finish_extraction
    from tasks.pseudo import pseudo_block
    from tasks.task_index import run_task_index

    ws = tmp_path / "ws"
    cfg = load_config(None, [f"runtime.workspace={ws}"])
    clusters_store(ws / "clusters.zarr", key=KEY)
    with pytest.raises(StoreKeyError, match=f"clusters store at .*build key {KEY}.*build {OTHER}"):
        pseudo_block(cfg, OTHER, [0], [str(tmp_path / "a.png")])

    write_json_meta(ws / "pseudo_masks" / "meta.json",
                    PseudoMasksMeta(build_key=KEY, num_clusters=2, felzenszwalb=PARAMS, image_count=1))
    with pytest.raises(StoreKeyError, match=f"build key {KEY}, this run expects {OTHER}"):
        run_task_index(cfg, OTHER, ["a"])
    assert not (ws / "tasks.zarr").exists()

    embeddings_store(ws / "embeddings.zarr", key=KEY)
    plan = ExtractPlan(OTHER, OTHER, None, [], [], 2)
    with pytest.raises(StoreKeyError, match=f"build key {KEY}, this run expects {OTHER}"):
        finish_extraction(cfg, plan, [])


# ------------------------------------------------------------------ whole-store builds


def test_a_failed_rebuild_leaves_the_previous_store_readable(tmp_path):
    path = tmp_path / "clusters.zarr"
    clusters_store(path, key=KEY, centroid=1.0)
    with pytest.raises(RuntimeError, match="killed"):
        with store_build(path) as staging:
            clusters_store(staging, key=OTHER, centroid=2.0)
            raise RuntimeError("killed half way")
    group = open_store(path, CLUSTERS, build_key=KEY)
    assert (group["centroids"][:] == 1.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters.zarr"]  # no staging folder left

    with store_build(path) as staging:
        clusters_store(staging, key=OTHER, centroid=2.0)
        assert (open_store(path, CLUSTERS)["centroids"][:] == 1.0).all()  # readers see the old one meanwhile
    assert (open_store(path, CLUSTERS, build_key=OTHER)["centroids"][:] == 2.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters.zarr"]


def test_leftovers_of_killed_builds_are_removed_but_not_those_of_live_ones(tmp_path):
    path = tmp_path / "tasks.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".tasks.zarr.build-{dead_pid}-0a1b2c3d", tmp_path / f".tasks.zarr.old-{dead_pid}-0a1b2c3d"]
    live = tmp_path / f".tasks.zarr.build-{os.getppid()}-0a1b2c3d"
    for folder in [*stale, live]:
        (folder / "c").mkdir(parents=True)
    assert sorted(remove_stale_builds(path)) == sorted(stale)
    assert live.exists() and not any(p.exists() for p in stale)


# ------------------------------------------------------------------ half-written stores


def test_a_store_killed_before_its_attributes_is_rebuilt_not_refused(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)  # arrays created, attributes never written
    group.create_array("done", shape=(2,), dtype="bool")
    with pytest.raises(StoreValidationError) as err:
        open_store(path, EMBEDDINGS)
    assert not isinstance(err.value, StoreVersionError)
    rebuilt = embeddings_store(path)
    assert open_store(path, EMBEDDINGS, build_key=KEY) is not None
    assert not rebuilt["done"][:].any()


def test_a_half_written_pca_projection_is_not_used(tmp_path):
    group = embeddings_store(tmp_path / "embeddings.zarr")
    rng = np.random.default_rng(0)
    components = np.linalg.qr(rng.normal(size=(5, 2)))[0].T.astype(np.float32)  # orthonormal rows
    save_projection(group, Projection(np.zeros(5, np.float32), components))
    assert load_projection(group) is not None
    group.create_array("pca_components", shape=(2, 5), dtype="float32", overwrite=True)  # killed before its data
    assert load_projection(group) is None


def test_a_mask_folder_missing_a_mask_is_never_marked_complete(tmp_path):
    out = tmp_path / "masks"
    assert start_pseudo_masks(out, KEY) is False
    (out / "a.png").write_bytes(b"png")
    (out / ".b.png.tmp123").write_bytes(b"half a png")  # a writer killed mid-file
    meta = PseudoMasksMeta(build_key=KEY, num_clusters=2, felzenszwalb=PARAMS, image_count=2)
    with pytest.raises(ValueError, match=r"1 of 2 masks are missing, e.g. \['b'\]"):
        finish_pseudo_masks(out, meta, ["a", "b"])
    assert start_pseudo_masks(out, KEY) is False  # still pending: resumed, "a" kept
    assert (out / "a.png").exists() and not (out / ".b.png.tmp123").exists()
