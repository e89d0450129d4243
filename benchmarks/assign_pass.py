"""Pseudo-mask quality when the labels are assigned from features recomputed on a larger canvas.

The reference clusters features of a 473 px canvas and assigns every pixel's cluster from a
second extraction on a 640 px canvas. The pipeline assigns from the stored embeddings of its one
extraction (``extract.long_side``). This script measures what a second, larger pass would give:
on a workspace whose pseudo masks exist (``fss pseudo``, with the ``--config`` and ``--set``
given here), it recomputes each training image's features on canvases of the given sizes,
assigns them to the workspace's centroids exactly as the pipeline does (valid cells, bilinear
map, superpixel vote), and scores the masks against the ground truth with the pipeline's
quality report (Hungarian mIoU). The size equal to
``extract.long_side`` must reproduce the workspace's own report to within ``AGREEMENT`` (the
recomputed features differ from the stored ones by rounding only: batch composition, autocast):
a check that the recomputation is the pipeline's.

    python benchmarks/assign_pass.py --workspace demo-workspace --sizes 128 152 176 256
    python benchmarks/assign_pass.py --workspace W --config pascal.yaml --sizes 473 640
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fss_core.config import PipelineConfig, load_config  # noqa: E402
from fss_core.data.images import load_rgb, save_label  # noqa: E402
from fss_core.embeddings.extract import embed_batch, feature_grid, preprocess, valid_cells  # noqa: E402
from fss_core.embeddings.pca import load_projection  # noqa: E402
from fss_core.pseudo.masks import QUALITY_NAME, pseudo_mask  # noqa: E402
from fss_core.pseudo.quality import evaluate_pseudo_masks  # noqa: E402
from storage_schemas import CLUSTERS, EMBEDDINGS, open_store, read_attrs  # noqa: E402
from tasks.extract import _backbone, small_cnn_checkpoint  # noqa: E402
from tasks.ingest import training_rows  # noqa: E402
from tasks.pseudo import _Labelled, dataset_num_classes, felzenszwalb_params  # noqa: E402
from tasks.workspace import source_root, workspace_of  # noqa: E402

AGREEMENT = 0.002  # mIoU


def masks_at(cfg: PipelineConfig, long_side: int, out_dir: Path) -> None:
    """Every training image's pseudo mask, assigned from features of a ``long_side`` canvas."""
    ws = workspace_of(cfg)
    centroids = open_store(ws.clusters, CLUSTERS)["centroids"][:]
    embeddings = open_store(ws.embeddings, EMBEDDINGS)
    attrs = read_attrs(embeddings, EMBEDDINGS)
    projection = load_projection(embeddings) if attrs.pca else None
    checkpoint = cfg.extract.checkpoint or small_cnn_checkpoint(cfg)
    backbone = _backbone(cfg.extract.backbone, str(checkpoint))
    stride = backbone.strides[backbone.embedding_layer]
    grid = feature_grid(backbone, long_side)
    root = source_root(cfg)
    for row in training_rows(cfg):
        rgb = load_rgb(root / row.path)
        canvas, geometry = preprocess(rgb, long_side)
        features = embed_batch(backbone, canvas[None])
        if projection is not None:
            features = projection.apply(features)
        features = features[0].to(torch.float16).numpy()  # as the embeddings store holds them
        mask = pseudo_mask(features, valid_cells(geometry, stride, grid), rgb.shape[:2], stride, long_side,
                           centroids, rgb, felzenszwalb_params(cfg), cfg.pseudo.area_reference)
        save_label(out_dir / f"{row.image_id}.png", mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml",
                        help="the config the workspace was built with (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="and its overrides")
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="canvas long sides to assign from")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*args.overrides, f"runtime.workspace={args.workspace}"])
    ws = workspace_of(cfg)
    root = source_root(cfg)
    labelled = [_Labelled(r.image_id, root / r.label_path) for r in training_rows(cfg) if r.label_path]
    if not labelled:
        raise SystemExit("the workspace's training images have no labels to score the masks against")
    stored = json.loads((ws.pseudo_masks / QUALITY_NAME).read_text())["summary"]["miou"]
    print(f"workspace's own pseudo masks (extract.long_side={cfg.extract.long_side}): mIoU {stored:.4f}")
    figures = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            masks_at(cfg, size, Path(tmp))
            report = evaluate_pseudo_masks(tmp, labelled, cfg.cluster.num_clusters, dataset_num_classes(cfg) + 1,
                                           seed=cfg.cluster.seed)
        figures[size] = {"miou": report.miou, "chance_miou": report.random_baseline_miou,
                         "pixel_accuracy": report.pixel_accuracy}
        print(f"assigned from a {size} px canvas: mIoU {report.miou:.4f} (chance {report.random_baseline_miou:.4f})")
        if size == cfg.extract.long_side and abs(report.miou - stored) > AGREEMENT:
            raise SystemExit(f"the recomputation at {size} px gives {report.miou}, the pipeline gave {stored}: "
                             "this script no longer assigns as the pipeline does")
    if args.out:
        args.out.write_text(json.dumps({"workspace": str(args.workspace), "sizes": figures}, indent=1))


if __name__ == "__main__":
    main()
