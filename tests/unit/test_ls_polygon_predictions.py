"""Polygon pre-annotations (issue 13, step 3): `instances_to_ls_results` and its round trip
through `ls_results_to_instances`; boxes stay rectangles; detect predictions are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.labelstudio import POLYGON, RECTANGLE, detections_to_ls_results
from loop.formats.labelstudio_regions import (
    instances_to_ls_results,
    ls_results_to_instances,
    outer_rings,
    prediction_to_ls_results,
)
from loop.polygons import rings_bbox

CLASSES = ["scratch", "pit", "crack"]
WH = (64, 48)
TRI = np.array([[16.0, 12.0], [32.0, 9.6], [25.6, 36.0]])
QUAD = np.array([[40.0, 4.0], [60.0, 6.0], [58.5, 30.25], [41.0, 28.0]])


def _pred(polygons, classes, conf) -> Detections:
    boxes = [rings_bbox(r) if r else (1.0, 1.0, 9.0, 9.0) for r in polygons]
    return Detections(
        np.array(boxes), np.array(classes), WH, confidence=np.array(conf), polygons=polygons
    )


def test_round_trip_through_ls_results_to_instances() -> None:
    det = _pred(((TRI,), (QUAD,)), [2, 0], [0.9, 0.4])
    results = instances_to_ls_results(det, CLASSES)
    assert [r["type"] for r in results] == [POLYGON, POLYGON]
    assert [r["score"] for r in results] == [0.9, 0.4]
    assert [r["value"][POLYGON] for r in results] == [["crack"], ["scratch"]]
    assert all(r["from_name"] == "polygon" and r["value"]["closed"] for r in results)
    back, rings = ls_results_to_instances(results, CLASSES)
    assert back.class_id.tolist() == [2, 0]
    for got, want in zip(rings, (TRI, QUAD), strict=True):
        np.testing.assert_allclose(got[0], want, atol=1e-9)
    np.testing.assert_allclose(back.xyxy, det.xyxy, atol=1e-9)


def test_holes_are_left_out_and_parts_become_regions() -> None:
    outer = np.array([[0.0, 0], [20, 0], [20, 20], [0, 20]])
    hole = np.array([[5.0, 5], [15, 5], [15, 15], [5, 15]])
    island = np.array([[8.0, 8], [12, 8], [12, 12], [8, 12]])  # inside the hole: a part again
    apart = np.array([[30.0, 30], [40, 30], [40, 40]])
    assert [r.tolist() for r in outer_rings((outer, hole, island, apart))] == [
        outer.tolist(),
        island.tolist(),
        apart.tolist(),
    ]
    det = _pred(((outer, hole, apart),), [1], [0.8])
    results = instances_to_ls_results(det, CLASSES)
    assert len(results) == 2 and {r["score"] for r in results} == {0.8}
    assert len({r["id"] for r in results}) == 2
    _, rings = ls_results_to_instances(results, CLASSES)
    np.testing.assert_allclose(rings[0][0], outer, atol=1e-9)
    np.testing.assert_allclose(rings[1][0], apart, atol=1e-9)


def test_a_box_without_outline_stays_a_rectangle() -> None:
    det = _pred(((TRI,), ()), [2, 1], [0.9, 0.3])
    results = instances_to_ls_results(det, CLASSES)
    assert [r["type"] for r in results] == [POLYGON, RECTANGLE]
    assert results[1]["score"] == 0.3 and results[1]["from_name"] == "label"
    back, _ = ls_results_to_instances(results, CLASSES)
    np.testing.assert_allclose(back.xyxy[1], [1, 1, 9, 9], atol=1e-9)


def test_detect_predictions_are_unchanged() -> None:
    det = Detections(np.array([[2.0, 3, 20, 30]]), [1], WH, confidence=[0.7])
    assert prediction_to_ls_results(det, CLASSES) == detections_to_ls_results(det, CLASSES)
    seg = _pred(((TRI,),), [2], [0.9])
    assert prediction_to_ls_results(seg, CLASSES) == instances_to_ls_results(seg, CLASSES)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConversionError, match="no polygons"):
        instances_to_ls_results(Detections(np.array([[0.0, 0, 5, 5]]), [0], WH), CLASSES)
    with pytest.raises(UnknownLabelError):
        instances_to_ls_results(_pred(((TRI,),), [7], [0.5]), CLASSES)
