"""Ingest: re-running on a grown source adds exactly the new files; bad files are recorded."""

from __future__ import annotations

import json

from fss_core.config import load_config
from fss_core.data.manifest import read_manifest

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
