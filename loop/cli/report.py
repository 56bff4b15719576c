"""`defect-loop report`: the model-improvement report for leads.

Registered on the main app by ``app.command("report")(report)`` in `loop.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loop.cli.common import ConfigOpt, console, load, prefect_env, run
from loop.config import DEFAULT_CONFIG_NAME


def report(
    round: Annotated[
        int | None, typer.Option("--round", help="training round to report (default: the newest)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="folder for the HTML and Markdown files [default: WORKSPACE/reports]"
        ),
    ] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Write the model-improvement report (self-contained HTML + Markdown summary) of a round and
    log both to that round's MLflow training run under report/."""

    def go() -> None:
        cfg = load(config)
        prefect_env(cfg)
        from flows.report import report_flow

        html_path, md_path = report_flow(
            str(config), round=round, out=None if out is None else str(out)
        )
        console.print(f"report: {html_path}")
        console.print(f"summary: {md_path}")

    run(go)
