"""Ingest: re-running on a grown source adds exactly the new files; bad files are recorded."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fss_core.config import load_config
from fss_core.data.images import save_rgb
from fss_core.data.manifest import read_manifest
from tasks.ingest import run_ingest  # imports Prefect, which sets up logging before caplog is in place
from tasks.workspace import Workspace

def test_rerun_after_new_images_adds_exactly_those(tmp_path):
    from fss_core.data.images import save_rgb
    from tasks.ingest import run_ingest

    src = tmp_path / "folder"
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(5):
        save_rgb(src / f"a{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}", f"data.source={src}", "data.layout=folder"])
    first = run_ingest(cfg)
    assert (first.total, first.added) == (5, 5)
    for i in range(3):
        save_rgb(src / "new" / f"b{i}.jpg", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    (src / "broken.jpg").write_bytes(b"not an image at all")
    (src / "empty.png").write_bytes(b"")
    second = run_ingest(cfg)
    assert second.added == 5  # 3 images + 2 bad files, recorded (as skipped), never dropped
    assert second.total == 10 and second.ok == 8 and second.skipped == 2
    assert second.build_key != first.build_key
    rows = {r.image_id: r for r in read_manifest(tmp_path / "ws" / "manifest.jsonl")}
    assert rows["broken"].status == "skipped" and rows["broken"].reason
    assert rows["empty"].status == "skipped" and rows["empty"].reason != rows["broken"].reason
    third = run_ingest(cfg)
    assert third.added == 0 and third.build_key == second.build_key
    json.dumps(third.__dict__)  # plain, loggable


def _images(folder, names):
    rng = np.random.default_rng(0)
    for name in names:
        save_rgb(folder / name, rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))


def test_a_workspace_inside_the_image_folder_is_not_ingested(tmp_path, caplog):
    """``fss run -w ./ws`` inside an image folder: the pipeline's own outputs never become images."""
    src = tmp_path / "photos"
    _images(src, ["a.png", "b.jpg", "trip/c.png"])
    ws = src / "ws"
    cfg = load_config(None, [f"runtime.workspace={ws}", f"data.source={src}", "data.layout=folder"])
    assert run_ingest(cfg).ok == 3
    _images(ws, ["pseudo_masks/a.png", "pseudo_masks/trip/c.png", "evaluation/overlays/0.jpg", "data/synthetic/x.png"])
    with caplog.at_level(logging.INFO):
        second = run_ingest(cfg)
    assert (second.total, second.added, second.removed) == (3, 0, 0)
    rows = read_manifest(ws / "manifest.jsonl")
    assert sorted(r.path for r in rows) == ["a.png", "b.jpg", "trip/c.png"]
    assert all(r.status == "ok" for r in rows)
    assert sum(f"{ws}" in m and "skipped" in m for m in caplog.messages) == 1  # said once


def test_a_source_that_is_the_workspace_or_its_output_is_refused(tmp_path):
    ws = tmp_path / "ws"
    _images(ws, ["a.png"])
    _images(ws / "pseudo_masks", ["a.png"])
    for source in (ws, ws / "pseudo_masks"):
        cfg = load_config(None, [f"runtime.workspace={ws}", f"data.source={source}", "data.layout=folder"])
        with pytest.raises(ValueError, match="workspace"):
            run_ingest(cfg)
    assert not (ws / "manifest.jsonl").exists()


def test_rows_an_older_ingest_took_from_the_workspace_are_dropped(tmp_path, monkeypatch):
    src = tmp_path / "photos"
    _images(src, ["a.png", "b.jpg"])
    ws = src / "ws"
    cfg = load_config(None, [f"runtime.workspace={ws}", f"data.source={src}", "data.layout=folder"])
    with monkeypatch.context() as unmarked:  # an ingest from before workspaces were marked
        unmarked.setattr(Workspace, "mark", lambda self: None)
        run_ingest(cfg)
        _images(ws, ["pseudo_masks/a.png"])
        assert run_ingest(cfg).total == 3
    result = run_ingest(cfg)
    assert result.total == 2 and result.ok == 2
    assert sorted(r.path for r in read_manifest(ws / "manifest.jsonl")) == ["a.png", "b.jpg"]


def test_synthetic_data_in_the_workspace_is_ingested_as_before(tmp_path):
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}", "data.synthetic.images=6",
                             "data.synthetic.size=32", "data.synthetic.classes=2"])
    first = run_ingest(cfg)
    second = run_ingest(cfg)
    assert first.ok == first.total > 0
    assert (second.total, second.added, second.build_key) == (first.total, 0, first.build_key)


def test_a_pascal_val_image_is_never_a_training_row(tmp_path):
    """A VOC root without its own lists/ is split by the shipped PASCAL-5i lists, the ones
    ``fss evaluate`` scores on, so no val image is trained on."""
    from fss_core.data.images import save_label
    from fss_core.data.layouts import shipped_list
    from tasks.ingest import labelled_rows, training_rows

    def first_stems(split, n):
        lines = shipped_list("pascal", split).read_text().splitlines()[:n]
        return [line.split()[0].split("/")[1].removesuffix(".jpg") for line in lines]

    src = tmp_path / "voc"
    train, val = first_stems("train", 2), first_stems("val", 1)
    _images(src / "JPEGImages", [f"{s}.jpg" for s in [*train, *val, "own_photo"]])
    for stem in [*train, *val]:
        save_label(src / "SegmentationClassAug" / f"{stem}.png", np.zeros((20, 30), np.uint8))
    cfg = load_config(None, [f"runtime.workspace={tmp_path / 'ws'}", f"data.source={src}", "data.layout=voc",
                             "data.fold_scheme=pascal"])
    assert run_ingest(cfg).ok == 4
    assert sorted(r.image_id for r in training_rows(cfg)) == sorted([*train, "own_photo"])
    assert [r.image_id for r in labelled_rows(cfg, "val")] == val
