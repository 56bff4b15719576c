import numpy as np
import pytest

from loop.detections import Detections, box_iou
from loop.errors import InvalidDetectionsError


def det(boxes, ids, wh=(100, 50), **kw):
    return Detections(np.array(boxes, dtype=float).reshape(-1, 4), np.array(ids), wh, **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xyxy": np.zeros((2, 3)), "class_id": [0, 0]}, "shape"),
        ({"xyxy": np.zeros((2, 4)), "class_id": [0]}, "class_id must have shape"),
        ({"xyxy": [[5, 5, 1, 9]], "class_id": [0]}, "x1 <= x2"),
        ({"xyxy": [[0, 0, np.nan, 1]], "class_id": [0]}, "NaN"),
        ({"xyxy": [[0, 0, 1, 1]], "class_id": [-1]}, ">= 0"),
        ({"xyxy": [[0, 0, 1, 1]], "class_id": [0.5]}, "whole numbers"),
        ({"xyxy": [[0, 0, 1, 1]], "class_id": [0], "confidence": [1.5]}, "within"),
        ({"xyxy": [[0, 0, 1, 1]], "class_id": [2], "class_probs": [[0.1, 0.2]]}, "out of range"),
        ({"xyxy": [[0, 0, 1, 1]], "class_id": [0], "class_probs": [0.1]}, "class_probs must"),
        ({"xyxy": [[0, 0, 1, 1]], "class_id": [0], "image_wh": (0, 5)}, "positive"),
    ],
)
def test_invalid_inputs_raise_named_error(kwargs, message):
    kwargs.setdefault("image_wh", (10, 10))
    with pytest.raises(InvalidDetectionsError, match=message):
        Detections(**kwargs)


def test_arrays_are_read_only_and_copied():
    boxes = np.array([[0.0, 0.0, 1.0, 1.0]])
    d = Detections(boxes, np.array([0]), (4, 4))
    boxes[0, 0] = 0.5
    assert d.xyxy[0, 0] == 0.0
    with pytest.raises(ValueError):
        d.xyxy[0, 0] = 3.0


def test_subset_keeps_arrays_aligned():
    d = det(
        [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]],
        [0, 1, 2],
        confidence=[0.9, 0.2, 0.5],
        class_probs=[[0.9, 0, 0], [0, 0.2, 0], [0, 0, 0.5]],
    )
    kept = d.with_min_confidence(0.5)
    assert kept.class_id.tolist() == [0, 2]
    assert kept.confidence.tolist() == [0.9, 0.5]
    assert kept.class_probs[:, 2].tolist() == [0.0, 0.5]
    assert len(d[np.array([1])]) == 1


def test_empty_with_classes():
    e = Detections.empty((10, 20), num_classes=3)
    assert len(e) == 0 and e.class_probs.shape == (0, 3) and e.image_wh == (10, 20)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),
    ],
)
def test_box_iou_known_answers(a, b, expected):
    assert box_iou(np.array([a]), np.array([b]))[0, 0] == pytest.approx(expected)
