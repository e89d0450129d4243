"""Stage A extraction: reference geometry, unit-norm embeddings, exact resume, store extension, PCA."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from fss_core.data.images import load_rgb, save_rgb
from fss_core.embeddings.extract import (
    create_embeddings_store,
    embed_batch,
    extract_rows,
    feature_grid,
    preprocess,
    sample_valid_vectors,
    shard_blocks,
)
from fss_core.embeddings.pca import fit_projection, load_projection, save_projection
from fss_core.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, build_backbone
from storage_schemas import EMBEDDINGS, open_store

LONG_SIDE = 64
KEY = "0123456789abcdef"


pytestmark = pytest.mark.usefixtures("single_thread")


class CountingBackbone(Backbone):
    """A fixed random stride-8 patch embedding that counts the images it sees."""

    embedding_layer = "layer4"

    def __init__(self, channels: int = 6, fail_on_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 8, stride=8)
        self.channels = dict.fromkeys(("layer2", "layer3", "layer4"), channels)
        self.strides = dict.fromkeys(("layer2", "layer3", "layer4"), 8)
        self.images_seen = 0
        self.calls = 0
        self.fail_on_call = fail_on_call

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("worker killed")
        self.images_seen += x.shape[0]
        y = self.conv(x)
        return {"layer2": y, "layer3": y, "layer4": y}


def _images(tmp_path, sizes: list[tuple[int, int]]) -> list:
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / "img" / f"im{i}.png"
        save_rgb(path, rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        paths.append(path)
    return paths


SIZES = [(40, 100), (100, 40), (64, 64), (30, 50), (77, 23), (50, 50), (90, 60), (20, 20)]


def _store(path, sizes, shard=4, key=KEY, channels=6, grid=8, image_sha256=None):
    return create_embeddings_store(path, [f"im{i}" for i in range(len(sizes))], np.array(sizes), channels, grid,
                                   build_key=key, extractor="counting", stride=8, long_side=LONG_SIDE,
                                   shard_size=shard, image_sha256=image_sha256)


def _extract_all(path, paths, backbone, **kw) -> int:
    n = open_store(path, EMBEDDINGS)["done"].shape[0]
    return sum(extract_rows(path, list(b), [paths[r] for r in b], backbone, LONG_SIDE, batch_size=3, amp=False, **kw)
               for b in shard_blocks(n, 4))


@pytest.mark.parametrize("h, w", [(30, 100), (100, 30), (64, 64)])
def test_preprocess_pastes_resized_image_top_left_on_black_canvas(h, w):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    canvas, geometry = preprocess(np.broadcast_to(colour, (h, w, 3)).copy(), LONG_SIDE)
    assert canvas.shape == (3, LONG_SIDE, LONG_SIDE) and canvas.dtype == torch.float32
    assert max(geometry.new_h, geometry.new_w) == LONG_SIDE
    assert geometry.new_h % 8 == 0 and geometry.new_w % 8 == 0
    scale = LONG_SIDE / max(h, w)
    assert h * scale - 8 < geometry.new_h <= h * scale + 0.5 and w * scale - 8 < geometry.new_w <= w * scale + 0.5
    rgb = canvas * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    inside = torch.zeros(LONG_SIDE, LONG_SIDE, dtype=torch.bool)
    inside[: geometry.new_h, : geometry.new_w] = True
    assert torch.allclose(rgb[:, inside] * 255, torch.tensor(colour, dtype=torch.float32)[:, None], atol=1e-3)
    assert torch.allclose(rgb[:, ~inside], torch.zeros(1), atol=1e-6)  # black padding, as the reference


def test_embeddings_have_unit_norm_and_amp_stays_close():
    backbone = build_backbone("small_cnn").eval()
    batch = torch.stack([preprocess(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8),
                                    LONG_SIDE)[0] for i in range(2)])
    exact = embed_batch(backbone, batch, amp=False)
    grid = feature_grid(backbone, LONG_SIDE)
    assert exact.shape == (2, 256, grid, grid) and exact.dtype == torch.float32
    assert torch.allclose(exact.norm(dim=1), torch.ones(1), atol=1e-5)
    fast = embed_batch(backbone, batch, amp=True)
    assert (fast * exact).sum(dim=1).min() > 0.99  # cosine to the float32 embedding


def test_resume_computes_only_missing_rows_and_matches_one_shot(tmp_path):
    paths = _images(tmp_path, SIZES)
    once = CountingBackbone()
    _store(tmp_path / "once.zarr", SIZES)
    assert _extract_all(tmp_path / "once.zarr", paths, once) == len(SIZES)

    resumed = CountingBackbone()
    _store(tmp_path / "resumed.zarr", SIZES)
    assert extract_rows(tmp_path / "resumed.zarr", [0, 1, 2, 3], paths[:4], resumed, LONG_SIDE, 3, amp=False) == 4
    group = _store(tmp_path / "resumed.zarr", SIZES)  # same key: reopened, the first half stays done
    assert group["done"][:].tolist() == [True] * 4 + [False] * 4
    assert _extract_all(tmp_path / "resumed.zarr", paths, resumed) == 4
    assert resumed.images_seen == len(SIZES)

    a, b = open_store(tmp_path / "once.zarr", EMBEDDINGS), open_store(tmp_path / "resumed.zarr", EMBEDDINGS)
    for name in ("features", "valid_hw", "image_hw", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert b["done"][:].all()
    assert b["image_hw"][:].tolist() == [list(s) for s in SIZES]
    for (h, w), (r, c) in zip(SIZES, b["valid_hw"][:]):
        resized = [int(side * LONG_SIDE / max(h, w) + 0.5) // 8 * 8 for side in (h, w)]  # floored to x8
        assert (r, c) == tuple(math.ceil(side / 8) for side in resized)  # cells of stride 8 touching the image
    features = b["features"][:].astype(np.float32)
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=2e-3)


@pytest.mark.parametrize("buffer_rows", [1, 2, 64])
def test_stored_features_are_each_images_embedding_however_the_shard_is_buffered(tmp_path, monkeypatch, buffer_rows):
    import fss_core.embeddings.extract as extract

    # the writer holds at most buffer_rows rows: 1 and 2 flush inside a shard and inside a batch
    monkeypatch.setattr(extract, "WRITE_BUFFER_BYTES", buffer_rows * 6 * 8 * 8 * 2)
    paths = _images(tmp_path, SIZES)
    backbone = CountingBackbone()
    _store(tmp_path / "e.zarr", SIZES)
    group = open_store(tmp_path / "e.zarr", EMBEDDINGS, mode="r+")
    group["done"][5] = True  # a row already done inside the second shard is neither recomputed nor overwritten
    group["features"][5] = np.full((6, 8, 8), 7, np.float16)
    assert _extract_all(tmp_path / "e.zarr", paths, backbone) == len(SIZES) - 1
    stored = open_store(tmp_path / "e.zarr", EMBEDDINGS)["features"][:]
    for row, path in enumerate(paths):
        if row == 5:
            assert (stored[row] == 7).all()
            continue
        expected = embed_batch(backbone, preprocess(load_rgb(path), LONG_SIDE)[0][None])[0]
        np.testing.assert_array_equal(stored[row], expected.half().numpy())


def test_killed_block_marks_no_row_done(tmp_path, monkeypatch):
    paths = _images(tmp_path, SIZES[:4])
    _store(tmp_path / "e.zarr", SIZES[:4])
    with pytest.raises(RuntimeError, match="killed"):  # the second batch of the block fails
        extract_rows(tmp_path / "e.zarr", [0, 1, 2, 3], paths, CountingBackbone(fail_on_call=2), LONG_SIDE, 2,
                     amp=False)
    assert not open_store(tmp_path / "e.zarr", EMBEDDINGS)["done"][:].any()

    real_setitem = zarr.Array.__setitem__

    def failing_feature_write(self, key, value):
        if self.basename == "features":
            raise OSError("disk full")
        real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_feature_write)
    with pytest.raises(OSError, match="disk full"):  # computed, but the features never reached the store
        extract_rows(tmp_path / "e.zarr", [0, 1, 2, 3], paths, CountingBackbone(), LONG_SIDE, 2, amp=False)
    assert not open_store(tmp_path / "e.zarr", EMBEDDINGS)["done"][:].any()


def test_extending_the_store_keeps_old_rows(tmp_path):
    paths = _images(tmp_path, SIZES)
    first = 6  # the second shard is half full before the manifest grows
    _store(tmp_path / "e.zarr", SIZES[:first])
    backbone = CountingBackbone()
    _extract_all(tmp_path / "e.zarr", paths, backbone)
    before = open_store(tmp_path / "e.zarr", EMBEDDINGS)["features"][:]

    group = _store(tmp_path / "e.zarr", SIZES)  # same key, two more images
    assert group.attrs["image_ids"] == [f"im{i}" for i in range(len(SIZES))]
    assert group["done"][:].tolist() == [True] * first + [False] * (len(SIZES) - first)
    np.testing.assert_array_equal(group["features"][:first], before)
    assert _extract_all(tmp_path / "e.zarr", paths, backbone) == len(SIZES) - first
    assert backbone.images_seen == len(SIZES)

    _store(tmp_path / "once.zarr", SIZES)
    _extract_all(tmp_path / "once.zarr", paths, CountingBackbone())
    np.testing.assert_array_equal(open_store(tmp_path / "once.zarr", EMBEDDINGS)["features"][:],
                                  open_store(tmp_path / "e.zarr", EMBEDDINGS)["features"][:])


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_row_whose_image_changed_is_recomputed_alone(tmp_path):
    """Same image id, new bytes (another sha256): that row is extracted again, the others are kept."""
    paths = _images(tmp_path, SIZES)
    _store(tmp_path / "e.zarr", SIZES, image_sha256=[_sha(p) for p in paths])
    _extract_all(tmp_path / "e.zarr", paths, CountingBackbone())
    before = open_store(tmp_path / "e.zarr", EMBEDDINGS)["features"][:]

    changed = 5
    sizes = list(SIZES)
    sizes[changed] = (33, 71)  # new content, new size
    save_rgb(paths[changed], np.random.default_rng(9).integers(0, 256, size=(*sizes[changed], 3), dtype=np.uint8))
    shas = [_sha(p) for p in paths]
    group = _store(tmp_path / "e.zarr", sizes, image_sha256=shas)
    assert group["done"][:].tolist() == [i != changed for i in range(len(SIZES))]
    assert group.attrs["image_sha256"] == shas
    backbone = CountingBackbone()
    assert _extract_all(tmp_path / "e.zarr", paths, backbone) == 1 and backbone.images_seen == 1

    _store(tmp_path / "once.zarr", sizes, image_sha256=shas)
    _extract_all(tmp_path / "once.zarr", paths, CountingBackbone())
    a, b = open_store(tmp_path / "once.zarr", EMBEDDINGS), open_store(tmp_path / "e.zarr", EMBEDDINGS)
    for name in ("features", "valid_hw", "image_hw", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    kept = [i != changed for i in range(len(SIZES))]
    np.testing.assert_array_equal(b["features"][:][kept], before[kept])
    assert _store(tmp_path / "e.zarr", sizes, image_sha256=shas)["done"][:].all()  # nothing changed since


def test_a_store_extended_while_an_image_changed_recomputes_that_row_and_the_new_ones(tmp_path):
    paths = _images(tmp_path, SIZES)
    shas = [_sha(p) for p in paths]
    _store(tmp_path / "e.zarr", SIZES[:6], image_sha256=shas[:6])
    _extract_all(tmp_path / "e.zarr", paths, CountingBackbone())
    shas[1] = "f" * 64  # image 1 rewritten since
    group = _store(tmp_path / "e.zarr", SIZES, image_sha256=shas)
    assert group.attrs["image_sha256"] == shas
    assert group["done"][:].tolist() == [True, False, True, True, True, True, False, False]


def test_a_store_written_without_image_shas_opens_and_its_rows_are_trusted(tmp_path):
    """A store of the code before rows recorded their image's sha256 stays valid: its done rows are
    kept (not re-extracted) and adopt the manifest's shas; from then on a changed image is seen."""
    paths = _images(tmp_path, SIZES[:4])
    group = _store(tmp_path / "e.zarr", SIZES[:4])
    _extract_all(tmp_path / "e.zarr", paths, CountingBackbone())
    attrs = dict(group.attrs)
    attrs.pop("image_sha256", None)  # as the older code wrote it
    group.attrs.put(attrs)
    assert open_store(tmp_path / "e.zarr", EMBEDDINGS)["done"][:].all()

    shas = [_sha(p) for p in paths]
    group = _store(tmp_path / "e.zarr", SIZES[:4], image_sha256=shas)
    assert group["done"][:].all() and group.attrs["image_sha256"] == shas
    group = _store(tmp_path / "e.zarr", SIZES[:4], image_sha256=[*shas[:3], "f" * 64])
    assert group["done"][:].tolist() == [True, True, True, False]


