"""Concurrency: one pipeline per workspace. A second run started on a busy workspace fails at
once with one line naming the holder (or waits, when asked), touches nothing, and takes over the
lock of a run that was killed."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fss_cli.main import app
from tasks.workspace import LOCK_NAME, WorkspaceLockedError, workspace_lock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOLD = """
import sys, time
from tasks.workspace import workspace_lock
with workspace_lock(sys.argv[1], wait=float(sys.argv[3]), what="holder " + sys.argv[4]):
    print("held", flush=True)
    with open(sys.argv[5], "a") as journal:
        journal.write(sys.argv[4] + " start\\n"); journal.flush()
        time.sleep(float(sys.argv[2]))
        journal.write(sys.argv[4] + " end\\n")
"""


def holder(ws: Path, seconds: float, name: str = "A", wait: float = 0, journal: Path | None = None,
           ready: bool = True) -> subprocess.Popen:
    """Another process that takes the workspace lock and holds it for ``seconds``."""
    journal = journal or ws.parent / f"{name}.journal"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(ws), str(seconds), str(wait), name, str(journal)],
                               cwd=REPO, stdout=subprocess.PIPE, text=True)
    if ready:
        assert process.stdout.readline().strip() == "held"
    return process


def files(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*"))


@pytest.fixture
def ws(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


def test_a_second_run_fails_at_once_with_one_line_and_touches_nothing(ws):
    first = holder(ws, 120)
    try:
        before = files(ws)
        busy = (rf"error: workspace {re.escape(str(ws))} is in use by pid {first.pid} on "
                rf"{re.escape(socket.gethostname())} \(holder A, since [0-9T:+-]+\); wait for it to finish "
                rf"\(or set FSS_LOCK_WAIT=SECONDS to wait\)")
        started = time.monotonic()
        run = subprocess.run([str(BIN / "fss"), "run", "-w", str(ws)], capture_output=True, text=True, timeout=120,
                             cwd=ws.parent, env={**os.environ, "PREFECT_HOME": str(ws.parent / "prefect")})
        assert run.returncode == 1
        assert "Traceback" not in run.stdout + run.stderr
        assert re.fullmatch(busy, run.stderr.strip().splitlines()[-1]), run.stderr
        assert time.monotonic() - started < 60  # refused before Prefect, Dask or any stage starts

        result = CliRunner().invoke(app, ["ingest", str(ws.parent), "-w", str(ws)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert re.fullmatch(busy, result.stderr.strip().splitlines()[-1])
        assert files(ws) == before  # no manifest, no run folder, no store was touched
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_waiting_run_starts_when_the_first_one_ends(ws, monkeypatch):
    first = holder(ws, 1.5)
    started = time.monotonic()
    monkeypatch.setenv("FSS_LOCK_WAIT", "60")
    with workspace_lock(ws):
        assert (ws.parent / "A.journal").read_text() == "A start\nA end\n"  # it had finished and let go
        assert time.monotonic() - started > 0.5
    assert first.wait() == 0


def test_two_pipelines_started_together_run_one_after_the_other(ws, tmp_path):
    journal = tmp_path / "journal"
    runs = [holder(ws, 1.0, name, wait=60, journal=journal, ready=False) for name in ("A", "B")]
    for run in runs:
        assert run.wait(120) == 0
    lines = journal.read_text().splitlines()
    assert len(lines) == 4
    assert lines[0].split()[0] == lines[1].split()[0] and lines[2].split()[0] == lines[3].split()[0]
    assert [line.split()[1] for line in lines] == ["start", "end", "start", "end"]  # never interleaved


def test_the_lock_of_a_killed_run_is_taken_over(ws, caplog):
    first = holder(ws, 120)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert f'"pid": {first.pid}' in (ws / LOCK_NAME).read_text()  # its lock file is still there
    with caplog.at_level(logging.INFO, logger="tasks.workspace"):
        with workspace_lock(ws, wait=0):
            assert f'"pid": {os.getpid()}' in (ws / LOCK_NAME).read_text()
    assert f"taking over from pid {first.pid}" in caplog.text
    assert (ws / LOCK_NAME).read_text() == ""  # released: nobody named as holder


def test_the_lock_is_reentrant_within_a_process_and_exclusive_across(ws):
    with workspace_lock(ws):
        with workspace_lock(ws):  # the pipeline flow inside `fss run`, which already holds it
            pass
        probe = subprocess.run([sys.executable, "-c", HOLD, str(ws), "0", "0", "probe", os.devnull], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1 and "WorkspaceLockedError" in probe.stderr
    with pytest.raises(WorkspaceLockedError, match="in use by pid"):
        first = holder(ws, 120)
        try:
            with workspace_lock(ws, wait=0.3):
                pass
        finally:
            first.kill()
            first.wait()
