"""Train: meta-train the FSS model on pseudo episodes (or fine-tune / train on real labels).

Model selection never looks at the test fold's novel classes: held-out pseudo episodes
(unsupervised) or base-class episodes of the val split (finetune, supervised).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.data.episodes import PseudoEpisodeDataset, SupervisedEpisodeDataset
from fss_core.data.folds import fold_split
from fss_core.data.layouts import ImageRecord
from fss_core.models.fss.bundle import ModelSpec, build_model, load_bundle, save_bundle
from fss_core.models.fss.network import FSSModelConfig
from fss_core.pseudo.task_index import PseudoTaskIndex
from fss_core.training import TrainCallbacks, TrainSettings, load_model_weights, train
from tasks.extract import BackboneRef, device_for
from tasks.ingest import labelled_rows, labels_digest, training_rows
from tasks.keys import build_key
from tasks.pseudo import dataset_num_classes
from tasks.tracking import flatten, stage_run
from tasks.workspace import atomic_write_text, source_root, workspace_of

log = logging.getLogger(__name__)
# In the bundle folder: what selected its weights (for a cached re-run) and the workspace's training
# images (id → sha256) when it was trained, from which a retrain tells which images are new.
TRAINING_RECORD = "training.json"


@dataclass(frozen=True)
class TrainOutcome:
    build_key: str
    mode: str
    bundle: str
    best_epoch: int | None
    best_score: float | None
    final_train_loss: float | None
    cached: bool


def model_spec(cfg: PipelineConfig, backbone: str) -> ModelSpec:
    t = cfg.train
    return ModelSpec(backbone, t.image_size, FSSModelConfig(
        hidden=t.hidden, heads=t.heads, layers=t.layers, ffn=t.ffn, fg_prototypes=t.fg_prototypes,
        bg_prototypes=t.bg_prototypes, support_self_attention=t.support_self_attention,
        adapter_layers=tuple(t.adapter_layers), adapter_dropout=t.adapter_dropout,
        prototype_prior=t.prototype_prior, prototype_prior_layers=tuple(t.prototype_prior_layers),
        mask_empty_prototypes=t.mask_empty_prototypes))


def fss_backbone(cfg: PipelineConfig, extraction: BackboneRef) -> tuple[str, str | None]:
    """The FSS model's frozen backbone: configured, or the one the embeddings came from."""
    if cfg.train.backbone is None:
        return extraction.name, extraction.checkpoint
    ckpt = cfg.train.backbone_checkpoint
    if ckpt is None:
        raise ValueError(f"train.backbone={cfg.train.backbone} needs train.backbone_checkpoint")
    return cfg.train.backbone, str(ckpt)


def records(cfg: PipelineConfig, split: str) -> list[ImageRecord]:
    root = source_root(cfg)
    return [ImageRecord(r.image_id, root / r.path, root / r.label_path, r.split) for r in labelled_rows(cfg, split)]


def label_fraction_list(cfg: PipelineConfig) -> Path:
    """The train_{5,10,20}.txt list of ``train.label_fraction``, next to the dataset's lists."""
    return source_root(cfg) / "lists" / f"train_{cfg.train.label_fraction}.txt"


