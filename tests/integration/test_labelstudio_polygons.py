"""Pull keeps polygons (issue 13, step 3) against a real Label Studio 1.23.2 (session fixture
`ls_server`): what the server stores and exports for a polygon region comes back as a pixel ring
with its box derived from it; a self-crossing polygon rejects its task with the task id."""

from __future__ import annotations

import numpy as np
import pytest

from loop.detections import Detections
from loop.formats.labelstudio import detections_to_ls_results
from loop.labelstudio import LabelStudioGateway, PushItem

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent", "crack"]
WH = (64, 48)


def _item(i: int) -> PushItem:
    det = Detections(np.array([[2.0, 2, 20, 20]]), np.array([0]), WH, confidence=np.array([0.5]))
    return PushItem(f"{i + 900:064x}", f"/data/local-files/?d=images/p{i}.png", det, 1.0)


def _poly(points: list[list[float]], label: str = "crack") -> dict:
    return {
        "type": "polygonlabels",
        "from_name": "polygon",
        "to_name": "image",
        "original_width": WH[0],
        "original_height": WH[1],
        "value": {"points": points, "polygonlabels": [label]},
    }


def test_pull_keeps_polygons_from_a_real_server(ls_server):
    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        pid = gw.ensure_project(
            "defect-loop: kept polygons", CLASSES, "Outline defects.", polygons=True
        )
        items = [_item(i) for i in range(3)]
        ids = [
            gw.push(pid, items, "m1", CLASSES, progress=False).task_ids[it.sha256] for it in items
        ]
        box = detections_to_ls_results(Detections(np.array([[5.0, 5, 30, 30]]), [1], WH), CLASSES)
        gw.annotate_results(ids[0], [_poly([[25, 25], [50, 20], [40, 75]]), *box])
        gw.annotate_results(ids[1], [_poly([[10, 10], [60, 60], [60, 10], [10, 60]])])  # bow-tie
        gw.annotate_results(ids[2], [_poly([[25, 25], [50, 20], [40, 75]])])

        kept = gw.pull(pid, CLASSES, polygons=True)
        as_boxes = gw.pull(pid, CLASSES)
    by = {lb.task_id: lb for lb in kept.labels}
    assert sorted(by) == [ids[0], ids[2]]
    lab = by[ids[0]]
    assert lab.detections.class_id.tolist() == [2, 1]
    ring = [[16.0, 12.0], [32.0, 9.6], [25.6, 36.0]]  # percent of 64 x 48 px
    np.testing.assert_allclose(lab.polygons[0][0], ring, atol=1e-6)
    assert lab.polygons[1] == ()  # the rectangle
    np.testing.assert_allclose(lab.detections.xyxy[0], [16.0, 9.6, 32.0, 36.0], atol=1e-6)
    np.testing.assert_allclose(lab.detections.xyxy[1], [5, 5, 30, 30], atol=1e-6)
    (rejected,) = kept.rejected
    assert rejected.task_id == ids[1] and "crosses or touches itself" in rejected.reason
    # without keeping polygons (a detect project) the same tasks give boxes, as before
    plain = {lb.task_id: lb for lb in as_boxes.labels}
    assert sorted(plain) == ids and all(lb.polygons == () for lb in plain.values())
    np.testing.assert_allclose(plain[ids[2]].detections.xyxy, [[16.0, 9.6, 32.0, 36.0]], atol=1e-6)