def test_other_build_key_rebuilds_the_store(tmp_path):
    paths = _images(tmp_path, SIZES[:4])
    _store(tmp_path / "e.zarr", SIZES[:4])
    _extract_all(tmp_path / "e.zarr", paths, CountingBackbone())
    group = _store(tmp_path / "e.zarr", SIZES[:4], key="fedcba9876543210")
    assert not group["done"][:].any()


def test_rows_must_cover_whole_shards(tmp_path):
    paths = _images(tmp_path, SIZES)
    _store(tmp_path / "e.zarr", SIZES)
    with pytest.raises(ValueError, match="whole shards"):
        extract_rows(tmp_path / "e.zarr", [2, 3, 4, 5], paths[2:6], CountingBackbone(), LONG_SIDE, 2)
    assert shard_blocks(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]


def test_pca_projection_is_stored_and_applied(tmp_path):
    paths = _images(tmp_path, SIZES[:4])
    backbone = CountingBackbone(channels=6)
    vectors = sample_valid_vectors(paths, backbone, LONG_SIDE, batch_size=2, max_vectors=100, seed=0)
    assert vectors.shape[1] == 6 and len(vectors) <= 100
    projection = fit_projection(vectors, dim=3, seed=0)
    np.testing.assert_allclose(projection.components @ projection.components.T, np.eye(3), atol=1e-5)

    group = create_embeddings_store(tmp_path / "e.zarr", [f"im{i}" for i in range(4)], np.array(SIZES[:4]), 3, 8,
                                    build_key=KEY, extractor="counting", stride=8, long_side=LONG_SIDE, pca=3,
                                    shard_size=4)
    save_projection(group, projection)
    extract_rows(tmp_path / "e.zarr", [0, 1, 2, 3], paths, backbone, LONG_SIDE, 2, amp=False)  # store's own projection
    stored = open_store(tmp_path / "e.zarr", EMBEDDINGS)
    loaded = load_projection(stored)
    np.testing.assert_array_equal(loaded.components, projection.components)

    raw = embed_batch(backbone, preprocess(load_rgb(paths[0]), LONG_SIDE)[0][None])
    centred = raw[0].numpy().reshape(6, -1).T - projection.mean
    expected = centred @ projection.components.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = stored["features"][0].astype(np.float32).reshape(3, -1).T
    np.testing.assert_allclose(got, expected, atol=2e-3)


