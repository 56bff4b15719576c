"""Every strategy a config accepts runs in a real cycle: the `cycle` flow (Prefect test harness)
scores with the champion from the MLflow registry (its committee, its validation metrics), the
TTA views, the embeddings of candidates and labeled images, and pushes pre-annotated tasks to a
real Label Studio server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loop.config import load_config
from loop.project import Project
from loop.selection import available_strategies
from loop.synth import SYNTH_CLASSES, write_dataset
from loop.tracking import Tracker

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SHARED_WEIGHTS = REPO.parent / "shared" / "models" / "yolov8n.pt"


@pytest.fixture(scope="module")
def two_rounds(prefect_harness: None, ls_server: Any) -> Iterator[Path]:
    """A project with two trained model versions (a committee exists) and ~60 candidates."""
    from flows.cycle import cycle_flow

    root = Path(ls_server.document_root) / "strategies-test"
    synth = root / "synth"
    write_dataset(synth, 110, seed=5, size=64)
    train: dict[str, Any] = {"imgsz": 64, "epochs": 1, "batch": 8, "init": "champion"}
    if SHARED_WEIGHTS.is_file():
        train["weights"] = str(SHARED_WEIGHTS)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "strategies-test",
                "classes": list(SYNTH_CLASSES),
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": "defect-loop strategies test",
                },
                "train": train,
                "select": {"batch_size": 3, "candidate_conf": 0.05, "min_candidates": 2},
            }
        )
    )
    old = os.environ.get("DEFECT_LOOP_LABELSTUDIO__API_TOKEN")
    os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = ls_server.token
    try:
        project = Project(load_config(cfg_path))
        project.ingest(synth / "images", synth / "labels", label_limit=24, seed=1)
        first = cycle_flow(str(cfg_path), pull=True)
        assert first.train is not None and first.push is not None
        # More labels -> a second training -> a second registered version.
        Project(load_config(cfg_path)).ingest(
            synth / "images", synth / "labels", label_limit=36, seed=2
        )
        second = cycle_flow(str(cfg_path), pull=True)
        assert second.train is not None
        yield cfg_path
    finally:
        if old is None:
            os.environ.pop("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", None)
        else:
            os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = old


def test_every_run_logs_where_it_started(two_rounds: Path) -> None:
    cfg = load_config(two_rounds)
    runs = Tracker(cfg).training_runs()
    assert len(runs) == 2
    client = Tracker(cfg).client
    params = [client.get_run(r["run_id"]).data.params for r in runs]
    # Round 1 starts from the configured checkpoint (or the YAML), round 2 from the champion.
    first_init = "pretrained" if SHARED_WEIGHTS.is_file() else "scratch"
    assert [p["init_weights"] for p in params] == [first_init, "champion"]
    if SHARED_WEIGHTS.is_file():
        start = cfg.train.start_checkpoint()
        assert start is not None
        assert params[0]["init_weights_sha256"] == start.sha256
        assert {p["start_weights_sha256"] for p in params} == {start.sha256}
    assert len(params[1]["init_weights_sha256"]) == 64  # the champion's weights


def test_the_registry_gives_production_what_the_strategies_read(two_rounds: Path) -> None:
    cfg = load_config(two_rounds)
    models = Tracker(cfg).scoring_models(cfg.select.committee_size)
    assert models.weights.is_file()
    assert len(models.committee) == 1 and models.committee[0].is_file()
    assert models.committee[0] != models.weights
    assert models.val_ap50 is not None and set(models.val_ap50) == set(cfg.classes)
    assert models.val_instances is not None and sum(models.val_instances.values()) > 0


@pytest.mark.parametrize("strategy", available_strategies("detect"))
def test_every_strategy_runs_a_real_cycle(
    two_rounds: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cycle import cycle_flow

    monkeypatch.setenv("DEFECT_LOOP_SELECT__STRATEGY", strategy)
    monkeypatch.setenv("DEFECT_LOOP_SELECT__BASE_STRATEGY", "margin")
    before = Project(load_config(two_rounds))
    fresh = [s for s in before.candidates() if s not in before.state.pending]
    assert len(fresh) >= 3, "the module's pool has run dry"
    out = cycle_flow(str(two_rounds), pull=True)
    assert out.train is None  # labels unchanged: this cycle only scores and pushes
    assert out.push is not None and out.push.failed == 0
    assert out.push.created == 3
    after = Project(load_config(two_rounds))
    new = set(after.state.pending) - set(before.state.pending)
    assert len(new) == 3 and new <= set(fresh)
