"""Polygon pre-annotations against a real Label Studio 1.23.2 (issue 13, step 3): a segment
project's push carries the model's outlines as PolygonLabels predictions with per-region scores,
the server keeps them as sent, and a labeler who accepts them gives back the same rings on pull.
A detect push still sends rectangles."""

from __future__ import annotations

import numpy as np
import pytest

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
