"""`cycle` flow: pull -> train -> (promote) -> score -> push."""

from __future__ import annotations

from dataclasses import dataclass
from prefect import flow, get_run_logger

from flows.common import open_context
from flows.sync import run_pull, run_push
from flows.train import run_train
from loop.labelstudio import PushSummary
from loop.project import PullOutcome, TrainOutcome


@dataclass(frozen=True)
class CycleOutcome:
    pull: PullOutcome | None
    train: TrainOutcome | None
    push: PushSummary


@flow(name="cycle", log_prints=True)
def cycle_flow(config_path: str, pull: bool = True, force_train: bool = False) -> CycleOutcome:
    """One active-learning cycle.

    Trains only when the labels changed since the last training run (or when ``force_train``),
    so a cycle with no new labels just re-scores and pushes.
    """
    ctx = open_context(config_path)
    log = get_run_logger()
    pulled = None
    if pull and ctx.project.state.ls_project_id is not None:
        pulled = run_pull(ctx)
    trained = None
    last = ctx.tracker.last_trained_digest()
    if force_train or last != ctx.project.state.current_version:
        trained = run_train(ctx)
    else:
        log.info("labels unchanged since the last training run: skipping training")
    summary = run_push(ctx)
    return CycleOutcome(pulled, trained, summary)
