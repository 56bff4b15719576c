"""`loop.formats.labelstudio_review`: what a label review task holds, as pure JSON.

Round trips through the pull's own readers (`ls_results_to_instances`): a label shown in a
review task and submitted unchanged comes back as the same label."""

from __future__ import annotations

import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.labelstudio import ls_results_to_detections
from loop.formats.labelstudio_regions import ls_results_to_instances
from loop.formats.labelstudio_review import (
    REVIEW_MODEL_VERSION,
    REVIEW_VIEW_TITLE,
    labels_to_ls_results,
    review_fields,
    review_prediction,
    review_view,
)

CLASSES = ["scratch", "pit", "crack"]
WH = (80, 60)
BOXES = Detections(np.array([[4.0, 5, 20, 30], [40, 10, 79, 59]]), [2, 0], WH)
RING = np.array([[40.0, 10], [79, 10], [79, 59], [40, 59]])


@pytest.mark.parametrize(
    ("labels", "polygons"),
    [
        (BOXES, ()),
        (BOXES, ((), (RING,))),
        (Detections.empty(WH), ()),
    ],
    ids=["boxes", "box-and-polygon", "defect-free"],
)
def test_a_label_comes_back_unchanged(labels: Detections, polygons: tuple) -> None:
    results = labels_to_ls_results(labels, polygons, CLASSES)
    det, rings = ls_results_to_instances(results, CLASSES, image_wh=WH)
    assert det.same_boxes(labels, atol=1e-9)
    assert len(rings) == len(polygons)
    for got, want in zip(rings, polygons, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-9)
    # Labels carry no scores, whatever the detections hold.
    assert all("score" not in r for r in results)


def test_confidences_are_not_shown_as_label_scores() -> None:
    scored = Detections(BOXES.xyxy, BOXES.class_id, WH, confidence=[0.3, 0.9])
    assert all("score" not in r for r in labels_to_ls_results(scored, (), CLASSES))


@pytest.mark.parametrize(
    ("labels", "polygons", "error", "match"),
    [
        (BOXES, ((), (RING, RING + 1)), ConversionError, "2 rings"),
        (BOXES, ((),), ConversionError, "one per box"),
        (Detections(BOXES.xyxy, [2, 7], WH), (), UnknownLabelError, "class id 7"),
    ],
)
def test_labels_that_cannot_be_shown(labels, polygons, error, match) -> None:
    with pytest.raises(error, match=match):
        labels_to_ls_results(labels, polygons, CLASSES)


def test_review_fields_and_view_agree() -> None:
    fields = review_fields(3, 0.1234567891, "swap", "d" * 64)
    assert fields == {
        "review_rank": 3,
        "review_quality": 0.123457,
        "review_issue": "swap",
        "review_version": "d" * 64,
    }
    view = review_view()
    assert view["title"] == REVIEW_VIEW_TITLE
    (item,) = view["filters"]["items"]
    assert item["filter"] == "filter:tasks:data.review_rank" and item["value"] is False
    assert view["ordering"] == ["tasks:data.review_rank"]  # rank 1 first
    with pytest.raises(ConversionError, match="rank"):
        review_fields(0, 0.5, "swap", "d")


def test_review_prediction_holds_the_model_boxes_with_their_confidences() -> None:
    model = Detections(np.array([[1.0, 1, 9, 9]]), [1], WH, confidence=[0.87])
    p = review_prediction(42, model, 0.05, CLASSES)
    assert p["task"] == 42 and p["model_version"] == REVIEW_MODEL_VERSION and p["score"] == 0.05
    (r,) = p["result"]
    assert r["score"] == pytest.approx(0.87)
    assert ls_results_to_detections(p["result"], CLASSES).same_boxes(model, atol=1e-9)
