"""What every `defect-loop` command module shares: the console, the --config option, error
handling and the process environment for Prefect. Kept apart from `loop.cli` so that the
command modules (`cli_datasets`, `cli_report`, ...) can import it without an import cycle."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from loop.config import ProjectConfig, load_config
from loop.errors import DefectLoopError
from loop.services import PrefectService

T = TypeVar("T")

console = Console(soft_wrap=True)

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="project YAML file", envvar="DEFECT_LOOP_CONFIG"),
]


def load(config: Path) -> ProjectConfig:
    return load_config(config)


def run(fn: Callable[[], T]) -> T:
    """Call ``fn``; a `DefectLoopError` becomes a one-line message and exit code 2."""
    try:
        return fn()
    except DefectLoopError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


def prefect_service(cfg: ProjectConfig) -> PrefectService:
    """The project's local Prefect server: home ``<workspace>/prefect-server``, ``prefect.port``."""
    return PrefectService(home=cfg.workspace / "prefect-server", port=cfg.prefect.port)


def local_api_url(cfg: ProjectConfig) -> str | None:
    """The API URL of the project's local Prefect server when it runs and is healthy."""
    svc = prefect_service(cfg)
    status = svc.status()
    return svc.api_url if status["running"] and status["healthy"] else None


def prefect_env(cfg: ProjectConfig) -> None:
    """Prefect reads these when it is imported: set them before any flow module loads."""
    os.environ.setdefault("PREFECT_HOME", str(cfg.workspace / "prefect"))
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Runs go to this project's local Prefect server (and its UI) when one is running.
    url = local_api_url(cfg)
    if url and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = url


def jsonable(obj: Any) -> Any:
    """Dataclasses, dicts, sequences and paths -> plain JSON-able values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
