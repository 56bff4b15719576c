"""`defect-loop services up|down|status`: the local Label Studio server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from loop.cli.common import ConfigOpt, console, jsonable, labelstudio_service, load, run
from loop.config import DEFAULT_CONFIG_NAME

services_app = typer.Typer(help="Start, stop and inspect the local Label Studio server.")


@services_app.command("up")
def services_up(
    timeout: Annotated[float, typer.Option(help="seconds to wait for /health")] = 240.0,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Install (first time, ~1 min) and start Label Studio on 127.0.0.1."""

    def go() -> None:
        cfg = load(config)
        svc, creds = labelstudio_service(cfg)
        svc.ensure_installed()
        t0 = time.monotonic()
        svc.start(timeout_s=timeout)
        console.print(
            f"Label Studio up at {svc.url} in {time.monotonic() - t0:.1f}s "
            f"(login {creds.username} / password in {cfg.paths.labelstudio_credentials})"
        )

    run(go)


@services_app.command("down")
def services_down(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Stop the local Label Studio."""

    def go() -> None:
        svc, _ = labelstudio_service(load(config))
        svc.stop()
        console.print("Label Studio stopped")

    run(go)


@services_app.command("status")
def services_status(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Is the local Label Studio running and healthy?"""

    def go() -> None:
        svc, _ = labelstudio_service(load(config))
        console.print_json(json.dumps(jsonable(svc.status())))

    run(go)
