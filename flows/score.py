"""`score` flow: rank the unlabeled pool with the champion model."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_RETRIES, NETWORK_RETRY_DELAYS, Context, open_context
from loop.errors import ModelError
from loop.project import ScoredImage
from loop.tracking import Champion


@task(
    name="load-champion",
    cache_policy=NONE,
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_RETRY_DELAYS,
)
def champion_task(ctx: Context) -> Champion:
    champ = ctx.tracker.champion()
    if champ is None:
        raise ModelError("no champion model yet: run `defect-loop train` first")
    return champ


@task(name="predict-and-score", cache_policy=NONE)
def score_task(ctx: Context, champion: Champion) -> list[ScoredImage]:
    shas = ctx.project.candidates()
    dets = ctx.project.predict(champion.weights, shas)
    return ctx.project.score(shas, dets)


def run_score(ctx: Context) -> tuple[Champion, list[ScoredImage]]:
    champ = champion_task(ctx)
    ranked = score_task(ctx, champ)
    get_run_logger().info(
        "scored %d candidate images with %s/%s",
        len(ranked),
        ctx.cfg.select.strategy,
        ctx.cfg.select.reduction,
    )
    return champ, ranked


@flow(name="score", log_prints=True)
def score_flow(config_path: str) -> list[ScoredImage]:
    return run_score(open_context(config_path))[1]
