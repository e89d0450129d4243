"""The workspace: one folder holding every durable artifact of a pipeline."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fss_core.config import PipelineConfig


@dataclass(frozen=True)
class Workspace:
    """Paths of the durable artifacts (design.md, "Durable artifacts")."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def synthetic_data(self) -> Path:
        return self.root / "data" / "synthetic"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.zarr"

    @property
    def backbone_dir(self) -> Path:
        return self.root / "backbone"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters.zarr"

    @property
    def pseudo_masks(self) -> Path:
        return self.root / "pseudo_masks"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks.zarr"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def workspace_of(cfg: PipelineConfig) -> Workspace:
    return Workspace(Path(cfg.runtime.workspace).expanduser().resolve()).ensure()


def source_root(cfg: PipelineConfig) -> Path:
    """The dataset root: the configured source, or the workspace's synthetic data."""
    if cfg.data.source is not None:
        return Path(cfg.data.source).expanduser().resolve()
    return workspace_of(cfg).synthetic_data


def git_commit() -> str | None:
    """The commit of the code that runs, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def save_resolved_config(cfg: PipelineConfig, ws: Workspace, run_name: str | None = None) -> Path:
    """Write the resolved config and git commit next to the run; returns the folder."""
    stamp = run_name or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    folder = ws.runs / stamp
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "git_commit.txt").write_text((git_commit() or "unknown") + "\n")
    return folder


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
