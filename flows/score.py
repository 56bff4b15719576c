"""`score` flow: rank the unlabeled pool with the champion model (the steps of `loop.scoring`).

``scoring-models`` names the champion, its committee and its validation metrics (MLflow);
``prepare-scoring-model`` makes its ONNX form once when ``scoring.backend`` asks for it. The
candidates are cut into batches of ``scoring.batch_size`` images; one ``score-batch`` task
computes the model outputs and scores of each batch (`loop.scoring.score_batch`). Without
``scoring.dask_address`` the batches run one after the other in this process; with it they run
on that Dask cluster through prefect-dask's `DaskTaskRunner`. Either way the results are merged
in candidate order and the strategy's selector runs once (`loop.scoring.rank_candidates`), with
the labeled images' embeddings (``labeled-set``) when it reads them, so both paths give the same
ranking, for every strategy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NONE

from flows.common import NETWORK_TASK, Context, open_context
from loop.config import ProjectConfig
from loop.errors import ConfigError, ServiceError
from loop.project import ScoredImage
from loop.scheduling import batches
from loop.scoring import (
    ImageScore,
    ScoringModels,
    ScoringPlan,
    labeled_set,
    merge_scores,
    plan_scoring,
    rank_candidates,
)
from loop.selection import LabeledSet

BatchResult = list[ImageScore]
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@task(name="scoring-models", cache_policy=NONE, **NETWORK_TASK)
def scoring_models_task(ctx: Context) -> ScoringModels:
    """The champion, its committee and its validation metrics, downloaded from MLflow."""
    return ctx.tracker.scoring_models(ctx.cfg.select.committee_size)


@task(name="prepare-scoring-model", cache_policy=NONE)
def scoring_model_task(ctx: Context, weights: Path) -> Path:
    """The champion as ``scoring.backend`` runs it: the weights, or their ONNX export / int8
    quantization, made once here (before the batches fan out) and cached in the workspace."""
    path = ctx.project.scoring_model(weights)
    get_run_logger().info("scoring backend %s: %s", ctx.cfg.scoring.backend, path)
    return path


@task(name="score-batch", cache_policy=NONE, task_run_name="score-batch-{index}")
def score_batch_task(
    cfg: ProjectConfig, plan: ScoringPlan, shas: list[str], index: int
) -> BatchResult:
    """Model outputs and scores of one batch of images (runs wherever the task runner puts it)."""
    from loop.project import Project
    from loop.scoring import score_batch

    return score_batch(Project(cfg), plan, shas)


@task(name="labeled-set", cache_policy=NONE)
def labeled_set_task(ctx: Context, plan: ScoringPlan) -> LabeledSet:
    """Embeddings and classes of the labeled images, for the diversity selectors."""
    return labeled_set(ctx.project, plan)


def require_prefect_server(dask_address: str) -> str:
    """The API URL of the Prefect server the Dask workers will report to.

    Raises `ConfigError` when the flow runs on Prefect's temporary in-process server, which
    workers in other processes cannot reach (each would try to start its own and fail).
    """
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            f"scoring.dask_address is {dask_address!r}, but no Prefect server is configured "
            "(PREFECT_API_URL is unset, so this run uses a temporary in-process server that Dask "
            "workers cannot reach). Start one (`defect-loop prefect-server start`, or the "
            "prefect service of docker/compose.yaml), set PREFECT_API_URL=http://<host>:4200/api "
            "for this process and the Dask workers, or unset scoring.dask_address to score "
            "in-process."
        )
    return str(url)


def scoring_task_runner(cfg: ProjectConfig) -> Any:
    """A sequential in-process runner, or a `DaskTaskRunner` on ``scoring.dask_address``."""
    address = cfg.scoring.dask_address
    if not address:
        from prefect.task_runners import ThreadPoolTaskRunner

        # One batch at a time: the model already uses train.threads cores.
        return ThreadPoolTaskRunner(max_workers=1)
    api_url = require_prefect_server(address)
    api_host = urlparse(api_url).hostname
    dask_host = urlparse(address if "://" in address else f"tcp://{address}").hostname
    if api_host in _LOOPBACK and dask_host not in _LOOPBACK:
        get_run_logger().warning(
            "PREFECT_API_URL %s is a loopback address but the Dask scheduler %s is not: workers "
            "on other hosts cannot report to it; use an address they can reach",
            api_url,
            address,
        )
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError(
            "scoring.dask_address is set but prefect-dask is not installed: "
            "pip install 'prefect-dask>=0.3.7' 'distributed' (or unset scoring.dask_address)"
        ) from exc
    return DaskTaskRunner(address=address, client_kwargs={"timeout": "30s"})


def score_batches(ctx: Context, plan: ScoringPlan, shas: list[str]) -> list[BatchResult]:
    """Run one ``score-batch`` task per batch of ``shas``; results in batch order."""
    groups = batches(shas, ctx.cfg.scoring.batch_size)
    if not groups:
        return []
    runner = scoring_task_runner(ctx.cfg)
    address = ctx.cfg.scoring.dask_address
    try:
        runner.__enter__()
    except (OSError, TimeoutError) as exc:
        raise ServiceError(
            f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}: {exc}); start "
            "the cluster, fix scoring.dask_address, or unset it to score in-process"
        ) from exc
    try:
        futures = runner.map(
            score_batch_task,
            {
                "cfg": unmapped(ctx.cfg),
                "plan": unmapped(plan),
                "shas": groups,
                "index": list(range(len(groups))),
            },
        )
        return [f.result() for f in futures]
    finally:
        runner.__exit__(None, None, None)


def run_score(ctx: Context) -> tuple[ScoringModels, list[ScoredImage]]:
    models = scoring_models_task(ctx)
    scoring_model_task(ctx, models.weights)
    plan = plan_scoring(ctx.project, models)
    shas = ctx.project.candidates()
    parts = score_batches(ctx, plan, shas)
    labeled = labeled_set_task(ctx, plan) if "embeddings" in plan.needs else None
    ranked = rank_candidates(ctx.project, plan, merge_scores(shas, parts), labeled)
    get_run_logger().info(
        "scored %d candidate images in %d batches (%s) with %s (scorer %s, selector %s, "
        "reduction %s)",
        len(ranked),
        len(parts),
        f"Dask at {ctx.cfg.scoring.dask_address}" if ctx.cfg.scoring.dask_address else "local",
        ctx.cfg.select.strategy,
        plan.strategy.scorer,
        plan.strategy.selector,
        ctx.cfg.select.reduction,
    )
    return models, ranked


@flow(name="score", log_prints=True)
def score_flow(config_path: str) -> list[ScoredImage]:
    """Rank every candidate image of the pool with the champion, most valuable first."""
    return run_score(open_context(config_path))[1]
