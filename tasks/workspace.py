"""The workspace: one folder holding every durable artifact of a pipeline, and its lock."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fss_core.config import PipelineConfig
from fss_core.data.layouts import WORKSPACE_MARKER

log = logging.getLogger(__name__)

LOCK_NAME = ".fss.lock"
LOCK_WAIT_ENV = "FSS_LOCK_WAIT"  # seconds a run waits for a busy workspace; unset or 0 = fail at once


class WorkspaceLockedError(RuntimeError):
    """Another pipeline holds the workspace; the message names its process."""


class SourceInWorkspaceError(ValueError):
    """The configured source is the workspace itself or lies in one of its output folders."""


@dataclass(frozen=True)
class Workspace:
    """Paths of the workspace's durable artifacts."""

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

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def marker(self) -> Path:
        return self.root / WORKSPACE_MARKER

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The folders the pipeline writes its artifacts into."""
        return (self.embeddings, self.backbone_dir, self.clusters, self.pseudo_masks, self.tasks, self.models,
                self.evaluation, self.runs, self.mlflow_artifacts)

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def mark(self) -> None:
        """Leave the marker file that makes a scan of an image folder skip this workspace."""
        if not self.marker.is_file():
            atomic_write_text(self.marker, "This folder is a workspace of the fss pipeline: its files are "
                                           "outputs, and ingesting an image folder that holds it skips it.\n")


def workspace_of(cfg: PipelineConfig) -> Workspace:
    return Workspace(Path(cfg.runtime.workspace).expanduser().resolve()).ensure()


def source_root(cfg: PipelineConfig) -> Path:
    """The dataset root: the configured source, or the workspace's synthetic data."""
    if cfg.data.source is not None:
        return Path(cfg.data.source).expanduser().resolve()
    return workspace_of(cfg).synthetic_data


def check_source(cfg: PipelineConfig) -> None:
    """Refuse a configured source that is the workspace itself or lies in one of its output folders.

    Ingesting either would take the pipeline's own outputs for images. A workspace inside the
    source is fine: the scan skips it (see :meth:`Workspace.mark`).
    """
    if cfg.data.source is None:
        return
    ws, source = workspace_of(cfg), source_root(cfg)
    if source == ws.root:
        raise SourceInWorkspaceError(
            f"data.source {source} is the workspace itself, whose files are the pipeline's outputs; use a "
            f"workspace folder of its own (runtime.workspace or -w), e.g. {source / 'workspace'}")
    for folder in ws.outputs:
        if source.is_relative_to(folder):
            raise SourceInWorkspaceError(
                f"data.source {source} lies in the workspace's output folder {folder}, whose files are the "
                f"pipeline's outputs, not a dataset; point data.source at the images")


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


# Locks this process holds, by lock path: (open file, depth), so a flow called by a command that
# already holds the lock re-enters it instead of waiting on itself.
_held: dict[Path, list] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike, wait: float | None = None, what: str | None = None) -> Iterator[Path]:
    """Hold the workspace's lock for the block: one pipeline (or ingest) per workspace at a time.

    The lock is an ``flock`` on ``ROOT/.fss.lock``, so the kernel drops it when its process
    dies, however it dies: a lock file left by a dead process is simply taken over. The file
    records the holder (pid, host, command, start time) for the message a second run gets.
    ``wait``: seconds to wait for a busy workspace (None = ``$FSS_LOCK_WAIT``, else 0); then
    :class:`WorkspaceLockedError`. Re-entrant within a process.
    """
    path = (Path(root).expanduser().resolve() / LOCK_NAME)
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path][1] -= 1
        return
    if wait is None:
        wait = float(os.environ.get(LOCK_WAIT_ENV) or 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        _acquire(handle, path, wait)
        previous = _read_holder(handle)
        if previous and previous.get("pid") != os.getpid():
            log.info("workspace lock %s: taking over from pid %s (%s), which is no longer running",
                     path, previous.get("pid"), previous.get("command", "?"))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": what or " ".join(sys.argv)[:200],
                                 "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}) + "\n")
        handle.flush()
        with _held_guard:
            _held[path] = [handle, 1]
        try:
            yield path
        finally:
            with _held_guard:
                del _held[path]
            handle.seek(0)
            handle.truncate()  # an empty file: nobody holds it
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _acquire(handle, path: Path, wait: float) -> None:
    deadline = time.monotonic() + max(wait, 0.0)
    announced = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _describe_holder(_read_holder(handle))
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                raise WorkspaceLockedError(
                    f"workspace {path.parent} is in use by {holder}{waited}; wait for it to finish "
                    f"(or set {LOCK_WAIT_ENV}=SECONDS to wait)") from None
            if not announced:
                log.info("workspace %s is in use by %s; waiting up to %g s", path.parent, holder, wait)
                announced = True
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))


def _read_holder(handle) -> dict:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"({holder.get('command', '?')}, since {holder.get('started', '?')})")
