"""`cycle` flow: pull -> train -> promote -> score -> push (-> review-labels), one cycle per
workspace at a time.

With ``review_labels`` (or ``label_review.every_cycle`` in the config) the cycle ends by running
the label error finder on the current version and pushing its top suspects to Label Studio as
review tasks (`flows.review`); a version whose suspects were already pushed is skipped. Off by
default: it costs ``label_review.folds`` trainings per new version.

Every step is named: when one fails the flow fails with `CycleStepError` ("cycle step 'train'
failed: ModelError: ..."), the steps after it do not run, and no dataset version is left
half-written (`DatasetStore.save` writes a temporary folder and renames it).

A cycle first takes the workspace's cycle lock (`loop.scheduling.CycleLock`). When another
cycle holds it, ``schedule.concurrency`` decides: ``skip`` ends this run at once in a COMPLETED
state named ``Skipped`` (its message names the running cycle), ``wait`` waits for it (up to
``schedule.wait_timeout_s``) and then runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed

from flows.common import NETWORK_TASK, Context, acquire_workspace, open_context, run_label
from flows.report import run_report
from flows.review import ReviewOutcome, run_review
from flows.score import run_score
from flows.sync import model_version_name, push_task, run_pull
from flows.train import fit_task, record_task
from loop.config import load_config
from loop.errors import DefectLoopError
from loop.labeling import PushSummary
from loop.project import TrainOutcome
from loop.scheduling import CycleLock, CycleStepError
from loop.sync import PullOutcome

T = TypeVar("T")


@dataclass(frozen=True)
class CycleOutcome:
    """What a cycle did. ``skipped``: why it did nothing (another cycle was running)."""

    pull: PullOutcome | None
    train: TrainOutcome | None
    push: PushSummary | None
    skipped: str | None = None
    report: tuple[Path, Path] | None = None  # (HTML, Markdown) of the lead report
    review: ReviewOutcome | None = None  # the label review, when the cycle ran it


@task(name="last-trained-digest", cache_policy=NONE, **NETWORK_TASK)
def last_trained_task(ctx: Context) -> str | None:
    return ctx.tracker.last_trained_digest()


def _step(name: str, fn: Callable[[], T]) -> T:
    """Run one named step; any failure becomes a `CycleStepError` that names it."""
    try:
        return fn()
    except CycleStepError:
        raise
    except Exception as exc:
        get_run_logger().error("cycle step %r failed: %s: %s", name, type(exc).__name__, exc)
        raise CycleStepError(name, exc) from exc


def run_cycle(
    ctx: Context, pull: bool = True, force_train: bool = False, review_labels: bool = False
) -> CycleOutcome:
    """The steps of one cycle (the caller holds the cycle lock). ``review_labels`` (or
    ``label_review.every_cycle``): end with the label review (`flows.review.run_review`)."""
    log = get_run_logger()
    pulled = None
    if pull and ctx.project.state.ls_project_id is not None:
        pulled = _step("pull", lambda: run_pull(ctx))
    trained = None
    last = _step("train", lambda: last_trained_task(ctx))
    if force_train or last != ctx.project.state.current_version:
        fit = _step("train", lambda: fit_task(ctx))
        trained = _step("promote", lambda: record_task(ctx, fit))
        log.info(
            "round %s: val mAP50 %.3f, test mAP50 %s, model v%s (%s)",
            fit.round_index,
            trained.val_map50,
            "n/a" if trained.test_map50 is None else f"{trained.test_map50:.3f}",
            trained.model_version,
            trained.reason,
        )
    else:
        log.info("labels unchanged since the last training run: skipping training")
    models, ranked = _step("score", lambda: run_score(ctx))
    summary = _step("push", lambda: push_task(ctx, ranked, model_version_name(ctx, models)))
    log.info(
        "pushed: %d created, %d refreshed, %d skipped, %d failed",
        summary.created,
        summary.refreshed,
        summary.skipped,
        summary.failed,
    )
    report = None
    try:
        report = run_report(ctx)
    except DefectLoopError as exc:  # a report problem must not fail a cycle that already pushed
        log.warning("report not written: %s", exc)
    review = None
    if review_labels or ctx.cfg.label_review.every_cycle:
        review = _step("review-labels", lambda: run_review(ctx, only_new_version=True))
    return CycleOutcome(pulled, trained, summary, report=report, review=review)


@flow(name="cycle", log_prints=True)
def cycle_flow(
    config_path: str, pull: bool = True, force_train: bool = False, review_labels: bool = False
) -> Any:
    """One active-learning cycle.

    Trains only when the labels changed since the last training run (or when ``force_train``),
    so a cycle with no new labels just re-scores and pushes. ``review_labels`` (or
    ``label_review.every_cycle``): then push the current version's suspect labels as review
    tasks (``label_review.folds`` trainings per new version). Returns a `CycleOutcome`.
    """
    cfg = load_config(Path(config_path))
    lock = acquire_workspace(cfg, cfg.schedule.concurrency, run_label("cycle"))
    if lock is None:
        reason = (
            f"skipped: another cycle is running ({CycleLock(cfg.workspace).holder_text()}); "
            "schedule.concurrency is 'skip'"
        )
        get_run_logger().warning(reason)
        return Completed(
            name="Skipped", message=reason, data=CycleOutcome(None, None, None, reason)
        )
    try:
        # Loaded under the lock: a cycle that waited sees the state its predecessor left.
        return run_cycle(
            open_context(config_path),
            pull=pull,
            force_train=force_train,
            review_labels=review_labels,
        )
    finally:
        lock.release()
