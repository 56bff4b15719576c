"""Known-answer tests of `loop.annotator_quality` (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from loop.annotator_quality import (
    AnnotatedTask,
    annotator_quality,
    class_agreement,
    quality_metrics,
)
from loop.detections import Detections
from loop.errors import LabelQualityError, UnknownLabelError
from loop.synth import SYNTH_CLASSES, generate

CLASSES = ["scratch", "pit", "crack", "dent"]
NONE = len(CLASSES)  # the "no box" row/column of the confusion matrix
WH = (100, 100)
S, P, CR = 0, 1, 2


def det(boxes: list[list[float]], ids: list[int]) -> Detections:
    return Detections(np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(ids), WH)


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70]

TASKS = [
    AnnotatedTask(
        11,
        "a" * 64,
        reference=det([A, B, C], [S, P, CR]),
        annotations={
            # A right; B's pit called crack; C missed; an extra pit where there is nothing.
            "ann": det([A, B, [80, 80, 90, 90]], [S, CR, P]),
            "bob": det([A, B, C], [S, P, CR]),
        },
        lead_times={"ann": 10.0, "bob": 30.0},
    ),
    AnnotatedTask(
        12,
        "b" * 64,
        reference=det([], []),
        annotations={"ann": det([[5, 5, 15, 15]], [S]), "bob": det([], [])},
        lead_times={"ann": 20.0},
    ),
    AnnotatedTask(
        13,
        "c" * 64,
        reference=det([[0, 0, 20, 20]], [S]),
        annotations={
            "ann": det([[0, 0, 20, 16]], [S]),  # IoU 0.8: a match
            "bob": det([[0, 0, 20, 6]], [S]),  # IoU 0.3: a miss and an extra box
        },
    ),
]


def test_per_annotator_known_answer() -> None:
    q = annotator_quality(TASKS, CLASSES)
    assert list(q) == ["ann", "bob"]
    ann, bob = q["ann"], q["bob"]

    assert (ann.tasks, ann.boxes, ann.reference_boxes, ann.true_positives) == (3, 5, 4, 2)
    assert ann.precision == pytest.approx(2 / 5) and ann.recall == pytest.approx(2 / 4)
    expected = np.zeros((NONE + 1, NONE + 1), dtype=np.int64)
    expected[S, S] = 2
    expected[P, CR] = 1  # pit labeled as crack
    expected[CR, NONE] = 1  # crack missed
    expected[NONE, P] = 1  # extra pit (task 11)
    expected[NONE, S] = 1  # extra scratch (task 12)
    np.testing.assert_array_equal(ann.confusion, expected)
    assert ann.confused_pairs(CLASSES) == {("pit", "crack"): 1}
    assert ann.task_ids == {"missed": (11,), "extra": (11, 12), "confused": (11,)}
    assert ann.lead_time_mean_s == pytest.approx(15.0)

    assert (bob.tasks, bob.boxes, bob.reference_boxes, bob.true_positives) == (3, 4, 4, 3)
    assert bob.precision == pytest.approx(0.75) and bob.recall == pytest.approx(0.75)
    expected = np.zeros((NONE + 1, NONE + 1), dtype=np.int64)
    expected[S, S] = expected[P, P] = expected[CR, CR] = 1
    expected[S, NONE] = expected[NONE, S] = 1  # task 13: the thin box neither matches nor covers
    np.testing.assert_array_equal(bob.confusion, expected)
    assert bob.confused_pairs(CLASSES) == {}
    assert bob.task_ids == {"missed": (13,), "extra": (13,), "confused": ()}
    assert bob.lead_time_mean_s == pytest.approx(30.0)


def test_confusion_rows_and_columns_add_up() -> None:
    for q in annotator_quality(TASKS, CLASSES).values():
        assert int(q.confusion[:NONE].sum()) == q.reference_boxes
        assert int(q.confusion[:, :NONE].sum()) == q.boxes
        assert not q.confusion.flags.writeable


def test_no_boxes_gives_none_not_zero() -> None:
    empty = AnnotatedTask(1, "d" * 64, det([], []), {"eve": det([], [])})
    q = annotator_quality([empty], CLASSES)["eve"]
    assert q.precision is None and q.recall is None and q.lead_time_mean_s is None
    assert q.task_ids == {"missed": (), "extra": (), "confused": ()}


def test_a_looser_iou_turns_the_thin_box_into_a_match() -> None:
    bob = annotator_quality(TASKS, CLASSES, min_iou=0.25)["bob"]
    assert bob.true_positives == 4 and bob.recall == pytest.approx(1.0)


def test_class_agreement_known_answer() -> None:
    agreement = class_agreement(TASKS, CLASSES)
    # scratch: task 11 agree (1), task 12 only ann drew one (0), task 13 thin box (IoU 0.375: 0).
    assert agreement["scratch"] == pytest.approx(1 / 3)
    # pit: task 11, ann's pit is elsewhere and bob's pit is B: 0. crack likewise.
    assert agreement["pit"] == pytest.approx(0.0)
    assert agreement["crack"] == pytest.approx(0.0)
    assert agreement["dent"] is None  # nobody drew a dent


def test_class_agreement_of_identical_annotators_is_one() -> None:
    tasks = [
        AnnotatedTask(t.task_id, t.sha256, t.reference, {"x": t.reference, "y": t.reference})
        for t in TASKS
    ]
    assert class_agreement(tasks, CLASSES) == {
        "scratch": 1.0,
        "pit": 1.0,
        "crack": 1.0,
        "dent": None,
    }


def _noisy(truth: Detections, rng: np.random.Generator, drop: float, swap: float) -> Detections:
    """An annotator who misses each box with probability ``drop`` and gives a kept box another
    class with probability ``swap``."""
    keep = rng.random(len(truth)) >= drop
    out = truth[keep]
    ids = out.class_id.copy()
    flip = rng.random(len(out)) < swap
    ids[flip] = (ids[flip] + rng.integers(1, len(SYNTH_CLASSES), int(flip.sum()))) % len(
        SYNTH_CLASSES
    )
    return Detections(out.xyxy, ids, out.image_wh)


def test_simulated_annotators_error_rates_are_recovered() -> None:
    """Annotators with known miss and swap rates on 200 seeded synthetic images: recall is
    (1 - drop)(1 - swap), precision 1 - swap, and the confusion matrix holds the misses."""
    rng = np.random.default_rng(42)
    rates = {"careful": (0.02, 0.0), "hasty": (0.2, 0.1), "colour-blind": (0.0, 0.3)}
    tasks = []
    for i, s in enumerate(generate(200, seed=9, size=64)):
        anns = {name: _noisy(s.labels, rng, d, w) for name, (d, w) in rates.items()}
        tasks.append(AnnotatedTask(i, f"{i:064x}", s.labels, anns))
    q = annotator_quality(tasks, list(SYNTH_CLASSES))
    n_ref = q["careful"].reference_boxes
    assert n_ref > 300
    for name, (drop, swap) in rates.items():
        assert q[name].recall == pytest.approx((1 - drop) * (1 - swap), abs=0.05), name
        assert q[name].precision == pytest.approx(1 - swap, abs=0.05), name
        missed = int(q[name].confusion[: len(SYNTH_CLASSES), len(SYNTH_CLASSES)].sum())
        assert missed / n_ref == pytest.approx(drop, abs=0.04), name
    assert q["colour-blind"].confused_pairs(list(SYNTH_CLASSES))
    assert not q["careful"].confused_pairs(list(SYNTH_CLASSES))


def test_duplicate_task_is_refused() -> None:
    with pytest.raises(LabelQualityError, match="given twice"):
        annotator_quality([TASKS[0], TASKS[0]], CLASSES)


def test_size_mismatch_is_refused() -> None:
    bad = AnnotatedTask(1, "e" * 64, det([], []), {"x": Detections.empty((50, 50))})
    with pytest.raises(LabelQualityError, match="same image"):
        annotator_quality([bad], CLASSES)
    with pytest.raises(LabelQualityError, match="same image"):
        class_agreement([bad], CLASSES)


def test_unknown_class_is_refused() -> None:
    bad = AnnotatedTask(1, "f" * 64, det([A], [0]), {"x": det([A], [7])})
    with pytest.raises(UnknownLabelError, match="x's annotation of task 1"):
        annotator_quality([bad], CLASSES)


def test_quality_metrics_known_answer() -> None:
    q = annotator_quality(TASKS, CLASSES)
    m = quality_metrics(q, class_agreement(TASKS, CLASSES))
    assert m["label_quality.annotator.ann.precision"] == pytest.approx(0.4)
    assert m["label_quality.annotator.ann.recall"] == pytest.approx(0.5)
    assert m["label_quality.annotator.ann.missed"] == 1.0
    assert m["label_quality.annotator.ann.extra"] == 2.0
    assert m["label_quality.annotator.ann.confused"] == 1.0
    assert m["label_quality.annotator.ann.lead_time_mean_s"] == pytest.approx(15.0)
    assert m["label_quality.annotator.bob.confused"] == 0.0
    assert m["label_quality.agreement.scratch"] == pytest.approx(1 / 3)
    assert "label_quality.agreement.dent" not in m  # None is left out, never 0


def test_quality_metrics_leave_out_undefined_figures_and_clean_names() -> None:
    empty = AnnotatedTask(1, "d" * 64, det([], []), {"eve@lab:1": det([], [])})
    m = quality_metrics(annotator_quality([empty], CLASSES))
    assert m == {
        "label_quality.annotator.eve_lab_1.tasks": 1.0,
        "label_quality.annotator.eve_lab_1.missed": 0.0,
        "label_quality.annotator.eve_lab_1.extra": 0.0,
        "label_quality.annotator.eve_lab_1.confused": 0.0,
    }
