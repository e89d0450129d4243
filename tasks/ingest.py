"""Ingest: materialise the source (synthetic data if none) and build the manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from prefect import task

from fss_core.config import PipelineConfig
from fss_core.data.manifest import build_manifest, read_manifest, write_manifest
from fss_core.data.synthetic import synthesize
from storage_schemas import ManifestRow
from tasks.tracking import stage_run
from tasks.workspace import atomic_write_text, check_source, source_root, workspace_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What ingest did; ``build_key`` changes whenever any image's content changes."""

    build_key: str
    total: int
    ok: int
    added: int
    changed: int
    skipped: int
    removed: int


def ensure_synthetic(cfg: PipelineConfig) -> None:
    """Generate the synthetic dataset into the workspace once per synthetic config."""
    if cfg.data.source is not None:
        return
    root = workspace_of(cfg).synthetic_data
    stamp = root / ".synthetic.json"
    wanted = cfg.data.synthetic.model_dump(mode="json")
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return
    if root.exists():  # the workspace's own copy: regenerate whole, leaving no stale images behind
        shutil.rmtree(root)
    log.info("generating synthetic data into %s", root)
    s = cfg.data.synthetic
    synthesize(root, seed=s.seed, classes=s.classes, images=s.images, size=s.size)
    atomic_write_text(stamp, json.dumps(wanted))


def run_ingest(cfg: PipelineConfig, parent_run_id: str | None = None) -> IngestResult:
    """Scan the source, update the manifest (new and changed files are read), log counts to MLflow.

    A source that is the workspace or lies in its outputs is refused. The workspace is marked as
    one first, so that a scan of a source folder holding it skips it.
    """
    check_source(cfg)
    ensure_synthetic(cfg)
    ws = workspace_of(cfg)
    ws.mark()
    root = source_root(cfg)
    existing = read_manifest(ws.manifest) if ws.manifest.is_file() else None
    if existing is not None and ws.root.is_relative_to(root):
        existing = _without_workspace_rows(existing, root, ws.root)
    update = build_manifest(root, layout=cfg.data.layout, existing=existing, num_classes=label_classes(cfg))
    write_manifest(ws.manifest, update.rows)
    digest = hashlib.sha256()
    for row in update.rows:
        digest.update(f"{row.image_id}\t{row.sha256}\t{row.status}\t{row.split}\n".encode())
    result = IngestResult(
        build_key=digest.hexdigest()[:16],
        total=len(update.rows),
        ok=sum(r.status == "ok" for r in update.rows),
        added=len(update.added),
        changed=len(update.changed),
        skipped=sum(r.status == "skipped" for r in update.rows),
        removed=len(update.removed),
    )
    with stage_run(cfg, "ingest", parent_run_id, result.build_key):
        mlflow.log_metrics({k: v for k, v in asdict(result).items() if isinstance(v, int)})
        skipped = [r.model_dump(mode="json") for r in update.rows if r.status == "skipped"]
        if skipped:
            mlflow.log_dict({"skipped": skipped}, "ingest/skipped.json")
    log.info("ingest: %d images (%d new, %d changed, %d skipped)", result.total, result.added,
             result.changed, result.skipped)
    return result


def _without_workspace_rows(rows: list[ManifestRow], source: Path, workspace: Path) -> list[ManifestRow]:
    """``rows`` less those of files inside the workspace, which an older ingest of a ``source``
    folder holding the workspace took for images."""
    kept = [r for r in rows if not (source / r.path).is_relative_to(workspace)]
    if len(kept) < len(rows):
        log.info("ingest: %d manifest rows of files inside the workspace %s dropped", len(rows) - len(kept),
                 workspace)
    return kept


def label_classes(cfg: PipelineConfig) -> int | None:
    """Foreground classes the labels may hold, when the config says (None: values not checked)."""
    from tasks.pseudo import dataset_num_classes  # tasks.pseudo imports this module

    try:
        return dataset_num_classes(cfg)
    except ValueError:
        return None


def training_rows(cfg: PipelineConfig) -> list[ManifestRow]:
    """Readable images of the training split (or of an unsplit folder), in manifest order."""
    rows = read_manifest(workspace_of(cfg).manifest)
    return [r for r in rows if r.status == "ok" and r.split in ("train", None)]


def labelled_rows(cfg: PipelineConfig, split: str) -> list[ManifestRow]:
    """Readable, labelled images of ``split``."""
    rows = read_manifest(workspace_of(cfg).manifest)
    return [r for r in rows if r.status == "ok" and r.split == split and r.label_path]


def labels_digest(cfg: PipelineConfig, *splits: str) -> str:
    """16 hex digits naming the labelled images of ``splits``: each image's id and content hash,
    and its label file's path, size and modification time (a corrected label changes them).
    Keys of the stages that read labels (evaluation, training on real labels) include it."""
    root = source_root(cfg)
    digest = hashlib.sha256()
    for split in splits:
        for row in labelled_rows(cfg, split):
            label = root / row.label_path
            stat = label.stat() if label.is_file() else None
            digest.update(json.dumps([split, row.image_id, row.sha256, row.label_path,
                                      stat.st_size if stat else None, stat.st_mtime_ns if stat else None]).encode())
    return digest.hexdigest()[:16]


@task(name="ingest", retries=1)
def ingest_task(config: dict, parent_run_id: str | None = None) -> IngestResult:
    return run_ingest(PipelineConfig.model_validate(config), parent_run_id)
