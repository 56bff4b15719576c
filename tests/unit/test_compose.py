"""Structure of docker/: no Docker engine runs here, so the compose file is parsed and checked
for consistency (services, ports, volumes, environment, commands) instead of started."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from loop.config import load_config
from loop.services import PrefectService

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent
# ${VAR}, ${VAR:-default}, ${VAR:?message}; "$$" escapes a literal "$" for the container.
_VAR = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")
NEEDED = {"postgres", "minio", "minio-init", "labelstudio", "mlflow", "prefect", "worker"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg or ""
        return ""

    return _VAR.sub(sub, value).replace("$$", "$")


def _env(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: _interpolate(str(v), env) for k, v in raw.items()}


def _command(service: dict[str, Any], env: dict[str, str]) -> list[str]:
    cmd = service.get("command") or []
    return [_interpolate(str(c), env) for c in (cmd if isinstance(cmd, list) else cmd.split())]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _published(service: dict[str, Any], env: dict[str, str]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in service.get("ports") or []:
        host, _, container = _interpolate(str(p), env).rpartition(":")
        out[int(container)] = int(host)
    return out


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of each volume."""
    out = {}
    for v in service.get("volumes") or []:
        parts = str(v).split(":")
        out[parts[1]] = parts[0]
    return out


def test_every_service_the_config_needs_is_there(compose: dict[str, Any]):
    services = compose["services"]
    assert set(services) >= NEEDED
    assert services["dask-scheduler"]["profiles"] == ["dask"]
    assert services["dask-worker"]["profiles"] == ["dask"]
    for name in NEEDED - {"minio-init"}:
        assert services[name].get("restart") == "unless-stopped", name


def test_variables_are_all_defined_in_env_example(
    compose: dict[str, Any], env_example: dict[str, str]
):
    text = (DOCKER / "compose.yaml").read_text()
    used = {m.group(1): m.group(2) for m in _VAR.finditer(text)}
    init = (DOCKER / "postgres" / "init-databases.sh").read_text()
    used_in_init = set(re.findall(r"\$\{([A-Z0-9_]+)\}", init)) - {"POSTGRES_USER"}
    # Every variable compose reads without a default is documented; nothing unused is.
    assert {v for v, op in used.items() if op != ":-"} <= set(env_example)
    assert set(env_example) <= set(used)
    # The init script's variables reach the postgres container.
    pg_env = compose["services"]["postgres"]["environment"]
    assert used_in_init <= set(pg_env)
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "LABEL_STUDIO_API_TOKEN"):
        assert "change-me" in env_example[key], f"{key} must be an obvious placeholder"
    assert len(env_example["MINIO_ROOT_PASSWORD"]) >= 8
    assert 6 <= len(env_example["LABEL_STUDIO_API_TOKEN"]) <= 40


def test_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]):
    declared = set(compose["volumes"])
    used = set()
    for name, svc in compose["services"].items():
        for target, source in _mounts(svc).items():
            assert target.startswith("/"), (name, target)
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, "every declared volume is used"


def test_ports_match_what_each_server_listens_on(
    compose: dict[str, Any], env_example: dict[str, str]
):
    s = compose["services"]
    mlflow_cmd = _command(s["mlflow"], env_example)
    prefect_cmd = _command(s["prefect"], env_example)
    assert _flag(mlflow_cmd, "--host") == "0.0.0.0" and _flag(prefect_cmd, "--host") == "0.0.0.0"
    listen = {
        "labelstudio": 8080,  # the image's default
        "mlflow": int(_flag(mlflow_cmd, "--port")),
        "prefect": int(_flag(prefect_cmd, "--port")),
        "minio": int(_flag(_command(s["minio"], env_example), "--console-address").lstrip(":")),
    }
    for name, port in listen.items():
        published = _published(s[name], env_example)
        assert port in published, f"{name} listens on {port} but publishes {published}"
    hosts = [h for svc in s.values() for h in _published(svc, env_example).values()]
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"
    # Healthchecks probe the port the server listens on.
    for name in ("labelstudio", "mlflow", "prefect"):
        probe = " ".join(s[name]["healthcheck"]["test"])
        assert f"localhost:{listen[name]}/" in probe, name


def test_depends_on_waits_for_healthchecks(compose: dict[str, Any]):
    s = compose["services"]
    for name, svc in s.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            continue
        for dep, cond in deps.items():
            assert dep in s, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in s[dep], f"{name} waits for {dep}, which has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert s[dep].get("restart") == "no"


