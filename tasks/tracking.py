"""MLflow tracking: one experiment per workspace, a parent run per pipeline, nested runs per stage."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from fss_core.config import PipelineConfig
from tasks.workspace import git_commit, workspace_of

log = logging.getLogger(__name__)


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured tracking URI, or sqlite in the workspace."""
    if cfg.runtime.mlflow_tracking_uri:
        return cfg.runtime.mlflow_tracking_uri
    return f"sqlite:///{workspace_of(cfg).mlflow_db}"


def experiment_name(cfg: PipelineConfig) -> str:
    if cfg.runtime.experiment:
        return cfg.runtime.experiment
    ws = workspace_of(cfg).root
    return f"fss-{ws.name}-{hashlib.sha256(str(ws).encode()).hexdigest()[:8]}"


def ensure_experiment(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store and return the workspace's experiment id."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient()
    name = experiment_name(cfg)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not cfg.runtime.mlflow_tracking_uri or cfg.runtime.mlflow_tracking_uri.startswith("sqlite"):
        # A local store keeps artifacts in the workspace, not in ./mlruns of the caller's cwd.
        artifact_location = workspace_of(cfg).mlflow_artifacts.as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # created concurrently by another worker
        if exp is None:
            raise
        return exp.experiment_id


def flatten(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
    """Nested dict → ``{"a.b": v}`` for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(name, value))
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig, run_name: str = "pipeline") -> Iterator[mlflow.ActiveRun]:
    """The parent run: resolved config as params and artifact, git commit as a tag."""
    exp_id = ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        mlflow.set_tags({"fss.kind": "pipeline", "git_commit": git_commit() or "unknown"})
        mlflow.log_params({k: str(v)[:500] for k, v in flatten("", cfg.model_dump(mode="json")).items()})
        mlflow.log_text(cfg.to_yaml(), "config/resolved_config.yaml")
        yield run


@contextlib.contextmanager
def stage_run(
    cfg: PipelineConfig, stage: str, parent_run_id: str | None, build_key: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage, nested under the pipeline run (works from any process)."""
    exp_id = ensure_experiment(cfg)
    tags = {"fss.kind": "stage", "fss.stage": stage}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if build_key:
        tags["fss.build_key"] = build_key
    # A stage may run in a Dask worker thread where another run is active: never nest implicitly.
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags, nested=True) as run:
        section = stage if stage in PipelineConfig.model_fields else None
        if section:
            params = flatten(section, getattr(cfg, section).model_dump(mode="json"))
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield run
