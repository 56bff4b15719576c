"""Known-answer tests of `loop.corrections` (pure: no services)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loop.corrections import (
    CorrectionInput,
    acceptance_rates,
    build_corrections,
    compare,
    correction_metrics,
    match_boxes,
    mean_pairwise_f1,
    pairwise_f1,
    read_corrections,
    write_corrections,
)
from loop.detections import Detections
from loop.errors import UnknownLabelError

CLASSES = ["scratch", "dent", "crack"]
WH = (200, 100)


def det(boxes, classes, conf=None) -> Detections:
    return Detections(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(classes, dtype=np.int64),
        WH,
        confidence=None if conf is None else np.asarray(conf, dtype=np.float64),
    )


# IoU of [0,0,10,10] with [0,0,10,w]: w/10 when w <= 10.
BASE = [0.0, 0.0, 10.0, 10.0]


def shrunk(iou: float, dx: float = 0.0) -> list[float]:
    """A box inside BASE (shifted by dx along x in a far region) with the given IoU against it."""
    return [dx, 0.0, dx + 10.0, 10.0 * iou]


def test_each_outcome_once():
    far = 100.0
    predicted = det(
        [
            BASE,  # accepted: identical
            [30, 0, 40, 10],  # adjusted: IoU 0.6
            [60, 0, 70, 10],  # relabeled: identical box, other class
            [far, 50, far + 10, 60],  # removed
        ],
        [0, 1, 2, 0],
        conf=[0.9, 0.8, 0.7, 0.3],
    )
    final = det(
        [
            BASE,
            shrunk(0.6, 30),
            [60, 0, 70, 10],
            [150, 80, 160, 90],  # added (missed)
        ],
        [0, 1, 0, 2],
    )
    tc = compare(predicted, final, CLASSES)
    assert tc.counts["scratch"] == {
        "accepted": 1,
        "adjusted": 0,
        "relabeled": 0,
        "removed": 1,
        "added": 0,
    }
    assert tc.counts["dent"]["adjusted"] == 1
    assert tc.counts["crack"] == {
        "accepted": 0,
        "adjusted": 0,
        "relabeled": 1,
        "removed": 0,
        "added": 1,
    }
    # same-class matches: IoU 1.0 and 0.6; denominator 4 + 4 - 2 = 6
    assert tc.disagreement == pytest.approx(1 - 1.6 / 6)
    assert [(i, j) for i, j, _ in tc.pairs] == [(0, 0), (1, 1), (2, 2)]


@pytest.mark.parametrize(
    ("iou", "outcome"),
    [(1.0, "accepted"), (0.9, "accepted"), (0.89, "adjusted"), (0.5, "adjusted"), (0.49, None)],
)
def test_iou_thresholds(iou, outcome):
    tc = compare(det([BASE], [1]), det([shrunk(iou)], [1]), CLASSES)
    if outcome is None:  # below 0.5: the prediction was removed and a new box added
        assert tc.counts["dent"]["removed"] == 1 and tc.counts["dent"]["added"] == 1
        assert tc.disagreement == pytest.approx(1.0)
    else:
        assert tc.counts["dent"][outcome] == 1
        assert tc.total("removed") == tc.total("added") == 0
        assert tc.disagreement == pytest.approx(1 - iou)


def test_hungarian_prefers_global_optimum_over_greedy():
    # Greedy (highest IoU first) takes p0-f0 (IoU 0.7) and leaves p1 unmatched (p1-f1 is 0.2);
    # the optimal assignment matches p0-f1 (0.6) and p1-f0 (0.6).
    p = det([[20, 0, 30, 10], [27 - 7 / 0.6, 0, 27, 10]], [0, 0])
    f = det([[20, 0, 27, 10], [24, 0, 30, 10]], [0, 0])
    assert [(i, j) for i, j, _ in match_boxes(p, f)] == [(0, 1), (1, 0)]
    tc = compare(p, f, CLASSES)
    assert tc.counts["scratch"]["adjusted"] == 2
    assert tc.total("removed") == tc.total("added") == 0


def test_same_class_pair_beats_better_other_class_pair():
    p = det([BASE], [0])
    f = det([BASE, shrunk(0.6)], [1, 0])  # identical box but other class, and a 0.6 same-class
    tc = compare(p, f, CLASSES)
    assert tc.counts["scratch"]["adjusted"] == 1
    assert tc.counts["dent"]["added"] == 1
    assert tc.total("relabeled") == 0


def test_empty_sets():
    empty = det([], [])
    assert compare(empty, empty, CLASSES).disagreement == 0.0
    tc = compare(det([BASE], [2]), empty, CLASSES)  # labeler says defect-free
    assert tc.counts == {
        "crack": {"accepted": 0, "adjusted": 0, "relabeled": 0, "removed": 1, "added": 0}
    }
    assert tc.disagreement == 1.0
    tc = compare(empty, det([BASE], [2]), CLASSES)
    assert tc.counts["crack"]["added"] == 1 and tc.disagreement == 1.0


def test_unknown_class_id_is_named():
    with pytest.raises(UnknownLabelError, match="class id 5"):
        compare(det([BASE], [5]), det([], []), CLASSES)


def test_pairwise_agreement():
    a = det([BASE, [50, 50, 60, 60]], [0, 1])
    b = det([shrunk(0.8), [50, 50, 60, 60]], [0, 2])  # one agrees, one differs in class
    assert pairwise_f1(a, b) == pytest.approx(2 * 1 / 4)
    assert pairwise_f1(det([], []), det([], [])) == 1.0
    assert pairwise_f1(a, det([], [])) == 0.0
    assert mean_pairwise_f1([a]) is None
    assert mean_pairwise_f1([a, a, b]) == pytest.approx((1.0 + 0.5 + 0.5) / 3)


def test_report_shape_metrics_and_round_trip(tmp_path):
    items = [
        CorrectionInput(
            "a" * 64,
            7,
            det([BASE, [50, 0, 60, 10]], [0, 1], conf=[0.9, 0.4]),
            det([BASE], [0]),
            lead_time=12.5,
        ),
        CorrectionInput("b" * 64, 8, det([], [], conf=[]), det([[1, 2, 3, 4]], [2]), None),
    ]
    rep = build_corrections(items, CLASSES)
    assert set(rep) == {"per_class", "lead_times", "tasks", "images"}
    assert rep["tasks"] == 2 and rep["lead_times"] == [12.5]
    assert list(rep["per_class"]) == CLASSES
    assert rep["per_class"]["scratch"]["accepted"] == 1
    assert rep["per_class"]["dent"]["removed"] == 1
    assert rep["per_class"]["crack"]["added"] == 1
    im0 = rep["images"][0]
    assert set(im0) == {"sha256", "task_id", "disagreement", "match", "predicted", "final"}
    assert im0["predicted"] == [
        [0.0, 0.0, 10.0, 10.0, "scratch", 0.9],
        [50, 0, 60, 10, "dent", 0.4],
    ]
    assert im0["final"] == [[0.0, 0.0, 10.0, 10.0, "scratch"]]
    assert im0["disagreement"] == pytest.approx(1 - 1 / 2)
    assert rep["images"][1]["disagreement"] == 1.0
    assert acceptance_rates(rep) == {"scratch": 1.0, "dent": 0.0, "crack": None}

    m = correction_metrics(rep)
    assert m["corrections.tasks"] == 2
    assert m["corrections.accepted"] == 1 and m["corrections.removed"] == 1
    assert m["corrections.added"] == 1
    assert m["corrections.acceptance_rate"] == pytest.approx(0.5)
    assert m["corrections.acceptance_rate.scratch"] == 1.0
    assert "corrections.acceptance_rate.crack" not in m
    assert m["corrections.lead_time_mean_s"] == 12.5
    assert m["corrections.disagreement_max"] == 1.0
    assert all(isinstance(v, float) for v in m.values())

    path = write_corrections(tmp_path / "d" / "corrections.json", rep)
    assert read_corrections(path) == json.loads(json.dumps(rep))
