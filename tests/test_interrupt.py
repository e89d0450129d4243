"""Ctrl-C, a closed terminal and ``kill`` stop a run within seconds, say so in one line, leave no
server or worker behind, and the next run picks up where it stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.tiny_config import TINY

REPO = Path(__file__).resolve().parents[1]
FSS = Path(sys.executable).parent / "fss"
SERVER_LINE = re.compile(r"Starting temporary server on http://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the module's runs: its database is created once."""
    return tmp_path_factory.mktemp("prefect-home")


def _env(prefect_home: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)  # the command starts Prefect's temporary server, as the demo does
    return env


def _start_run(ws: Path, prefect_home: Path, log: Path) -> subprocess.Popen:
    """`fss run` in a process group of its own, as a shell runs a foreground job."""
    args = [str(FSS), "run", "--workspace", str(ws)]
    for setting in [*TINY, "train.epochs=30"]:  # training lasts long enough to be interrupted
        args += ["--set", setting]
    return subprocess.Popen(args, env=_env(prefect_home), cwd=ws.parent, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(log: Path, pattern: str, process: subprocess.Popen, timeout: float = 240) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert process.poll() is None, f"the run ended before {pattern!r}:\n{log.read_text()}"
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n{log.read_text()}")


def _server_on(port: int):
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "uvicorn" in cmdline and str(port) in cmdline:
            return proc
    raise AssertionError(f"no temporary server process on port {port}")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_run_stops_at_once_and_the_next_run_finishes_it(tmp_path, prefect_home, how):
    ws = tmp_path / "ws"
    log = tmp_path / "first.log"
    run = _start_run(ws, prefect_home, log)
    port = int(_wait_for(log, SERVER_LINE.pattern, run).group(1))
    _wait_for(log, r"Beginning subflow run", run)
    time.sleep(3)  # the stages have started on the workers
    # The temporary server runs in a session of its own, which a terminal's Ctrl-C does not reach.
    server = _server_on(port)
    assert os.getsid(server.pid) != os.getsid(run.pid)
    interrupted = time.monotonic()
    if how == "ctrl-c":
        os.killpg(run.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    else:
        os.kill(run.pid, signal.SIGTERM)  # `kill PID`: the command alone
    try:
        code = run.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        raise AssertionError(f"still running 90 s after the interruption:\n{log.read_text()}") from None
    took = time.monotonic() - interrupted
    out = log.read_text()

    assert code == 130, out
    assert "error: interrupted: what was done is kept in the workspace; the same command resumes" in out
    assert "Traceback" not in out, out
    assert "ConnectError" not in out and "Connection refused" not in out, out
    assert took < 60, f"{took:.0f} s to stop"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (_port_closed(port) and not _group_alive(run.pid)):
        time.sleep(0.2)
    assert _port_closed(port), "the temporary Prefect server outlived the command"
    assert not _group_alive(run.pid), "a process of the command (a Dask worker?) outlived it"

    if how != "ctrl-c":
        return
    # The workspace is free and the next run finishes the job.
    again = subprocess.run([str(FSS), "run", "--workspace", str(ws), *[a for s in [*TINY, "train.epochs=30"]
                                                                       for a in ("--set", s)]],
                           env=_env(prefect_home), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pipeline finished" in again.stdout
    printed = again.stdout + again.stderr  # no noise from registering the model
    assert "Downloading artifacts" not in printed and "CloudPickle" not in printed
    assert "input example was not provided" not in printed
    assert list((ws / "models").glob("unsupervised-*/weights.pt")), "no model after the second run"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, cwd=REPO)


def test_sigterm_and_sighup_interrupt_the_command_like_ctrl_c():
    done = _python("""
        import os, signal
        from fss_cli.process import hangup_and_term_interrupt

        before = signal.getsignal(signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                with hangup_and_term_interrupt():
                    os.kill(os.getpid(), sig)  # handled before the next line runs
                print("not interrupted by", sig.name)
            except KeyboardInterrupt:
                print("interrupted by", sig.name)
        assert signal.getsignal(signal.SIGTERM) is before
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interrupted by SIGTERM" in done.stdout and "interrupted by SIGHUP" in done.stdout, done.stdout


def test_local_dask_workers_ignore_ctrl_c(tmp_path):
    """The process that started the cluster stops its workers; Ctrl-C itself does not kill them."""
    (tmp_path / "probe_sigint.py").write_text(
        "import signal\n"
        "def report(queue):\n"
        "    queue.put(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    done = _python(f"""
        import multiprocessing, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from flows.dask_runtime import start_worker_forkserver
        from probe_sigint import report

        assert start_worker_forkserver()
        ctx = multiprocessing.get_context("forkserver")  # the context local Dask workers start from
        queue = ctx.Queue()
        worker = ctx.Process(target=report, args=(queue,))
        worker.start()
        print("worker ignores SIGINT:", queue.get(timeout=60))
        worker.join(60)
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "worker ignores SIGINT: True" in done.stdout


def test_a_server_started_as_the_command_exits_does_not_outlive_it():
    """The window Prefect's own exit handler leaves: the server's process exists but its stop is
    not registered yet when the command exits (Ctrl-C at that moment). The handler that
    `start_temporary_prefect_server` registers beforehand stops it, and refuses later starts."""
    import psutil

    done = _python("""
        import atexit, os, sys
        from fss_cli import process

        SERVER = [sys.executable, "-c", "import time; time.sleep(300)"]

        def start_after_the_stop():
            try:
                process.start_detached(SERVER)
                print("started after the stop")
            except RuntimeError as error:
                print("refused:", error)

        atexit.register(start_after_the_stop)  # handlers run last-in first-out: after the stop
        atexit.register(process.stop_detached_servers)  # as start_temporary_prefect_server does
        server = process.start_detached(SERVER)
        print("pid", server.pid, "own session", os.getsid(server.pid) != os.getsid(0), flush=True)
        # the process exits here, with no handler of Prefect's to stop the server
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "own session True" in done.stdout, done.stdout
    assert "refused: this process is exiting" in done.stdout, done.stdout
    pid = int(re.search(r"pid (\d+)", done.stdout).group(1))
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the server started as the command exited outlived it"
