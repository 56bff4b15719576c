"""`defect-loop serve` and `defect-loop prefect-server start|stop|status`.

Registered on the main app in `loop.cli.main` by ``app.command("serve")(serve)`` and
``app.add_typer(prefect_server_app, name="prefect-server")``.

Standalone (same commands): ``python -m loop.cli.serve serve --config defect-loop.yaml``.
Nothing here imports Prefect at module level: `serve` sets PREFECT_API_URL first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import httpx
import typer

from loop.cli.common import ConfigOpt, local_api_url, prefect_env, prefect_service, run
from loop.config import DEFAULT_CONFIG_NAME, ProjectConfig, load_config
from loop.errors import ServiceError

prefect_server_app = typer.Typer(
    help="Start, stop and inspect a local Prefect server on 127.0.0.1 (SQLite): its UI shows "
    "the flow runs, and `defect-loop serve` needs it for schedules and triggers.",
    no_args_is_help=True,
)


def resolve_api_url(cfg: ProjectConfig, start_server: bool = False) -> str:
    """PREFECT_API_URL from the environment, else the running local server, else (with
    ``start_server``) a local server started now. Raises `ServiceError` saying what to do."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    url = local_api_url(cfg)
    if url:
        return url
    if start_server:
        svc = prefect_service(cfg)
        svc.start()
        return svc.api_url
    raise ServiceError(
        "`defect-loop serve` needs a Prefect server for its schedules and triggers, and none is "
        "configured: run `defect-loop prefect-server start` first (or pass --start-server), or "
        "set PREFECT_API_URL=http://<host>:4200/api to use a running one"
    )


def check_api(url: str, timeout_s: float = 10.0) -> None:
    """Raise `ServiceError` unless ``<url>/health`` answers 200."""
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ServiceError(
            f"the Prefect server at {url} is unreachable ({type(exc).__name__}: {exc}); start it "
            "(`defect-loop prefect-server start`) or fix PREFECT_API_URL"
        ) from exc
    if r.status_code != 200:
        raise ServiceError(
            f"the Prefect server at {url} answered /health with HTTP {r.status_code}; is "
            "PREFECT_API_URL the API (ending in /api)?"
        )


def _describe(schedule: object) -> str:
    cron = getattr(schedule, "cron", None)
    if cron:
        return f"cron {cron!r} {getattr(schedule, 'timezone', None) or 'UTC'}"
    interval = getattr(schedule, "interval", None)
    if interval is not None:
        return f"every {interval.total_seconds():g} s"
    return str(schedule)


def serve(
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    start_server: Annotated[
        bool,
        typer.Option(
            "--start-server", help="start the local Prefect server first when none is configured"
        ),
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="most flow runs executed at the same time")
    ] = None,
) -> None:
    """Serve every flow as a Prefect deployment, with the config's schedule and count trigger.

    Runs until interrupted. Trigger a run from the Prefect CLI, e.g.
    `prefect deployment run 'cycle/<project name>' --watch`.
    """

    def go() -> None:
        cfg = load_config(config)
        url = resolve_api_url(cfg, start_server)
        check_api(url)
        # Before any Prefect import: the flows and their runs report to this server.
        os.environ["PREFECT_API_URL"] = url
        prefect_env(cfg)
        from flows.deployments import build_deployments, serve_deployments
        from loop.scheduling import deployment_name

        name = deployment_name(cfg.name)
        deployments = build_deployments(config, cfg)
        typer.echo(f"serving {len(deployments)} deployments against {url}:")
        for d in deployments:
            sched = ", ".join(_describe(s.schedule) for s in d.schedules or []) or "on demand"
            typer.echo(f"  {d.flow_name}/{d.name}  ({sched})")
        typer.echo(f"trigger one with: prefect deployment run 'cycle/{name}' --watch")
        serve_deployments(config, limit=limit)

    run(go)


@prefect_server_app.command("start")
def prefect_server_start(
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    timeout: Annotated[float, typer.Option(help="seconds to wait for /api/health")] = 90.0,
) -> None:
    """Start a Prefect server on 127.0.0.1:<prefect.port> (SQLite, analytics off)."""

    def go() -> None:
        svc = prefect_service(load_config(config))
        svc.start(timeout_s=timeout)
        typer.echo(f"Prefect server up: UI {svc.url}; export PREFECT_API_URL={svc.api_url}")

    run(go)


@prefect_server_app.command("stop")
def prefect_server_stop(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Stop the local Prefect server."""

    def go() -> None:
        stopped = prefect_service(load_config(config)).stop()
        typer.echo("Prefect server stopped" if stopped else "no Prefect server was running")

    run(go)


@prefect_server_app.command("status")
def prefect_server_status(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Is the local Prefect server running and healthy?"""

    def go() -> None:
        typer.echo(json.dumps(prefect_service(load_config(config)).status(), indent=1))

    run(go)


def standalone_app() -> typer.Typer:
    """``serve`` and ``prefect-server`` as an app of their own (``python -m loop.cli.serve``)."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.command("serve")(serve)
    app.add_typer(prefect_server_app, name="prefect-server")
    return app


if __name__ == "__main__":  # pragma: no cover
    standalone_app()()
