"""`push` and `pull` flows: the Label Studio boundary."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_RETRIES, NETWORK_RETRY_DELAYS, Context, open_context
from flows.score import run_score
from loop.labelstudio import PushSummary
from loop.project import PullOutcome, ScoredImage
from loop.tracking import Champion


def model_version_name(ctx: Context, champion: Champion) -> str:
    return f"{ctx.cfg.mlflow.registered_model}-v{champion.version}"


@task(
    name="push-tasks",
    cache_policy=NONE,
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
)
def push_task(ctx: Context, ranked: list[ScoredImage], model_version: str) -> PushSummary:
    # Safe to retry: tasks are keyed by image sha256, so a re-push creates no duplicates.
    return ctx.project.push(ctx.project.gateway(), ranked, model_version)


@task(
    name="pull-annotations",
    cache_policy=NONE,
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
)
def pull_task(ctx: Context) -> PullOutcome:
    return ctx.project.pull(ctx.project.gateway())


def run_push(ctx: Context) -> PushSummary:
    champ, ranked = run_score(ctx)
    summary = push_task(ctx, ranked, model_version_name(ctx, champ))
    get_run_logger().info(
        "pushed: %d created, %d skipped, %d failed",
        summary.created,
        summary.skipped,
        summary.failed,
    )
    return summary


def run_pull(ctx: Context) -> PullOutcome:
    outcome = pull_task(ctx)
    log = get_run_logger()
    log.info(
        "pulled %d labeled images; new version %s", outcome.labeled, outcome.new_version or "none"
    )
    for r in outcome.rejected:
        log.warning("left for review: %s", r)
    return outcome


@flow(name="push", log_prints=True)
def push_flow(config_path: str) -> PushSummary:
    return run_push(open_context(config_path))


@flow(name="pull", log_prints=True)
def pull_flow(config_path: str) -> PullOutcome:
    return run_pull(open_context(config_path))
