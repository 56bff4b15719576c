"""Scoring on Dask: prefect-dask's DaskTaskRunner on a 2-worker LocalCluster against a real
Prefect server gives exactly the ranking of the in-process path; without a Prefect server the
Dask path says so instead of failing obscurely."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loop.config import load_config
from loop.errors import ConfigError
from loop.project import Project
from loop.services import PrefectService, free_port
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (SQLite, 127.0.0.1) as this module's PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    svc = PrefectService(home=tmp_path_factory.mktemp("prefect-dask"), port=free_port())
    svc.start(timeout_s=180)
    try:
        with temporary_settings({PREFECT_API_URL: svc.api_url}):
            yield svc.api_url
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def trained(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with a champion (1 epoch at 64 px) and ~70 unlabeled candidates."""
    from flows.train import train_flow

    root = tmp_path_factory.mktemp("dask-project")
    write_dataset(root / "synth", 110, seed=7, size=64)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "dask-test",
                "classes": list(SYNTH_CLASSES),
                "workspace": "ws",
                "train": {"imgsz": 64, "epochs": 1, "batch": 8, "threads": 2},
                # Weak model: keep low-confidence candidates so that scores differ and tie.
                "select": {"candidate_conf": 0.3, "min_candidates": 2, "preannotation_conf": 0.01},
                "scoring": {"batch_size": 16},
            }
        )
    )
    project = Project(load_config(cfg_path))
    project.ingest(root / "synth" / "images", root / "synth" / "labels", label_limit=30)
    out = train_flow(str(cfg_path))
    assert out.promoted
    return cfg_path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from distributed import LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        yield c
    finally:
        c.close()


def _rows(ranked: list[Any]) -> list[tuple[str, float]]:
    return [(s.sha256, s.score) for s in ranked]


@pytest.mark.parametrize("strategy", ["entropy", "class_diversity"])
def test_dask_scoring_gives_the_local_ranking(
    trained: Path, cluster: Any, prefect_api: str, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Both a scorer and a set selector that reads embeddings and class difficulty."""
    from distributed import Client, get_task_stream
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.score import score_flow

    monkeypatch.delenv("DEFECT_LOOP_SCORING__DASK_ADDRESS", raising=False)
    monkeypatch.setenv("DEFECT_LOOP_SELECT__STRATEGY", strategy)
    n = len(Project(load_config(trained)).candidates())
    assert n > 32, "more than two batches"
    local = score_flow(str(trained))
    assert len(local) == n

    monkeypatch.setenv("DEFECT_LOOP_SCORING__DASK_ADDRESS", cluster.scheduler_address)
    assert load_config(trained).scoring.dask_address == cluster.scheduler_address
    with Client(cluster.scheduler_address) as dask, get_task_stream(dask) as stream:
        state = score_flow(str(trained), return_state=True)
    assert state.is_completed(), state.message
    on_dask = state.result()

    assert _rows(on_dask) == _rows(local)  # same order, bit-identical scores
    assert all(
        a.detections.same_boxes(b.detections, atol=0) for a, b in zip(on_dask, local, strict=True)
    )
    if strategy == "entropy":
        assert len({s for _, s in _rows(local)}) < n, "the test covers tied scores"

    # Each batch ran as its own task on the cluster and reported to the Prefect server.
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    batch_runs = [r for r in runs if r.name.startswith("score-batch")]
    assert len(batch_runs) == -(-n // 16)
    assert all(r.state is not None and r.state.is_completed() for r in batch_runs)
    # ... in the cluster's worker processes, not in this one.
    assert len(stream.data) == len(batch_runs)
    assert {t["worker"] for t in stream.data} <= set(cluster.scheduler_info["workers"])


def test_unbatched_single_process_path_agrees(trained: Path, prefect_api: str) -> None:
    """The batched flow ranks like one `loop.scoring.score_batch` over every candidate (entropy,
    batch size a multiple of the model's 16-image predict chunk)."""
    from flows.score import score_flow
    from loop.scoring import plan_scoring, rank_candidates, score_batch
    from loop.tracking import Tracker

    cfg = load_config(trained)
    project = Project(cfg)
    plan = plan_scoring(project, Tracker(cfg).scoring_models(cfg.select.committee_size))
    shas = project.candidates()
    once = rank_candidates(project, plan, score_batch(project, plan, shas))
    assert _rows(score_flow(str(trained))) == _rows(once)


def test_dask_without_a_prefect_server_says_so(trained: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.score import scoring_task_runner

    cfg = load_config(trained).model_copy(deep=True)
    cfg.scoring.dask_address = "tcp://127.0.0.1:8786"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert os.environ.get("PREFECT_API_URL") is None
        with pytest.raises(ConfigError, match="no Prefect server is configured") as err:
            scoring_task_runner(cfg)
    assert "PREFECT_API_URL" in str(err.value) and "prefect-server start" in str(err.value)