class _CountingLock:
    """A lock that records which shards were written under it."""

    def __init__(self, shard: int, taken: list[int]):
        self.shard, self.taken, self.lock = shard, taken, __import__("threading").Lock()

    def __enter__(self):
        self.lock.acquire()
        self.taken.append(self.shard)

    def __exit__(self, *exc):
        self.lock.release()


def test_two_writers_sharing_a_shard_under_its_lock_store_what_one_writer_does(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    paths = _images(tmp_path, SIZES)
    _store(tmp_path / "once.zarr", SIZES)
    _extract_all(tmp_path / "once.zarr", paths, CountingBackbone())

    _store(tmp_path / "shared.zarr", SIZES)  # shards [0-3] [4-7]; the writers split shard 1 at row 6
    taken: list[int] = []
    locks: dict[int, _CountingLock] = {}

    def lock_of(shard: int) -> _CountingLock:
        return locks.setdefault(shard, _CountingLock(shard, taken))

    def write(rows: list[int], backbone: CountingBackbone) -> int:
        return extract_rows(tmp_path / "shared.zarr", rows, [paths[r] for r in rows], backbone, LONG_SIDE,
                            batch_size=1, amp=False, shard_lock=lock_of)

    backbones = [CountingBackbone(), CountingBackbone()]  # built here: their seeded init uses torch's global RNG
    with ThreadPoolExecutor(2) as pool:
        assert sum(pool.map(write, [[0, 1, 2, 3, 4, 5], [6, 7]], backbones)) == len(SIZES)
    # shard 1 is each writer's last shard, so each writes its features batch by batch (two batches of one
    # row), then its done/size rows: 3 writes each, all under shard 1's lock; shard 0 (one writer) never locks
    assert sorted(taken) == [1] * 6
    a, b = open_store(tmp_path / "once.zarr", EMBEDDINGS), open_store(tmp_path / "shared.zarr", EMBEDDINGS)
    for name in ("features", "valid_hw", "image_hw", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_a_run_inside_a_shard_needs_its_lock(tmp_path):
    paths = _images(tmp_path, SIZES)
    _store(tmp_path / "e.zarr", SIZES)
    with pytest.raises(ValueError, match="pass shard_lock"):
        extract_rows(tmp_path / "e.zarr", [4, 5], paths[4:6], CountingBackbone(), LONG_SIDE, 2)
    assert not open_store(tmp_path / "e.zarr", EMBEDDINGS)["done"][:].any()


def test_extract_tasks_on_dask_workers_sharing_a_shard_store_what_one_writer_does(tmp_path):
    """The pipeline's case: two tasks on Dask workers split a shard; its writes take turns under
    the cluster's lock of that shard (acquired from each writer's background thread)."""
    distributed = pytest.importorskip("distributed")
    from functools import partial

    from tasks.extract import shard_lock

    paths = _images(tmp_path, SIZES)
    _store(tmp_path / "once.zarr", SIZES)
    _extract_all(tmp_path / "once.zarr", paths, CountingBackbone())
    store = tmp_path / "shared.zarr"
    _store(store, SIZES)

    def write(rows: list[int]) -> tuple[int, str]:
        lock = partial(shard_lock, store)
        done = extract_rows(store, rows, [paths[r] for r in rows], backbone, LONG_SIDE, batch_size=1, amp=False,
                            shard_lock=lock)
        return done, type(lock(1)).__module__

    backbone = CountingBackbone()  # built once, here: its seeded init draws from torch's global RNG
    with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        futures = client.map(write, [[0, 1, 2, 3, 4, 5], [6, 7]], pure=False)
        results = client.gather(futures)
    assert sum(done for done, _ in results) == len(SIZES)
    assert all(kind.startswith("distributed") for _, kind in results)  # the cluster's lock, not a local one
    a, b = open_store(tmp_path / "once.zarr", EMBEDDINGS), open_store(store, EMBEDDINGS)
    for name in ("features", "valid_hw", "image_hw", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_a_shards_flush_never_holds_up_the_next_batch_but_batches_stay_bounded():
    """The writer bounds the batches waiting to be written (memory), not a shard's flush and
    small arrays: those queue without making the forward pass wait. Writes run in order."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Event, Thread

    from fss_core.embeddings.extract import _OrderedWriter

    release, ran = Event(), []
    pool = ThreadPoolExecutor(1)
    writer = _OrderedWriter(pool, max_pending=2)
    try:
        writer.submit(lambda: (release.wait(5), ran.append("batch 0")))
        writer.submit(ran.append, "batch 1")
        writer.submit(ran.append, "flush", holds_batch=False)
        writer.submit(ran.append, "small arrays", holds_batch=False)  # returned at once: not counted

        third = Thread(target=writer.submit, args=(ran.append, "batch 2"))
        third.start()
        third.join(0.3)
        assert third.is_alive(), "a third batch must wait while two are pending"
        release.set()
        third.join(5)
        assert not third.is_alive()
        writer.wait()
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert ran == ["batch 0", "batch 1", "flush", "small arrays", "batch 2"]


def test_the_stores_projection_depends_on_the_extract_settings_and_images_only(tmp_path):
    """The embeddings store's build key names its content, so its PCA projection must not
    follow a setting of another stage: two workspaces that differ only in ``cluster.seed``
    store the same projection."""
    from fss_core.config import load_config
    from tasks.extract import prepare_extraction
    from tasks.ingest import run_ingest

    src = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(6):
        save_rgb(src / f"im{i}.png", rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    weights = tmp_path / "small_cnn.pth"
    torch.save(build_backbone("small_cnn").state_dict(), weights)
    projections = []
    for seed in (1, 2):
        ws = tmp_path / f"ws{seed}"
        cfg = load_config(None, [f"runtime.workspace={ws}", f"data.source={src}", "data.layout=folder",
                                 f"extract.checkpoint={weights}", "extract.pca_dim=4", "extract.long_side=64",
                                 f"cluster.seed={seed}"])
        run_ingest(cfg)
        plan = prepare_extraction(cfg)
        projections.append(load_projection(open_store(ws / "embeddings.zarr", EMBEDDINGS)))
        assert plan.total == 6
    np.testing.assert_array_equal(projections[0].components, projections[1].components)
    np.testing.assert_array_equal(projections[0].mean, projections[1].mean)


def test_a_large_jpeg_is_embedded_from_a_reduced_decode_with_the_geometry_of_its_size(tmp_path, monkeypatch):
    """A JPEG at least twice the canvas is decoded at 1/2, 1/4 or 1/8 scale (no smaller than the
    canvas); its canvas geometry and recorded size stay those of the image, and its embedding is
    that of the whole decode up to resampling. An image whose size changed since ingest is refused."""
    import fss_core.embeddings.extract as extract
    from PIL import Image

    smooth = np.asarray(Image.fromarray(np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8))
                        .resize((301, 211), Image.BICUBIC))
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    decoded = []
    real_load = extract.load_rgb
    monkeypatch.setattr(extract, "load_rgb", lambda p, **kw: decoded.append(real_load(p, **kw).shape) or
                        real_load(p, **kw))
    store = tmp_path / "e.zarr"
    create_embeddings_store(store, ["photo"], np.array([(211, 301)]), 6, 8, build_key=KEY, extractor="counting",
                            stride=8, long_side=LONG_SIDE, shard_size=1)
    assert extract_rows(store, [0], [path], CountingBackbone(), LONG_SIDE, batch_size=1, amp=False) == 1
    assert decoded == [(53, 76, 3)]  # 1/4 of 211x301: the longer side 76 >= 64; 1/8 would give 38
    group = open_store(store, EMBEDDINGS)
    assert tuple(group["image_hw"][0]) == (211, 301)
    canvas, geometry = preprocess(load_rgb(path), LONG_SIDE)
    assert tuple(group["valid_hw"][0]) == (math.ceil(geometry.new_h / 8), math.ceil(geometry.new_w / 8))
    whole = embed_batch(CountingBackbone(), canvas[None], "cpu", False)[0].numpy()
    stored = group["features"][0].astype(np.float32)
    r, c = group["valid_hw"][0]
    cosine = (whole[:, :r, :c] * stored[:, :r, :c]).sum(axis=0)
    assert cosine.min() > 0.98  # unit vectors: the same embedding up to resampling

    other = tmp_path / "other.zarr"
    create_embeddings_store(other, ["photo"], np.array([(200, 301)]), 6, 8, build_key=KEY, extractor="counting",
                            stride=8, long_side=LONG_SIDE, shard_size=1)
    with pytest.raises(ValueError, match="photo.jpg: image is .* but was 200x301 when ingested"):
        extract_rows(other, [0], [path], CountingBackbone(), LONG_SIDE, batch_size=1, amp=False)
