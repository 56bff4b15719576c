"""`push` and `pull` flows: the Label Studio boundary."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_TASK, Context, locked_context
from flows.score import run_score
from loop.errors import printable
from loop.labeling import PushSummary
from loop.project import ScoredImage
from loop.report import write_next_batch
from loop.scoring import ScoringModels
from loop.sync import PullOutcome


def model_version_name(ctx: Context, models: ScoringModels) -> str:
    """The name Label Studio shows for the predictions of ``models`` (e.g. ``detector-v3``)."""
    return f"{ctx.cfg.mlflow.registered_model}-{models.name}"


@task(name="push-tasks", cache_policy=NONE, **NETWORK_TASK)
def push_task(ctx: Context, ranked: list[ScoredImage], model_version: str) -> PushSummary:
    # Safe to retry: tasks are keyed by image sha256, so a re-push creates no duplicates.
    summary = ctx.project.push(ctx.project.gateway(), ranked, model_version)
    # What the lead report calls "the next batch": what was sent, in the order it was sent
    # (monitor-queued images first), not the top of the ranking.
    by_sha = {s.sha256: s for s in ranked}
    write_next_batch(ctx.project, [by_sha[sha] for sha in summary.batch], len(summary.batch))
    return summary


@task(name="pull-annotations", cache_policy=NONE, **NETWORK_TASK)
def pull_task(ctx: Context) -> PullOutcome:
    # Safe to retry: a new dataset version is written atomically, keyed by its digest.
    return ctx.project.pull(ctx.project.gateway())


def run_push(ctx: Context) -> PushSummary:
    models, ranked = run_score(ctx)
    summary = push_task(ctx, ranked, model_version_name(ctx, models))
    get_run_logger().info(
        "pushed: %d created, %d refreshed, %d skipped, %d failed",
        summary.created,
        summary.refreshed,
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
        log.warning("left for review: %s", printable(r))
    if outcome.review or outcome.merged or outcome.waiting:
        log.info(
            "consensus: %d merged, %d waiting for more annotators, review queue %d (%d new) %s",
            outcome.merged,
            outcome.waiting,
            outcome.review,
            outcome.review_new,
            outcome.review_url or "",
        )
    for note in outcome.notes:
        log.warning("%s", printable(note))
    return outcome


@flow(name="push", log_prints=True)
def push_flow(config_path: str) -> PushSummary:
    """Score the pool and push the top batch to Label Studio as pre-annotated tasks."""
    with locked_context(config_path, "push") as ctx:
        return run_push(ctx)


@flow(name="pull", log_prints=True)
def pull_flow(config_path: str) -> PullOutcome:
    """Pull submitted annotations from Label Studio into a new dataset version."""
    with locked_context(config_path, "pull") as ctx:
        return run_pull(ctx)
