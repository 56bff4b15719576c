"""`report` flow: the model-improvement report of one round (HTML + Markdown, logged to MLflow)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_TASK, Context, open_context
from loop.report import write_report


@task(name="write-report", cache_policy=NONE, **NETWORK_TASK)
def report_task(ctx: Context, round: int | None, out: str | None) -> tuple[Path, Path]:
    # Safe to retry: the files are rewritten and the artifacts overwritten in place.
    return write_report(ctx.project, ctx.tracker, None if out is None else Path(out), round)


def run_report(ctx: Context, round: int | None = None, out: str | None = None) -> tuple[Path, Path]:
    """Write the report of ``round`` (default: the newest) and log it to that round's run."""
    html_path, md_path = report_task(ctx, round, out)
    get_run_logger().info("report written: %s (summary %s)", html_path, md_path)
    return html_path, md_path


@flow(name="report", log_prints=True)
def report_flow(
    config_path: str, round: int | None = None, out: str | None = None
) -> tuple[Path, Path]:
    return run_report(open_context(config_path), round, out)
