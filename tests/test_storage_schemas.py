"""Store contracts: stores round-trip, and any mismatch fails at open with one clear error."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import zarr
from pydantic import ValidationError

from storage_schemas import (
    CLUSTERS,
    EMBEDDINGS,
    TASKS,
    ClustersAttrs,
    EmbeddingsAttrs,
    ManifestRow,
    PseudoMasksMeta,
    StoreValidationError,
    StoreVersionError,
    TasksAttrs,
    create_store,
    open_store,
    read_attrs,
    read_json_meta,
    write_attrs,
    write_json_meta,
    write_unit,
)

C, G = 6, 5
KEY = "0123456789abcdef"


def embeddings_attrs(n: int, **overrides) -> EmbeddingsAttrs:
    fields = dict(build_key=KEY, extractor="resnet50-moco", checkpoint_sha256="ab" * 32, input_long_side=160,
                  stride=32, normalisation={"mean": (123.7, 116.3, 103.5), "std": (58.4, 57.1, 57.4)},
                  channels=C, image_ids=[f"img{i:03d}" for i in range(n)])
    fields.update(overrides)
    return EmbeddingsAttrs(**fields)


def make_embeddings(path, n: int = 10, **kwargs) -> zarr.Group:
    sizes = {"image": n, "channel": C, "row": G, "col": G}
    return create_store(path, EMBEDDINGS, sizes, embeddings_attrs(n), **kwargs)


def test_embeddings_round_trip(tmp_path):
    path = tmp_path / "embeddings.zarr"
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, C, G, G)).astype(np.float16)
    attrs = embeddings_attrs(10)
    group = create_store(path, EMBEDDINGS, {"image": 10, "channel": C, "row": G, "col": G}, attrs)
    group["features"][:] = feats
    group["valid_hw"][:] = np.tile([5, 3], (10, 1))
    group["done"][:7] = True

    reopened = open_store(path, EMBEDDINGS)
    np.testing.assert_array_equal(reopened["features"][:], feats)
    np.testing.assert_array_equal(reopened["valid_hw"][:, 1], np.full(10, 3))
    np.testing.assert_array_equal(reopened["done"][:], np.arange(10) < 7)
    np.testing.assert_array_equal(reopened["image_hw"][:], np.zeros((10, 2)))  # untouched rows read as fill
    assert read_attrs(reopened, EMBEDDINGS) == attrs
    feats_array = reopened["features"]
    assert feats_array.chunks == (1, C, G, G)  # one image per chunk ...
    assert feats_array.shards[0] == 64 and feats_array.shards[1:] == (C, G, G)  # ... many per shard
    assert feats_array.metadata.dimension_names == ("image", "channel", "row", "col")
    assert feats_array.metadata.zarr_format == 3
    blosc = feats_array.compressors[0]
    assert (blosc.cname.value, blosc.clevel, blosc.shuffle.value) == ("lz4", 5, "noshuffle")
    assert write_unit(reopened["valid_hw"]) == (64, 2)  # every image-axis array is split at the same blocks


def test_disjoint_blocks_written_concurrently_all_land(tmp_path):
    path = tmp_path / "embeddings.zarr"
    make_embeddings(path, n=10, write_units={"image": 4})
    expected = np.random.default_rng(1).standard_normal((10, C, G, G)).astype(np.float16)

    def write(start: int, stop: int) -> None:
        group = open_store(path, EMBEDDINGS, mode="r+")  # each writer its own handle
        group["features"][start:stop] = expected[start:stop]
        group["done"][start:stop] = True

    writers = [threading.Thread(target=write, args=(a, min(a + 4, 10))) for a in range(0, 10, 4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    group = open_store(path, EMBEDDINGS)
    assert write_unit(group["features"])[0] == 4
    np.testing.assert_array_equal(group["features"][:], expected)
    assert group["done"][:].all()


def test_missing_store_is_a_validation_error(tmp_path):
    with pytest.raises(StoreValidationError, match="embeddings store at .*nowhere.zarr: no zarr group"):
        open_store(tmp_path / "nowhere.zarr", EMBEDDINGS)


def test_missing_array_names_store_array_and_versions(tmp_path):
    path = tmp_path / "embeddings.zarr"
    make_embeddings(path)
    shutil.rmtree(path / "done")
    with pytest.raises(StoreValidationError) as err:
        open_store(path, EMBEDDINGS)
    msg = str(err.value)
    assert f"embeddings store at {path}" in msg
    assert "array 'done' is missing" in msg
    assert "store schema_version 1, code expects 1" in msg


def test_wrong_dtype_names_found_and_expected(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    del group["features"]
    group.create_array("features", shape=(10, C, G, G), dtype="float32",
                       dimension_names=["image", "channel", "row", "col"])
    with pytest.raises(StoreValidationError) as err:
        open_store(path, EMBEDDINGS)
    assert str(err.value) == (f"embeddings store at {path}: array 'features' has dtype float32, expected float16 "
                              f"(store schema_version 1, code expects 1)")


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    group.attrs["schema_version"] = 0
    with pytest.raises(StoreVersionError) as err:
        open_store(path, EMBEDDINGS)
    assert str(err.value) == (f"embeddings store at {path}: was written with schema_version 0, this code reads 1; "
                              f"move or delete it to rebuild it with this code")


def test_missing_attribute_is_named(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    raw = dict(group.attrs)
    del raw["build_key"]
    group.attrs.put(raw)
    with pytest.raises(StoreValidationError, match=r"embeddings store at .*: .*attribute 'build_key' is missing"):
        open_store(path, EMBEDDINGS)


def test_inconsistent_dim_sizes_are_refused(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    del group["image_hw"]
    group.create_array("image_hw", shape=(9, 2), dtype="int32", dimension_names=["image", "hw"])
    with pytest.raises(StoreValidationError, match=r"dim 'image' has size 9 in array 'image_hw' but 10 in array"):
        open_store(path, EMBEDDINGS)


def test_wrong_ndim_is_refused(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    del group["done"]
    group.create_array("done", shape=(10, 1), dtype="bool")
    with pytest.raises(StoreValidationError, match=r"array 'done' has 2 dims \(10, 1\), expected 1"):
        open_store(path, EMBEDDINGS)


def test_image_ids_must_match_rows(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    write_attrs(group, embeddings_attrs(11))
    with pytest.raises(StoreValidationError, match=r"attribute 'image_ids' lists 11, but dim 'image' has size 10"):
        open_store(path, EMBEDDINGS)
    with pytest.raises(StoreValidationError, match="image_ids"):  # refused before anything is written, too
        create_store(tmp_path / "other.zarr", EMBEDDINGS, {"image": 3, "channel": C, "row": G, "col": G},
                     embeddings_attrs(4))


def test_bad_attribute_value_shows_what_was_found(tmp_path):
    path = tmp_path / "embeddings.zarr"
    group = make_embeddings(path)
    group.attrs["stride"] = "thirty-two"
    with pytest.raises(StoreValidationError, match=r"attribute 'stride' .*found 'thirty-two'"):
        open_store(path, EMBEDDINGS)


def test_zarr_v2_group_is_refused(tmp_path):
    path = tmp_path / "old.zarr"
    zarr.open_group(path, mode="w", zarr_format=2)
    with pytest.raises(StoreValidationError, match="zarr format 2, expected 3"):
        open_store(path, EMBEDDINGS)


def test_clusters_store_padding_fill_and_attrs(tmp_path):
    path = tmp_path / "clusters.zarr"
    attrs = ClustersAttrs(build_key=KEY, num_clusters=4, seed=123, iterations=30, inertia=12.5, points_used=900,
                          images_sampled=3, warm_start_parent=None, converged=True, image_ids=["a", "b", "c"])
    group = create_store(path, CLUSTERS, {"cluster": 4, "channel": C, "image": 3, "row": G, "col": G}, attrs)
    group["assignments"][0, :2, :3] = 2
    reopened = open_store(path, CLUSTERS)
    assignments = reopened["assignments"][:]
    assert assignments.dtype == np.int16
    assert (assignments[0, :2, :3] == 2).all()
    assert (assignments[1:] == -1).all()  # unwritten cells read as padding
    assert read_attrs(reopened, CLUSTERS).num_clusters == 4
    write_attrs(group, attrs.model_copy(update={"num_clusters": 5}))
    with pytest.raises(StoreValidationError, match=r"'num_clusters' has 5, but dim 'cluster' has size 4"):
        open_store(path, CLUSTERS)


def tasks_attrs() -> TasksAttrs:
    return TasksAttrs(build_key=KEY, image_ids=["a", "b"], num_clusters=3, channels=C, min_area=2048,
                      background_span=0.99, prior_min_members=20, prior_fraction=0.5, prior_max_k=5000,
                      prior_max_candidates=20000)


def test_tasks_store_csr_offsets_have_one_more_entry(tmp_path):
    path = tmp_path / "tasks.zarr"
    group = create_store(path, TASKS, {"occurrence": 3, "channel": C, "prior_entry": 4}, tasks_attrs())
    assert group["prior_offsets"].shape == (4,)
    group["prior_offsets"][:] = [0, 2, 3, 4]
    group["prior_rows"][:] = [1, 2, 0, 0]
    reopened = open_store(path, TASKS)
    offsets, rows = reopened["prior_offsets"][:], reopened["prior_rows"][:]
    assert list(rows[offsets[0]:offsets[1]]) == [1, 2]

    del group["prior_offsets"]
    group.create_array("prior_offsets", shape=(3,), dtype="int64", dimension_names=["occurrence_edge"])
    with pytest.raises(StoreValidationError, match=r"dim 'occurrence_edge' has size 3, expected 4"):
        open_store(path, TASKS)


def test_empty_tasks_store_is_valid(tmp_path):
    path = tmp_path / "tasks.zarr"
    create_store(path, TASKS, {"occurrence": 0, "channel": C, "prior_entry": 0}, tasks_attrs())
    group = open_store(path, TASKS)
    assert group["occ_prototype"].shape == (0, C)
    assert group["prior_offsets"].shape == (1,)


def test_create_store_refuses_missing_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"sizes missing for dims \['col'\]"):
        create_store(tmp_path / "e.zarr", EMBEDDINGS, {"image": 1, "channel": C, "row": G}, embeddings_attrs(1))


def pseudo_meta() -> PseudoMasksMeta:
    return PseudoMasksMeta(build_key=KEY, num_clusters=30, image_count=12,
                           felzenszwalb={"scale": 100, "sigma": 0.8, "min_size": 200})


def test_pseudo_masks_meta_round_trip(tmp_path):
    path = tmp_path / "pseudo" / "meta.json"
    meta = pseudo_meta()
    write_json_meta(path, meta)
    assert read_json_meta(path, PseudoMasksMeta) == meta
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]  # no temp file left behind


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.update(schema_version=2), "was written with schema_version 2, this code reads 1"),
        (lambda raw: raw.pop("num_clusters"), "attribute 'num_clusters' is missing"),
        (lambda raw: raw["felzenszwalb"].update(sigma=-1), "attribute 'felzenszwalb.sigma'"),
    ],
)
def test_pseudo_masks_meta_mismatch_is_one_clear_error(tmp_path, edit, message):
    path = tmp_path / "meta.json"
    write_json_meta(path, pseudo_meta())
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(StoreValidationError) as err:
        read_json_meta(path, PseudoMasksMeta)
    assert str(err.value).startswith(f"pseudo-masks metadata at {path}: ")
    assert message in str(err.value)


def test_pseudo_masks_meta_not_json(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("{not json")
    with pytest.raises(StoreValidationError, match="not readable JSON"):
        read_json_meta(path, PseudoMasksMeta)


def test_manifest_row_rules():
    common = dict(image_id="a", sha256="0" * 64, size_bytes=10, mtime_ns=1)
    with pytest.raises(ValidationError, match="skipped row needs a reason"):
        ManifestRow(path="a.jpg", status="skipped", **common)
    with pytest.raises(ValidationError, match="ok row needs sha256, width and height"):
        ManifestRow(path="a.jpg", status="ok", **common)
    for bad in ("/abs/a.jpg", "../a.jpg", "sub\\a.jpg", "./a.jpg"):
        with pytest.raises(ValidationError, match="relative POSIX path"):
            ManifestRow(path=bad, status="ok", width=2, height=2, **common)
    assert ManifestRow(path="sub/a.jpg", status="ok", width=2, height=2, **common).reason is None
