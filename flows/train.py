"""`train` flow: fit on the current dataset version, then log, register and gate in MLflow."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_TASK, Context, locked_context
from loop.project import FitResult, TrainOutcome


# No retries: a failed training is not a network hiccup, and a retry would double its cost.
@task(name="fit-model", cache_policy=NONE)
def fit_task(ctx: Context) -> FitResult:
    return ctx.project.fit(ctx.tracker, progress=get_run_logger().info)


@task(name="log-model", cache_policy=NONE, **NETWORK_TASK)
def record_task(ctx: Context, fit: FitResult) -> TrainOutcome:
    """Log the fit to MLflow, register it as ``candidate`` and run the promotion gate."""
    return ctx.project.record(ctx.tracker, fit)


def run_train(ctx: Context) -> TrainOutcome:
    fit = fit_task(ctx)
    outcome = record_task(ctx, fit)
    get_run_logger().info(
        "round %s: val mAP50 %.3f, test mAP50 %s, model v%s (%s)",
        fit.round_index,
        outcome.val_map50,
        outcome.test_map50,
        outcome.model_version,
        outcome.reason,
    )
    return outcome


@flow(name="train", log_prints=True)
def train_flow(config_path: str) -> TrainOutcome:
    """Train on the current dataset version; log, register and (maybe) promote the model."""
    with locked_context(config_path, "train") as ctx:
        return run_train(ctx)
