"""Deployments: a real local Prefect server, `fss serve`, and a run triggered from the CLI; how
`fss serve` and `fss ui` start, fail and stop (with stand-ins for the servers, except in the slow test)."""

from __future__ import annotations


import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fss_cli.main import app
from fss_core.data.manifest import read_manifest
from tests.servers import BIN, background, prefect_server
from tests.tiny_config import TINY


def test_serve_refuses_to_start_without_a_prefect_server(monkeypatch):
    """Without PREFECT_API_URL, Prefect would serve against a private temporary server whose
    scheduler is off: the cron retrain would never run, and no UI would show the deployments."""
    import flows.deploy
    from prefect.settings import PREFECT_API_URL, temporary_settings

    served = []
    monkeypatch.setattr(flows.deploy, "serve_deployments", lambda **kwargs: served.append(kwargs))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert not served
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in lines[0]
    assert "fss ui" in lines[0] and "prefect server start" in lines[0]


def test_serve_serves_the_deployments_against_the_configured_server(monkeypatch):
    import flows.deploy
    from prefect.settings import PREFECT_API_URL, temporary_settings

    served = []
    monkeypatch.setattr(flows.deploy, "serve_deployments", lambda **kwargs: served.append(kwargs))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        result = CliRunner().invoke(app, ["serve", "--retrain-cron", "0 3 * * *"])
    assert result.exit_code == 0, result.output
    assert len(served) == 1 and served[0]["retrain_cron"] == "0 3 * * *"


def test_serve_builds_the_manual_and_the_scheduled_deployments():
    from flows.deploy import build_deployments

    deployments = build_deployments(retrain_cron="0 3 * * *")
    assert [d.name for d in deployments] == ["manual", "scheduled"]


def test_a_custom_run_with_its_own_overrides_keeps_the_settings_serve_was_started_with(tmp_path):
    """Prefect replaces a parameter a custom run sets: `fss serve`'s settings (the workspace,
    the tracking store) live in their own parameter, so a run's overrides add to them."""
    from flows.deploy import build_deployments
    from flows.pipeline import pipeline
    from flows.retrain import retrain

    class Resolved(Exception):
        """Raised by the stand-in config loader: the run stops once its settings are known."""

    def load_config(path, overrides, base=None):
        raise Resolved(overrides)

    flows = {"manual": pipeline, "scheduled": retrain}
    site = [f"runtime.workspace={tmp_path / 'ws'}", "runtime.mlflow_tracking_uri=http://mlflow:5000"]
    for deployment in build_deployments(overrides=site):
        assert deployment.parameters["serve_overrides"] == site and deployment.parameters["overrides"] == []
        run = {**deployment.parameters, "overrides": ["train.epochs=1"]}  # what a custom run sends
        with pytest.MonkeyPatch.context() as m:
            m.setattr(f"{flows[deployment.name].fn.__module__}.load_config", load_config)
            with pytest.raises(Resolved) as resolved:
                flows[deployment.name].fn(**run)
        assert resolved.value.args[0] == [*site, "train.epochs=1"], deployment.name


def test_a_broken_retrain_flow_is_an_error_not_a_missing_schedule(monkeypatch):
    """An import error in the retrain flow's modules used to drop the cron deployment silently."""
    from flows.deploy import build_deployments

    monkeypatch.setitem(sys.modules, "flows.retrain", None)  # importing it now raises ImportError
    with pytest.raises(ImportError):
        build_deployments()


class FakeServer:
    """Stands in for a server process of ``fss ui``: it runs until terminated, unless its
    behaviour (set per program name in ``FakeServer.behaviour``) says otherwise:
    an int: it has exited with that code; "interrupt": Ctrl-C arrives while the command waits."""

    behaviour: dict[str, object] = {}
    started: list[FakeServer] = []
    real = None

    def __new__(cls, args, **kwargs):
        name = Path(str(args[0])).name
        if name not in ("mlflow", "prefect"):
            return cls.real(args, **kwargs)
        server = super().__new__(cls)
        server.name, server.args, server.env = name, list(args), kwargs.get("env")
        server.terminated = False
        what = cls.behaviour.get(name)
        server.returncode = what if isinstance(what, int) else None
        cls.started.append(server)
        return server

    def poll(self):
        if self.behaviour.get(self.name) == "interrupt" and not self.terminated:
            raise KeyboardInterrupt
        return self.returncode

    def terminate(self):
        self.terminated = True
        if self.returncode is None:
            self.returncode = -signal.SIGTERM

    def kill(self):
        self.terminate()

    def wait(self, timeout=None):
        return self.returncode