def test_worker_reaches_every_service_by_name_and_port(
    compose: dict[str, Any], env_example: dict[str, str], monkeypatch: pytest.MonkeyPatch
):
    s = compose["services"]
    worker_env = _env(s["worker"], env_example)
    prefect_port = int(_flag(_command(s["prefect"], env_example), "--port"))
    mlflow_port = int(_flag(_command(s["mlflow"], env_example), "--port"))
    api = urlparse(worker_env["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path) == ("prefect", prefect_port, "/api")
    for name in ("dask-worker",):
        assert _env(s[name], env_example)["PREFECT_API_URL"] == worker_env["PREFECT_API_URL"]

    # The config the worker serves, with the worker's environment applied.
    mounts = _mounts(s["worker"])
    cmd = _command(s["worker"], env_example)
    config_target = _flag(cmd, "--config")
    assert config_target in mounts
    config_file = DOCKER / mounts[config_target]
    for key in list(os.environ):
        if key.startswith("DEFECT_LOOP_"):
            monkeypatch.delenv(key)
    for key, value in worker_env.items():
        if key.startswith("DEFECT_LOOP_"):
            monkeypatch.setenv(key, value)
    cfg = load_config(config_file)
    ls = urlparse(cfg.labelstudio.url)
    assert (ls.hostname, ls.port) == ("labelstudio", 8080)
    ml = urlparse(cfg.mlflow_uri)
    assert (ml.hostname, ml.port) == ("mlflow", mlflow_port)
    assert cfg.labelstudio.api_token is not None
    assert cfg.labelstudio.api_token.get_secret_value() == env_example["LABEL_STUDIO_API_TOKEN"]
    assert (
        _env(s["labelstudio"], env_example)["LABEL_STUDIO_USER_TOKEN"]
        == (env_example["LABEL_STUDIO_API_TOKEN"])
    )
    assert cfg.scoring.dask_address is None  # empty in .env.example: score in the worker

    # Label Studio serves the images: the workspace is below its document root, on the same
    # volume mounted at the same path in both containers.
    root = Path(_env(s["labelstudio"], env_example)["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"])
    assert cfg.ls_document_root == root
    assert cfg.paths.images.is_relative_to(root)
    assert _mounts(s["labelstudio"])[str(root)] == mounts[str(root)]
    assert cfg.workspace.is_relative_to(root)
    for name in ("dask-worker",):
        assert _mounts(s[name])[str(root)] == mounts[str(root)], "Dask workers share the volume"
    # MLflow's artifacts go to the bucket minio-init creates, through the MinIO endpoint.
    ml_env = _env(s["mlflow"], env_example)
    assert urlparse(ml_env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    bucket = _env(s["minio-init"], env_example)["MLFLOW_BUCKET"]
    assert _flag(_command(s["mlflow"], env_example), "--artifacts-destination") == f"s3://{bucket}/"
    assert f"mlflow:{mlflow_port}" in ml_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    db = urlparse(_flag(_command(s["mlflow"], env_example), "--backend-store-uri"))
    assert db.hostname == "postgres" and db.password == env_example["MLFLOW_DB_PASSWORD"]
    pdb = urlparse(_env(s["prefect"], env_example)["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert pdb.hostname == "postgres" and pdb.password == env_example["PREFECT_DB_PASSWORD"]
    # Dask: the address the worker would use names the scheduler service and its port.
    sched_port = _flag(_command(s["dask-scheduler"], env_example), "--port")
    assert _command(s["dask-worker"], env_example)[2] == f"tcp://dask-scheduler:{sched_port}"
    assert f"tcp://dask-scheduler:{sched_port}" in (DOCKER / ".env.example").read_text()


def test_images_run_the_commands_the_tests_run(
    compose: dict[str, Any], env_example: dict[str, str]
):
    s = compose["services"]
    # The worker: `defect-loop serve --config ...`, as the Dockerfile's default command, and the
    # command the served-deployment integration test runs.
    worker_cmd = _command(s["worker"], env_example)
    assert worker_cmd[:2] == ["defect-loop", "serve"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    cmd_line = next(ln for ln in dockerfile.splitlines() if ln.startswith("CMD "))
    assert yaml.safe_load(cmd_line[4:]) == worker_cmd
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["defect-loop"] == "loop.cli:app"
    from typer.main import get_command

    from loop import cli
    from loop.cli import serve as cli_serve

    standalone = get_command(cli_serve.standalone_app())
    assert {"serve", "prefect-server"} <= set(standalone.commands)  # type: ignore[attr-defined]
    registered = {c.name: c.callback for c in cli.app.registered_commands}
    assert registered["serve"] is cli_serve.serve
    # The Prefect server: the same `prefect server start --host H --port P` that PrefectService
    # (used by the tests and `defect-loop prefect-server start`) runs.
    local = PrefectService(home=Path("/tmp/unused"), port=4200).command()
    start = local.index("server")
    prefect_cmd = _command(s["prefect"], env_example)
    assert prefect_cmd[0] == "prefect" and prefect_cmd[1:4] == local[start : start + 3]
    assert "--analytics-off" in prefect_cmd and "--analytics-off" in local
    # What the Dockerfile copies exists and it installs the Dask runner.
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert "prefect-dask" in dockerfile and "distributed" in dockerfile
    assert "psycopg2" in dockerfile and "boto3" in dockerfile  # MLflow on Postgres + S3
    # The extras it installs exist (scoring.backend onnx / onnx-int8 needs the onnx one).
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert '".[onnx]"' in dockerfile and "onnxruntime>=1.20" in extras["onnx"]


def test_readme_documents_the_cli_trigger():
    text = (DOCKER / "README.md").read_text()
    assert "prefect deployment run 'cycle/defect-loop' --watch" in text
    assert "PREFECT_API_URL" in text and "--profile dask" in text
