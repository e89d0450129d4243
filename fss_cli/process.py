"""How the `fss` process starts and ends: its garbage collector, set for a short process that imports
a large stack; Prefect's temporary server started early; and Ctrl-C.

CPython's cyclic collector walks every object it tracks on each full collection, and runs one
whenever the tracked objects have grown by a quarter. Importing torch, Prefect, MLflow, Dask and
zarr creates about a million of them. Measured on this project's machines
(docs/benchmarks.md, "orchestration"):

- the collections during those imports take about a quarter of the imports' time;
- the interpreter's own collections when it exits took about 2 s after a pipeline run, mostly
  spent walking those same objects again.

Objects created by imports live as long as the process does, so the collector gains nothing by
walking them. :func:`heavy_imports` imports with the collector off, then moves everything that
exists into the collector's permanent generation (:func:`gc.freeze`), which it never walks;
collection then goes on as usual for everything created later. At exit, after every other
``atexit`` handler (Prefect's and MLflow's flushes included), one last collection finalises the
run's own garbage and the rest is frozen, so the interpreter frees the modules without walking
the whole heap again and again.

Only the console entry point turns this on (:func:`console_process`). A process that imports
the CLI as a library, the test suite for one, keeps the collector as it was: freezing there would
keep whatever happened to be alive out of the collector's reach for good.

Ctrl-C at a terminal sends SIGINT to every process of the foreground group, not only to `fss`.
Prefect's temporary server (a uvicorn process) died of it at once, so the flow engine, which
records the interruption on that server before it lets go, retried against a closed port for
minutes and the command ended on a connection error. The temporary server therefore runs in a
session of its own (:func:`start_temporary_prefect_server`): Ctrl-C reaches only `fss`, which
records the run as crashed, stops the Dask cluster and then the server (Prefect's exit handler),
and exits with 130. Since a terminal's hangup and a plain ``kill`` no longer reach the server
either, :func:`hangup_and_term_interrupt` turns both into the same interruption in `fss`, so the
server is still stopped. The local Dask workers ignore SIGINT for the same reason
(``flows.forkserver_setup``): the flow's process stops them as it closes its cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import signal
import subprocess
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

_console = False


def console_process() -> None:
    """Mark this process as the `fss` command: :func:`heavy_imports` freezes what they import,
    and the interpreter's exit skips walking the objects alive at exit."""
    global _console
    _console = True
    # Handlers run last-in first-out: registered before the stack is imported, this one runs after
    # the stack's own handlers.
    atexit.register(_collect_then_freeze)


def _collect_then_freeze() -> None:
    # One collection first, so that the run's cyclic garbage is still finalised (its __del__ runs),
    # as the interpreter's teardown would; it walks only what the run created, since the imports
    # are frozen. Then the teardown has nothing left to walk.
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import inside this block with the collector off, then freeze what exists; a no-op outside
    the console process."""
    if not _console:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def start_temporary_prefect_server() -> threading.Thread | None:
    """Start Prefect's temporary server now, on a thread, when the flow would start one anyway.

    With no ``PREFECT_API_URL``, a flow's first call to the Prefect API starts a temporary server
    (a uvicorn process, about 3.5 s to boot here) and waits for it. Started here, before the
    command imports its stack, it boots on another core meanwhile. It is Prefect's own server
    object (one per process), so the flow finds it running and uses it, and Prefect stops it at
    exit as before. Join the thread before the flow starts: it ends once the server answers. If
    the start fails, the flow starts the server itself, as it would have, and reports the error.
    None where a server is configured or temporary servers are off."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    # Registered here, on the main thread, before the server can exist: if the command is
    # interrupted while the thread is starting the server, Prefect's own exit handler may not be
    # registered yet, and a server in a session of its own would outlive the command.
    atexit.register(stop_detached_servers)

    def boot() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            detach_temporary_servers()
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's own start raises it again, with Prefect's message
            log.debug("the temporary Prefect server did not start early", exc_info=True)

    thread = threading.Thread(target=boot, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread


class _NewSessionSubprocess:
    """The ``subprocess`` module as Prefect's server module sees it: its ``Popen`` is
    :func:`start_detached`; the rest is unchanged."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs) -> subprocess.Popen:  # noqa: N802 - the name it stands in for
        return start_detached(*args, **kwargs)


_detached_lock = threading.Lock()
_detached: list[subprocess.Popen] = []
_detached_closed = False


def start_detached(*args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a session of its own, away from the terminal's signals, and
    recorded for :func:`stop_detached_servers`. Refused once that has run: the process exits."""
    kwargs.setdefault("start_new_session", True)
    with _detached_lock:
        if _detached_closed:
            raise RuntimeError("this process is exiting: no new server is started")
        process = subprocess.Popen(*args, **kwargs)
        _detached.append(process)
    return process


def stop_detached_servers(timeout: float = 5.0) -> None:
    """Stop every process :func:`start_detached` started that is still running, and start no
    more: at exit.

    Prefect's exit handler normally has stopped its server already, and then this does nothing.
    It covers an exit while the server is being started on another thread, before Prefect has
    registered that handler: it waits for a process being created, then stops it."""
    global _detached_closed
    if not _detached_lock.acquire(timeout=30):
        log.warning("a temporary Prefect server is still starting; it may outlive this command")
        return
    try:
        _detached_closed = True
        for process in _detached:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    finally:
        _detached_lock.release()


def detach_temporary_servers() -> None:
    """Start Prefect's temporary servers in a session of their own from now on (module doc).

    This process's own start and a start by the flow engine go through the same module, so both
    are covered. The server is still stopped at this process's exit, by Prefect's exit handler
    (or by :func:`stop_detached_servers`, which :func:`start_temporary_prefect_server` registers)."""
    import prefect.server.api.server as server_module

    if not isinstance(server_module.subprocess, _NewSessionSubprocess):
        server_module.subprocess = _NewSessionSubprocess()


def _interrupt(signum, frame) -> None:
    # Once: while the run winds down, a second hangup or SIGTERM is ignored (Ctrl-C still works).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def hangup_and_term_interrupt() -> Iterator[None]:
    """Inside, SIGHUP (the terminal closed) and SIGTERM (``kill``) end the command as Ctrl-C does,
    so its cleanup still runs: a run's exit handlers stop the temporary server and the workers,
    `fss ui` stops its servers. Outside the main thread
    (where signals cannot be handled) a no-op; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
