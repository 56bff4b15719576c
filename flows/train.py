"""`train` flow: fit on the current dataset version, then log, register and gate in MLflow."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_RETRIES, NETWORK_RETRY_DELAYS, Context, open_context
from loop.project import FitResult, TrainOutcome


@task(name="fit-model", cache_policy=NONE)
def fit_task(ctx: Context) -> FitResult:
    return ctx.project.fit(ctx.tracker, progress=get_run_logger().info)


@task(
    name="log-model",
    cache_policy=NONE,
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
)
def record_task(ctx: Context, fit: FitResult) -> TrainOutcome:
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
    return run_train(open_context(config_path))