def label_fraction_ids(cfg: PipelineConfig) -> list[str] | None:
    """Image ids of the label-fraction list (finetune mode); None without a fraction."""
    if cfg.train.label_fraction is None:
        return None
    path = label_fraction_list(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `fss prepare lists` for this dataset first")
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


def _datasets(cfg: PipelineConfig):
    t = cfg.train
    common = dict(shots=t.shots, size=t.image_size, scale_range=tuple(t.scale_range),
                  rotate_degrees=t.rotate_degrees, seed=t.seed, decode_cache_mb=t.decode_cache_mb,
                  max_side=t.max_side)
    if t.mode == "unsupervised":
        ws = workspace_of(cfg)
        index = PseudoTaskIndex.load(ws.tasks)
        train_index, held_index = index.split_holdout(t.val_fraction, seed=t.seed)
        root = source_root(cfg)
        paths = {r.image_id: root / r.path for r in training_rows(cfg)}
        pseudo = dict(common, distinct_supports=t.distinct_supports)
        return (PseudoEpisodeDataset(train_index, paths, ws.pseudo_masks, **pseudo),
                PseudoEpisodeDataset(held_index, paths, ws.pseudo_masks, **pseudo))
    split = fold_split(cfg.data.fold_scheme, t.fold, dataset_num_classes(cfg))
    area = dict(min_area=cfg.pseudo.min_area, area_reference=cfg.pseudo.area_reference)
    train_set = SupervisedEpisodeDataset(records(cfg, "train"), split.base, image_ids=label_fraction_ids(cfg),
                                         **area, **common)
    val_set = SupervisedEpisodeDataset(records(cfg, "val"), split.base, train=False, **area, **common)
    return train_set, val_set


def _label_inputs(cfg: PipelineConfig) -> list[str]:
    """What a model trained on real labels also depends on: the labelled images and their labels
    (train for training, val for selection), the area rule that picks its episodes' images, and
    the label-fraction list it is restricted to."""
    if cfg.train.mode == "unsupervised":
        return []
    # the episodes' area rule (pseudo.min_area, scaled by pseudo.area_reference) picks their images
    inputs = [labels_digest(cfg, "train", "val"), f"min_area={cfg.pseudo.min_area}@{cfg.pseudo.area_reference}"]
    if cfg.train.label_fraction is not None:
        path = label_fraction_list(cfg)
        inputs.append(hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing")
    return inputs


def initial_bundle(cfg: PipelineConfig, init_bundle: str | None) -> Path | None:
    """The model training starts from: the given bundle (retraining), the configured one, or, for
    finetune, the workspace's latest unsupervised model; None = fresh weights."""
    for candidate in (init_bundle, cfg.train.init_checkpoint):
        if candidate:
            return Path(candidate)
    if cfg.train.mode != "finetune":
        return None
    found = sorted(workspace_of(cfg).models.glob("unsupervised-*/model.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError("finetune needs an unsupervised model: set train.init_checkpoint or run mode unsupervised")
    return found[-1].parent


def run_train(cfg: PipelineConfig, upstream_key: str, extraction: BackboneRef, parent_run_id: str | None = None,
              init_bundle: str | None = None, stage: str = "train") -> TrainOutcome:
    """Train (or reuse) the model of ``cfg.train``; ``stage`` names its MLflow run."""
    ws = workspace_of(cfg)
    t = cfg.train
    start = initial_bundle(cfg, init_bundle)
    key = build_key("train", cfg, upstream_key, extraction.sha256, str(start) if start else None, *_label_inputs(cfg))
    bundle_dir = ws.models / f"{t.mode}-{key}"
    if (bundle_dir / "model.json").is_file():
        log.info("train: unchanged (build key %s), skipped", key)
        record = bundle_dir / TRAINING_RECORD
        known = json.loads(record.read_text()) if record.is_file() else {}
        return TrainOutcome(key, t.mode, str(bundle_dir), known.get("best_epoch"), known.get("best_score"),
                            known.get("final_train_loss"), cached=True)
    name, ckpt = fss_backbone(cfg, extraction)
    spec = model_spec(cfg, name)
    torch.manual_seed(t.seed)  # the same settings give the same initial weights in any process (exact reruns)
    model = build_model(spec, backbone_checkpoint=ckpt)
    if start is not None:
        init, init_spec = load_bundle(start)
        if init_spec != spec:
            raise ValueError(f"cannot fine-tune from {start}: its model spec differs from train.* settings")
        model.load_state_dict(init.state_dict())
    train_set, val_set = _datasets(cfg)
    if len(val_set) == 0:
        log.warning("train: no validation episodes (dataset too small); the last epoch's weights are kept")
        val_set = None
    settings = TrainSettings(epochs=t.epochs, batch_size=t.batch_size, base_lr=t.base_lr,
                             checkpoint_dir=ws.models / f"{t.mode}-{key}.checkpoints", sgd_lr_scale=t.sgd_lr_scale,
                             momentum=t.momentum, weight_decay=t.weight_decay, power=t.power,
                             transformer_lr=t.transformer_lr, transformer_weight_decay=t.transformer_weight_decay,
                             seed=t.seed, device=device_for(cfg), amp=t.amp, num_workers=t.num_workers,
                             dice_ignores_void=t.dice_ignores_void)
    with stage_run(cfg, stage, parent_run_id, key):
        mlflow.set_tags({"train.mode": t.mode, "train.backbone": name})
        if stage != "train":  # stage_run logs the train section only for the stage named train
            mlflow.log_params({k: str(v)[:500] for k, v in flatten("train", t.model_dump(mode="json")).items()})
        callbacks = TrainCallbacks(
            on_epoch_end=lambda epoch, metrics: mlflow.log_metrics(
                {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch),
            on_checkpoint=lambda path, kind: mlflow.log_artifact(str(path), "checkpoints") if kind != "last" else None,
        )
        result = train(model, train_set, val_set, settings, callbacks, progress=cfg.runtime.progress)
        load_model_weights(result.best_path or result.final_path, model)  # the selected epoch
        final_loss = result.history[-1].get("train_loss") if result.history else None
        bundle_dir.mkdir(parents=True, exist_ok=True)  # the record first: model.json completes the bundle
        atomic_write_text(bundle_dir / TRAINING_RECORD, json.dumps(
            {"best_epoch": result.best_epoch, "best_score": _number(result.best_score),
             "final_train_loss": _number(final_loss),
             "images": {r.image_id: r.sha256 for r in training_rows(cfg)}}))
        save_bundle(bundle_dir, model.cpu(), spec)
        mlflow.log_artifacts(str(bundle_dir), "bundle")
    log.info("train (%s): best epoch %s, validation score %s", t.mode, result.best_epoch, result.best_score)
    return TrainOutcome(key, t.mode, str(bundle_dir), result.best_epoch, result.best_score, final_loss, cached=False)


def _number(value) -> float | None:
    return None if value is None else float(value)


@task(name="train")
def train_task(config: dict, upstream_key: str, extraction: BackboneRef, parent_run_id: str | None = None,
               init_bundle: str | None = None) -> TrainOutcome:
    return run_train(PipelineConfig.model_validate(config), upstream_key, extraction, parent_run_id, init_bundle)
