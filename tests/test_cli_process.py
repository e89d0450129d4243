"""The garbage collector's settings in the `fss` process and in the processes Dask workers are
forked from: imports frozen out of the collector's reach, everything else collected as usual,
nothing lost at exit."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest

from fss_cli.process import heavy_imports


def _python(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_outside_the_console_process_imports_leave_the_collector_alone():
    """A library user of the CLI (this test process, for one) keeps its collector as it was."""
    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    with heavy_imports():
        import fractions  # noqa: F401
    assert gc.get_freeze_count() == frozen
    assert gc.isenabled() == enabled


def test_the_console_process_freezes_its_imports_and_collects_the_rest(tmp_path):
    done = _python("""
        import gc, sys
        from fss_cli.process import console_process, heavy_imports

        console_process()
        with heavy_imports():
            assert not gc.isenabled()
            import decimal, email.message, xml.dom.minidom
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen

        # a cycle made after the imports is still collected
        a = []; a.append(a)
        del a
        assert gc.collect() >= 1
        assert gc.get_freeze_count() == frozen

        # the collector comes back on when an import fails
        try:
            with heavy_imports():
                import no_such_module_here  # noqa: F401
        except ImportError:
            pass
        assert gc.isenabled()
        print("ok")
    """)
    assert done.stdout.strip() == "ok"


def test_nothing_is_lost_at_exit(tmp_path):
    """Garbage in a reference cycle is still finalised when the process exits, as in a plain
    interpreter (where the last collection happens during teardown), and the other exit handlers
    still run."""
    finalised, marker = tmp_path / "finalised.txt", tmp_path / "atexit.txt"
    _python(f"""
        import atexit
        from fss_cli.process import console_process, heavy_imports

        console_process()
        with heavy_imports():
            import decimal  # noqa: F401
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))

        class Resource:
            def __del__(self):
                with open({str(finalised)!r}, "w") as f:
                    f.write("finalised")

        r = Resource()
        r.self = r
        del r
    """)
    assert finalised.read_text() == "finalised"
    assert marker.read_text() == "ran"


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_a_worker_forked_from_the_forkserver_collects_with_the_stack_frozen():
    """The forkserver imports with its collector off; the worker it forks starts with the
    collector on, as a spawned one does, and the imported stack frozen."""
    done = _python("""
        import gc, os, sys
        import flows.forkserver_setup  # first, as in the forkserver's preload
        import decimal, email.message  # the stack, imported after it

        assert not gc.isenabled()  # the forkserver itself never collects
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, f"{int(gc.isenabled())} {gc.get_freeze_count()}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        enabled, frozen = map(int, os.read(read, 100).split())
        assert enabled == 1
        assert frozen > 1000, frozen
        print("ok")
    """)
    assert done.stdout.strip() == "ok"


def test_with_a_configured_server_no_temporary_one_is_started(prefect_harness):
    from fss_cli.process import start_temporary_prefect_server

    assert start_temporary_prefect_server() is None


@pytest.mark.parametrize("prefect_stops_it", [True, False])
def test_without_a_server_the_flow_finds_the_temporary_one_started_early(tmp_path, prefect_stops_it):
    """The temporary server started before the imports is the one Prefect's client then uses,
    already answering; it is stopped when the process exits, by Prefect's exit handler or, where
    the process exits before Prefect has registered that handler (Ctrl-C as the server starts),
    by the one `start_temporary_prefect_server` registers first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    code = textwrap.dedent("""
        import sys
        from fss_cli.process import start_temporary_prefect_server
        from prefect.client.orchestration import get_client
        from prefect.server.api.server import SubprocessASGIServer

        thread = start_temporary_prefect_server()
        thread.join()
        server = SubprocessASGIServer()
        assert server.running and server.server_process.poll() is None
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == server.api_url, (client.api_url, server.api_url)
            assert client.api_healthcheck() is None  # None: healthy
        if sys.argv[1] == "without-prefect-stop":
            import atexit
            atexit.unregister(server.stop)
        print(server.server_process.pid)
    """)
    case = "with-prefect-stop" if prefect_stops_it else "without-prefect-stop"
    done = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    pid = int(done.stdout.strip().splitlines()[-1])
    deadline = time.time() + 30
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), "the temporary server outlived the process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
