"""The walking skeleton end to end: real Label Studio, real MLflow (SQLite), real Prefect flows
(test harness), real YOLO training (tiny), with every non-loopback connection refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.formats.labelstudio import ls_results_to_detections
from loop.offline import deny_network
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset
from loop.tracking import Tracker

pytestmark = pytest.mark.integration
CLASSES = list(SYNTH_CLASSES)


@pytest.fixture(scope="module")
def prefect(prefect_harness: None) -> None:
    """Flows run against the session's Prefect test harness (tests/conftest.py)."""


@pytest.fixture(scope="module")
def cycle_config(ls_server: Any) -> Iterator[Path]:
    root = Path(ls_server.document_root) / "cycle-test"
    synth = root / "synth"
    write_dataset(synth, 48, seed=11, size=96)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "cycle-test",
                "classes": CLASSES,
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": "defect-loop cycle test",
                },
                "train": {"imgsz": 96, "epochs": 2, "batch": 8, "init": "champion"},
                # A 2-epoch model is sure of nothing: each image keeps its 5 strongest candidates
                # and labelers see them all, so the test labeler has suggestions to accept,
                # move, relabel and delete.
                "select": {
                    "batch_size": 6,
                    "candidate_conf": 0.5,
                    "min_candidates": 5,
                    "preannotation_conf": 1e-9,
                },
                # ... even though such a model is below any usefulness bar (its test AP50 is ~0).
                "advice": {"preannotation_min_ap50": 0.0},
            }
        )
    )
    old = os.environ.get("DEFECT_LOOP_LABELSTUDIO__API_TOKEN")
    os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = ls_server.token
    yield cfg_path
    if old is None:
        os.environ.pop("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", None)
    else:
        os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = old


def _move(region: dict[str, Any], dx: float) -> dict[str, Any]:
    r = {**region, "value": dict(region["value"])}
    r["value"]["x"] = min(r["value"]["x"] + dx, 100.0 - r["value"]["width"])
    return r


def _relabel(region: dict[str, Any]) -> dict[str, Any]:
    r = {**region, "value": dict(region["value"])}
    old = r["value"]["rectanglelabels"][0]
    r["value"]["rectanglelabels"] = [CLASSES[(CLASSES.index(old) + 1) % len(CLASSES)]]
    return r


def _keep_fields(region: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "type", "from_name", "to_name", "original_width", "original_height", "value")
    return {k: region[k] for k in keys if k in region}


def test_full_cycle_with_real_services(prefect: None, cycle_config: Path, ls_server: Any) -> None:
    from flows.cycle import cycle_flow

    with deny_network() as attempts:
        cfg = load_config(cycle_config)
        project = Project(cfg)
        synth = cycle_config.parent / "synth"
        report, seed_version = project.ingest(synth / "images", synth / "labels", label_limit=24)
        assert len(report.added) == 48 and seed_version is not None
        assert seed_version.split_counts()["val"] > 0

        first = cycle_flow(str(cycle_config), pull=True)
        assert first.pull is None  # no Label Studio project yet
        assert first.train is not None and first.train.promoted
        assert first.push.created == 6

        project = Project(load_config(cycle_config))
        gw = project.gateway()
        pid = project.state.ls_project_id
        tasks = gw.list_tasks(pid)
        assert len(tasks) == 6
        # Queue order: task ids ascend with rank, and the prediction score (served lowest first)
        # ascends with it too.
        scores = [t["predictions"][0]["score"] for t in tasks]
        assert scores == sorted(scores)

        with_preds = [t for t in tasks if len(t["predictions"][0]["result"]) == 5]
        assert len(with_preds) == 6, "every task shows its 5 strongest candidates"
        a, b = with_preds[0], with_preds[1]
        pa = [_keep_fields(r) for r in a["predictions"][0]["result"]]
        pb = [_keep_fields(r) for r in b["predictions"][0]["result"]]
        # Task a: accept one, move one, relabel one, delete the rest, add a missed defect.
        added = {
            **pa[0],
            "id": "missed1",
            "value": {
                "x": 1.0,
                "y": 2.0,
                "width": 10.0,
                "height": 5.0,
                "rotation": 0,
                "rectanglelabels": ["crack"],
            },
        }
        submitted_a = [pa[0], _move(pa[1], 3.0), _relabel(pa[2]), added]
        # Task b: the labeler deletes every suggestion: a defect-free image.
        submitted_b: list[dict[str, Any]] = []
        gw.annotate_results(a["id"], submitted_a)
        gw.annotate_results(b["id"], submitted_b)
        del pb

        second = cycle_flow(str(cycle_config), pull=True)
        assert second.pull is not None and second.pull.labeled == 2
        assert second.pull.new_version is not None
        assert second.pull.parent == seed_version.digest
        assert second.train is not None
        # Every cycle ends with the lead report, on disk and in the round's MLflow run.
        assert second.report is not None
        html, md = second.report
        assert html.exists() and md.exists()
        assert "round 2" in md.read_text()
        # The four tasks still waiting got the new model's suggestions and priority.
        assert second.push.refreshed == 4

        project = Project(load_config(cycle_config))
        version = project.current_version()
        assert version is not None and version.digest == second.pull.new_version
        assert len(version) == len(seed_version) + 2
        rows = version.by_sha()
        row_a, row_b = rows[a["data"]["sha256"]], rows[b["data"]["sha256"]]
        expected_a = ls_results_to_detections(submitted_a, CLASSES)
        order = np.lexsort((row_a.boxes.xyxy[:, 0], row_a.boxes.class_id))
        exp_order = np.lexsort((expected_a.xyxy[:, 0], expected_a.class_id))
        assert row_a.boxes.class_id[order].tolist() == expected_a.class_id[exp_order].tolist()
        np.testing.assert_allclose(row_a.boxes.xyxy[order], expected_a.xyxy[exp_order], atol=1e-3)
        assert len(row_b.boxes) == 0  # defect-free example
        assert row_a.provenance["source"] == "labelstudio"
        assert row_a.provenance["task_id"] == str(a["id"])
        # The other four pushed tasks are still waiting: not labels, not candidates.
        assert len(project.state.pending) == 4 + second.push.created
        assert not set(project.state.pending) & set(rows)

        runs = Tracker(project.cfg).training_runs()
        assert [r["dataset_digest"] for r in runs] == [seed_version.digest, version.digest]
        assert all("test_map50" in r["metrics"] and "val_map50_95" in r["metrics"] for r in runs)
        assert all(r["status"] == "FINISHED" for r in runs)
        # How the labeler changed the suggestions is logged with the run trained on them.
        corrections = runs[1]["metrics"]
        assert corrections["corrections.tasks"] == 2.0
        assert corrections["corrections.accepted"] >= 1.0
        assert corrections["corrections.removed"] >= 7.0  # 2 deleted on task a, 5 on task b

    assert attempts == [], f"non-loopback connections attempted: {attempts}"