@pytest.fixture
def fake_servers(monkeypatch):
    FakeServer.behaviour, FakeServer.started, FakeServer.real = {}, [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    return FakeServer


@pytest.mark.parametrize("extra, host", [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")])
def test_ui_prefect_server_tells_its_ui_the_port_and_host_it_serves_on(fake_servers, tmp_path, extra, host):
    """`prefect server start --port P` alone leaves the UI calling the API at 127.0.0.1:4200."""
    fake_servers.behaviour = {"mlflow": "interrupt"}
    result = CliRunner().invoke(app, ["ui", "-w", str(tmp_path / "ws"), "--prefect-port", "4301",
                                      "--mlflow-port", "5301", *extra])
    assert result.exit_code == 0, result.output
    prefect = next(s for s in fake_servers.started if s.name == "prefect")
    assert prefect.args[prefect.args.index("--port") + 1] == "4301"
    assert prefect.env["PREFECT_SERVER_API_PORT"] == "4301"
    assert prefect.env["PREFECT_SERVER_API_HOST"] == host
    assert prefect.env["PREFECT_UI_API_URL"] == f"http://{host}:4301/api"


def test_ui_keeps_a_ui_api_url_set_by_the_user(fake_servers, tmp_path, monkeypatch):
    """Behind --host 0.0.0.0 only the user knows the address browsers reach the API at."""
    monkeypatch.setenv("PREFECT_UI_API_URL", "http://fss.example:4200/api")
    fake_servers.behaviour = {"mlflow": "interrupt"}
    result = CliRunner().invoke(app, ["ui", "-w", str(tmp_path / "ws"), "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    prefect = next(s for s in fake_servers.started if s.name == "prefect")
    assert prefect.env["PREFECT_UI_API_URL"] == "http://fss.example:4200/api"


def test_ui_stops_and_fails_when_a_server_exits(fake_servers, tmp_path):
    """The MLflow port is taken, say: its server exits; the command stops the Prefect server,
    names the server that exited, and fails."""
    fake_servers.behaviour = {"mlflow": 1}
    result = CliRunner().invoke(app, ["ui", "-w", str(tmp_path / "ws"), "--mlflow-port", "5302"])
    assert result.exit_code == 1, result.output
    prefect = next(s for s in fake_servers.started if s.name == "prefect")
    assert prefect.terminated
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "MLflow" in lines[0] and "5302" in lines[0] and "code 1" in lines[0]


def test_ui_on_ctrl_c_stops_both_servers(fake_servers, tmp_path):
    fake_servers.behaviour = {"prefect": "interrupt"}
    result = CliRunner().invoke(app, ["ui", "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert len(fake_servers.started) == 2 and all(s.terminated for s in fake_servers.started)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ui_on_sigterm_stops_both_servers(tmp_path):
    """`kill PID` (a service manager, a container stop) stops the servers as Ctrl-C does.
    The servers are `sleep` stand-ins; the command itself runs for real in its own process."""
    pids = tmp_path / "pids"
    code = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path

        real = subprocess.Popen

        def popen(args, **kwargs):
            if Path(str(args[0])).name in ("mlflow", "prefect"):
                proc = real(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open({str(pids)!r}, "a") as f:
                    f.write(f"{{proc.pid}}\\n")
                return proc
            return real(args, **kwargs)

        subprocess.Popen = popen
        from fss_cli.main import app
        app(["ui", "-w", {str(tmp_path / "ws")!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    started = []
    try:
        output = ""
        for line in proc.stdout:
            output += line
            if "Ctrl-C stops both" in line:
                break
        started = [int(pid) for pid in pids.read_text().split()]
        assert len(started) == 2, output
        proc.send_signal(signal.SIGTERM)
        output += proc.communicate(timeout=60)[0]
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in started), f"servers left running after SIGTERM:\n{output}"
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # the stand-ins this test started, if the command leaked them
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_served_pipeline_deployment_runs_to_completion(tmp_path):
    ws = tmp_path / "ws"
    with prefect_server(tmp_path) as (api, env):
        serve_log = tmp_path / "serve.log"
        with background([str(BIN / "fss"), "serve", "--retrain-cron", "0 3 * * *"], env, serve_log):
            # The deployment appears once `serve` has registered it.
            for _ in range(120):
                ls = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True,
                                    text=True, timeout=60)
                if "fss-pipeline/manual" in ls.stdout:
                    break
                subprocess.run(["sleep", "1"])
            else:
                pytest.fail(f"deployment never registered:\n{serve_log.read_text()[-3000:]}")
            params = {"overrides": [f"runtime.workspace={ws}", *TINY, "runtime.n_workers=1"], "until": "cluster"}
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "fss-pipeline/manual", "--params", json.dumps(params),
                 "--watch", "--watch-timeout", "400"],
                env=env, capture_output=True, text=True, timeout=450,
            )
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + serve_log.read_text()[-3000:]
            assert "Completed" in run.stdout + run.stderr
    rows = read_manifest(ws / "manifest.jsonl")
    assert len(rows) == 40
    assert (ws / "clusters.zarr").is_dir()
