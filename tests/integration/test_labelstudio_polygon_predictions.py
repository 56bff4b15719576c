"""Polygon pre-annotations against a real Label Studio 1.23.2 (issue 13, step 3): a segment
project's push carries the model's outlines as PolygonLabels predictions with per-region scores,
the server keeps them as sent, and a labeler who accepts them gives back the same rings on pull.
A detect push still sends rectangles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.detections import Detections
from loop.labelstudio import LabelStudioGateway, PushItem
from loop.polygons import rings_bbox

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent", "crack"]
WH = (64, 48)
TRI = np.array([[16.0, 12.0], [32.0, 9.5], [25.5, 36.0]])
QUAD = np.array([[40.0, 4.0], [60.0, 6.0], [58.0, 30.0], [41.0, 28.0]])
HOLE = np.array([[45.0, 10.0], [52.0, 10.0], [52.0, 20.0]])


def test_segment_push_sends_scored_polygons_that_pull_keeps(ls_server) -> None:
    seg = Detections(
        np.array([rings_bbox((TRI,)), rings_bbox((QUAD, HOLE)), [1.0, 1.0, 9.0, 9.0]]),
        [2, 0, 1],
        WH,
        confidence=[0.91, 0.42, 0.3],
        polygons=((TRI,), (QUAD, HOLE), ()),
    )
    box = Detections(np.array([[2.0, 2, 20, 20]]), [1], WH, confidence=[0.5])
    items = [
        PushItem(f"{i + 700:064x}", f"/data/local-files/?d=images/s{i}.png", d, 1.0)
        for i, d in enumerate([seg, box])
    ]
    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        pid = gw.ensure_project(
            "defect-loop: polygon predictions", CLASSES, "Outline defects.", polygons=True
        )
        ids = gw.push(pid, items, "seg-v1", CLASSES, progress=False).task_ids
        tasks = {t["id"]: t for t in gw.list_tasks(pid)}
        pred = tasks[ids[items[0].sha256]]["predictions"]
        assert len(pred) == 1 and pred[0]["model_version"] == "seg-v1"
        regions = pred[0]["result"]
        # two polygons (the hole is left out: a Label Studio polygon has none) and one box
        assert [r["type"] for r in regions] == ["polygonlabels", "polygonlabels", "rectanglelabels"]
        assert [r["score"] for r in regions] == pytest.approx([0.91, 0.42, 0.3])
        assert regions[0]["value"]["polygonlabels"] == ["crack"]
        np.testing.assert_allclose(
            regions[0]["value"]["points"], TRI / np.array(WH) * 100.0, atol=1e-9
        )
        plain = tasks[ids[items[1].sha256]]["predictions"][0]["result"]
        assert [r["type"] for r in plain] == ["rectanglelabels"] and plain[0]["score"] == 0.5

        # A labeler accepts the suggestions as they are.
        accepted = [{k: v for k, v in r.items() if k != "score"} for r in regions]
        gw.annotate_results(ids[items[0].sha256], accepted)
        pulled = gw.pull(pid, CLASSES, polygons=True)
    (label,) = [lb for lb in pulled.labels if lb.task_id == ids[items[0].sha256]]
    assert label.detections.class_id.tolist() == [2, 0, 1]
    np.testing.assert_allclose(label.polygons[0][0], TRI, atol=1e-6)
    np.testing.assert_allclose(label.polygons[1][0], QUAD, atol=1e-6)
    assert label.polygons[2] == ()
    np.testing.assert_allclose(label.detections.xyxy[2], [1, 1, 9, 9], atol=1e-6)


PRETRAINED = (
    Path(os.environ["DEFECT_LOOP_YOLOV8N"])
    if os.environ.get("DEFECT_LOOP_YOLOV8N")
    else Path(__file__).resolve().parents[3] / "shared" / "models" / "yolov8n.pt"
)


@pytest.mark.skipif(
    not PRETRAINED.is_file(),
    reason=f"the COCO-pretrained yolov8n.pt is not at {PRETRAINED}: set $DEFECT_LOOP_YOLOV8N",
)
def test_a_segment_projects_push_carries_its_models_outlines(ls_server, monkeypatch) -> None:
    """The whole production path: a segment project trains its segmentation model, scores its
    pool through `loop.scoring` and pushes; each task's prediction holds polygons with scores."""
    from loop.config import load_config
    from loop.project import Project
    from loop.scoring import ScoringModels, plan_scoring, rank_candidates, score_batch
    from loop.synth import SYNTH_CLASSES, write_dataset
    from loop.tracking import Tracker

    root = Path(ls_server.document_root) / "segment-push"
    write_dataset(root / "synth", 40, seed=6, size=64, polygons=True)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "segment-push",
                "classes": list(SYNTH_CLASSES),
                "task": "segment",
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": "defect-loop segment push test",
                    "progress": False,
                },
                "train": {"imgsz": 64, "epochs": 1, "batch": 8, "weights": str(PRETRAINED)},
                # a 1-epoch model is unsure of everything: show all its outlines
                "select": {"batch_size": 3, "preannotation_conf": 0.001, "min_candidates": 2},
                "advice": {"preannotation_min_ap50": 0.0},
            }
        )
    )
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    project = Project(load_config(cfg_path))
    project.ingest(root / "synth" / "images", root / "synth" / "labels", label_limit=24, seed=1)
    tracker = Tracker(project.cfg)
    fit = project.fit(tracker)
    plan = plan_scoring(project, ScoringModels(weights=fit.result.weights, name="seg-v1"))
    shas = project.candidates()
    assert len(shas) >= 3
    ranked = rank_candidates(project, plan, score_batch(project, plan, shas))
    gw = project.gateway()
    summary = project.push(gw, ranked, "seg-v1")
    assert summary.created == 3 and summary.failed == 0
    tasks = gw.list_tasks(project.state.ls_project_id)
    regions = [r for t in tasks for p in t["predictions"] for r in p["result"]]
    polygons = [r for r in regions if r["type"] == "polygonlabels"]
    assert polygons, "a segmentation model's pre-annotations are polygons"
    for r in polygons:
        assert 0.0 <= r["score"] <= 1.0 and r["from_name"] == "polygon"
        assert len(r["value"]["points"]) >= 3 and r["value"]["polygonlabels"][0] in SYNTH_CLASSES
        pts = np.asarray(r["value"]["points"])
        assert (pts >= 0).all() and (pts <= 100).all()
