"""`loop.formats.cleanlab`: Detections <-> cleanlab's object-detection inputs (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.cleanlab import (
    cleanlab_labels_to_detections,
    cleanlab_predictions_to_detections,
    detections_to_cleanlab_labels,
    detections_to_cleanlab_predictions,
)

WH = (120, 80)


def _det(boxes, ids, conf=None) -> Detections:
    return Detections(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(ids, dtype=np.int64),
        WH,
        confidence=None if conf is None else np.asarray(conf, dtype=np.float64),
    )


def test_labels_known_answer() -> None:
    gt = _det([[1, 2, 30, 40], [50, 5, 60, 70.5]], [2, 0])
    out = detections_to_cleanlab_labels(gt, 3, "abc")
    assert out["image_name"] == "abc"
    np.testing.assert_array_equal(out["bboxes"], [[1, 2, 30, 40], [50, 5, 60, 70.5]])
    np.testing.assert_array_equal(out["labels"], [2, 0])
    assert out["bboxes"].dtype == np.float64 and out["labels"].dtype == np.int64


@pytest.mark.parametrize(
    ("boxes", "ids"),
    [
        ([], []),
        ([[0, 0, 10, 10]], [1]),
        ([[3, 4, 5, 6], [0, 0, 120, 80], [7.25, 8.5, 9.75, 10.0]], [0, 2, 0]),
    ],
)
def test_labels_round_trip(boxes, ids) -> None:
    gt = _det(boxes, ids)
    back = cleanlab_labels_to_detections(detections_to_cleanlab_labels(gt, 3, "x"), WH)
    assert back.same_boxes(gt)
    assert back.confidence is None
    assert back.meta["image_name"] == "x"


def test_predictions_known_answer_grouped_by_class() -> None:
    pred = _det([[0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 8, 8]], [1, 0, 1], conf=[0.9, 0.3, 0.6])
    out = detections_to_cleanlab_predictions(pred, 3)
    assert len(out) == 3
    np.testing.assert_array_equal(out[0], [[1, 1, 5, 5, 0.3]])
    np.testing.assert_array_equal(out[1], [[0, 0, 10, 10, 0.9], [2, 2, 8, 8, 0.6]])
    assert out[2].shape == (0, 5)


@pytest.mark.parametrize(
    ("boxes", "ids", "conf"),
    [
        ([], [], []),
        ([[0, 0, 10, 10]], [2], [0.5]),
        # already grouped by class: the round trip keeps the order exactly
        ([[3, 4, 5, 6], [1, 1, 9, 9], [0, 0, 120, 80]], [0, 0, 2], [0.99, 0.01, 0.5]),
    ],
)
def test_predictions_round_trip(boxes, ids, conf) -> None:
    pred = _det(boxes, ids, conf)
    back = cleanlab_predictions_to_detections(detections_to_cleanlab_predictions(pred, 3), WH)
    assert back.same_boxes(pred)
    assert back.confidence is not None
    np.testing.assert_allclose(back.confidence, pred.confidence)


def test_predictions_round_trip_reorders_by_class_only() -> None:
    pred = _det([[0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]], [1, 0, 1], conf=[0.7, 0.8, 0.9])
    back = cleanlab_predictions_to_detections(detections_to_cleanlab_predictions(pred, 2), WH)
    assert back.same_boxes(pred[[1, 0, 2]])
    np.testing.assert_allclose(back.confidence, [0.8, 0.7, 0.9])


def test_predictions_need_confidences() -> None:
    with pytest.raises(ConversionError, match="confidences"):
        detections_to_cleanlab_predictions(_det([[0, 0, 1, 1]], [0]), 2)


@pytest.mark.parametrize("to_cleanlab", ["labels", "predictions"])
def test_unknown_class_is_an_error(to_cleanlab: str) -> None:
    det = _det([[0, 0, 1, 1]], [3], conf=[0.5])
    with pytest.raises(UnknownLabelError, match="3 classes"):
        if to_cleanlab == "labels":
            detections_to_cleanlab_labels(det, 3, "x")
        else:
            detections_to_cleanlab_predictions(det, 3)


@pytest.mark.parametrize(
    "prediction", [[np.zeros((2, 4))], [np.zeros(5)], [np.zeros((0, 5)), np.ones((1, 6))]]
)
def test_malformed_prediction_arrays(prediction) -> None:
    with pytest.raises(ConversionError, match=r"\(M, 5\)"):
        cleanlab_predictions_to_detections(prediction, WH)


def test_malformed_label_dict() -> None:
    with pytest.raises(ConversionError, match="bboxes"):
        cleanlab_labels_to_detections({"labels": [0]}, WH)
