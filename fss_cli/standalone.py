"""``fss evaluate --bundle/--baseline``: the protocol on a dataset's val split, no pipeline."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fss_core.config import PipelineConfig
from fss_core.data.folds import fold_split
from fss_core.data.layouts import read_dataset
from fss_core.evaluation.baseline import PrototypeBaseline
from fss_core.evaluation.protocol import ModelPredictor, default_episodes, run_protocol
from fss_core.models.backbones import build_backbone
from fss_core.models.fss.bundle import load_bundle
from tasks.evaluate import EvalRow, comparison_table
from tasks.extract import BackboneRef, device_for, small_cnn_checkpoint
from tasks.pseudo import dataset_num_classes
from tasks.train import fss_backbone
from tasks.workspace import source_root


def predictions_folder(root: Path, fold: int, shots: int) -> Path:
    """Where ``--save-predictions DIR`` puts one fold and shot count's predictions; the protocol
    adds ``seed{n}/{episode:05d}.png`` below it."""
    return root / f"fold{fold}" / f"{shots}shot"


def baseline_backbone(cfg: PipelineConfig) -> tuple[str, str]:
    """The baseline's frozen backbone and its weights, as the pipeline's evaluation picks them:
    ``train.backbone`` if set, else the extraction backbone (``extract.checkpoint``, or the
    small CNN the workspace pretrained on its images). Never random weights."""
    e = cfg.extract
    if cfg.train.backbone is None and e.checkpoint is None:
        path = small_cnn_checkpoint(cfg)
        if e.backbone != "small_cnn" or not path.is_file():
            raise SystemExit(
                f"the baseline needs trained backbone weights: no extract.checkpoint is set and the workspace "
                f"{cfg.runtime.workspace} holds no pretrained small CNN ({path}). Run `fss extract` on this "
                f"workspace first, or set extract.checkpoint (or train.backbone and "
                f"train.backbone_checkpoint)")
        extraction = BackboneRef("small_cnn", str(path), None)
    else:
        extraction = BackboneRef(e.backbone, str(e.checkpoint) if e.checkpoint else None, None)
    try:
        name, checkpoint = fss_backbone(cfg, extraction)
    except ValueError as err:  # train.backbone without its checkpoint
        raise SystemExit(str(err)) from None
    return name, str(checkpoint)


def evaluate_standalone(cfg: PipelineConfig, bundle: Path | None, out: Path, predictions: Path | None,
                        overlays: int) -> str:
    """Evaluate a model bundle (or the baseline) on every configured fold and shot count.

    ``out/fold{f}/{s}shot/`` receives the protocol's ``metrics.json`` and ``seed{n}/episodes.jsonl``;
    with ``predictions``, episode i of seed n is written to
    ``predictions/fold{f}/{s}shot/seed{n}/{i:05d}.png`` (0 = bg, 1 = fg, original label size).
    """
    device = device_for(cfg)
    if bundle is not None:
        model, spec = load_bundle(bundle)
        predictor, method, size = ModelPredictor(model, device), "model", spec.image_size
    else:
        backbone = build_backbone(*baseline_backbone(cfg))
        backbone.freeze()
        predictor = PrototypeBaseline(backbone, threshold=cfg.evaluate.baseline_threshold, device=device)
        method, size = "baseline", cfg.train.image_size
    records = [r for r in read_dataset(source_root(cfg), cfg.data.layout, split="val") if r.label_path]
    if not records:
        raise SystemExit(f"no labelled val images under {source_root(cfg)}")
    e = cfg.evaluate
    n_episodes = e.episodes or default_episodes(cfg.data.fold_scheme)
    rows = []
    for fold in e.folds:
        split = fold_split(cfg.data.fold_scheme, fold, dataset_num_classes(cfg))
        for shots in e.shots:
            folder = out / f"fold{fold}" / f"{shots}shot"
            m = run_protocol(predictor, records, split, shots, n_episodes, e.seeds, size, e.min_area, folder,
                             predictions_dir=predictions_folder(predictions, fold, shots) if predictions else None,
                             n_overlays=overlays, progress=cfg.runtime.progress, area_reference=e.area_reference)
            rows.append(EvalRow(method, fold, shots, m["miou"], m["miou_std"], m["fbiou"], m["fbiou_std"],
                                [s["miou"] for s in m["seeds"]], str(folder)))
    table = comparison_table(rows)
    (out / "summary.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "table": table}, indent=1))
    return table
