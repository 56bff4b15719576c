"""`review-labels` flow: cross-fit the current version, rank its labels with cleanlab, and push
the top suspects to Label Studio as review tasks (`loop.review_tasks`)."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_TASK, Context, locked_context
from loop.labelstudio.review import ReviewPushSummary
from loop.review_tasks import ReviewRecord, Suspects, find_suspects, push_review_tasks


@dataclass(frozen=True)
class ReviewOutcome:
    """What a label review did: the ``version`` checked, its ``suspects`` (rank order, see
    `loop.review_tasks.Suspects`), the ``push`` (None: not pushed) or why it was ``skipped``."""

    version: str | None
    suspects: int
    push: ReviewPushSummary | None
    skipped: str | None = None


# No retries: it trains `folds` models; a retry would repeat the folds not yet cached.
@task(name="find-label-errors", cache_policy=NONE)
def find_suspects_task(ctx: Context, folds: int, seed: int | None) -> Suspects:
    return find_suspects(ctx.project, folds, seed, progress=get_run_logger().info)


# Safe to retry: existing review tasks are marked again and their review predictions replaced.
@task(name="push-review-tasks", cache_policy=NONE, **NETWORK_TASK)
def push_review_task(ctx: Context, suspects: Suspects, top: int) -> ReviewPushSummary:
    with ctx.project.gateway() as gw:
        return push_review_tasks(ctx.project, gw, suspects, top, progress=False)


def run_review(
    ctx: Context,
    folds: int | None = None,
    top: int | None = None,
    seed: int | None = None,
    only_new_version: bool = False,
) -> ReviewOutcome:
    """Find the suspects of the current version and push the top ones. ``only_new_version``
    (the cycle's): skip a version whose suspects were already pushed."""
    log = get_run_logger()
    cfg = ctx.cfg
    current = ctx.project.state.current_version
    if only_new_version and current is not None:
        last = ReviewRecord(cfg.paths.label_review).latest()
        if last is not None and last.get("version") == current:
            why = f"the suspects of version {current[:12]} are already in Label Studio"
            log.info("label review skipped: %s", why)
            return ReviewOutcome(current, 0, None, skipped=why)
    k = cfg.label_review.folds if folds is None else folds
    n = cfg.label_review.top_k if top is None else top
    suspects = find_suspects_task(ctx, k, seed)
    summary = push_review_task(ctx, suspects, n)
    log.info(
        "label review of version %s: %d existing tasks marked, %d created, %d failed",
        suspects.version.short,
        summary.flagged,
        summary.created,
        summary.failed,
    )
    return ReviewOutcome(suspects.version.digest, len(suspects.rows), summary)


@flow(name="review-labels", log_prints=True)
def review_labels_flow(
    config_path: str, folds: int | None = None, top: int | None = None, seed: int | None = None
) -> ReviewOutcome:
    """Cross-fit the current dataset version (``folds`` trainings, cached per version), rank its
    labels, and push the ``top`` suspects to Label Studio as review tasks."""
    with locked_context(config_path, "review-labels") as ctx:
        return run_review(ctx, folds, top, seed)
