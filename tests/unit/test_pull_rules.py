"""The pull rules (`loop.formats.labelstudio_pull.judge_task`) on plain dicts: what an exported Label
Studio task becomes (a label, a rejection with its reason, a skip, nothing), with no server and no
gateway in between."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from ls_json import poly, rect, verdict

from loop.errors import ConversionError, UnknownLabelError
from loop.formats.labelstudio import UnsafeImagePathError
from loop.formats.labelstudio_pull import judge_task

CLASSES = ["scratch", "dent", "crack"]
DATA = {
    "image": "/data/local-files/?d=images/a.png",
    "sha256": "a" * 64,
    "width": 200,
    "height": 100,
}
USERS = {1: "ann@x", 2: "bob@x", 3: "cy@x"}


def ann(aid: int, result: list, when: str = "2026-01-01T00:00:00Z", by: int = 1, **kw: Any) -> dict:
    return {
        "id": aid,
        "result": result,
        "was_cancelled": False,
        "ground_truth": False,
        "updated_at": when,
        "completed_by": by,
        "lead_time": 4.5,
        **kw,
    }


def task(anns: list, tid: int = 7, **data: Any) -> dict:
    return {"id": tid, "data": {**DATA, **data}, "annotations": anns}


# (case, task, expected xyxy of the label's boxes in pixels, expected class ids)
LABELED = [
    ("one box", task([ann(1, [rect(10, 10, 20, 20)])]), [[20, 10, 60, 30]], [1]),
    ("no regions: defect-free", task([ann(1, [])]), [], []),
    ("the defect-free choice alone", task([ann(1, [verdict()])]), [], []),
    ("polygon: its bounding box", task([ann(1, [poly([[10, 10], [30, 5], [20, 40]])])]), [[20, 5, 60, 40]], [1]),
    ("ground truth beats a newer annotation",
     task([ann(1, [rect(0, 0, 50, 50, "crack")], "2026-01-01T00:00:00Z", ground_truth=True),
           ann(2, [], "2026-01-09T00:00:00Z")]),
     [[0, 0, 100, 50]], [2]),
    ("the newest annotation wins",
     task([ann(1, [rect(0, 0, 50, 50, "crack")], "2026-01-01T00:00:00Z"),
           ann(2, [rect(10, 10, 10, 10, "scratch")], "2026-01-02T00:00:00Z")]),
     [[20, 10, 40, 20]], [0]),
    ("a cancelled annotation is not a label",
     task([ann(1, [rect(10, 10, 20, 20)], "2026-01-01T00:00:00Z"),
           ann(2, [], "2026-01-05T00:00:00Z", was_cancelled=True)]),
     [[20, 10, 60, 30]], [1]),
    ("another annotator's broken annotation does not reject the task",
     task([ann(1, [rect(10, 10, 20, 20)], "2026-01-02T00:00:00Z", by=1),
           ann(2, [rect(10, 10, 20, 20, "rust")], "2026-01-01T00:00:00Z", by=2)]),
     [[20, 10, 60, 30]], [1]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "t", "xyxy", "ids"), LABELED, ids=[c[0] for c in LABELED])
def test_usable_tasks_become_labels(case: str, t: dict, xyxy: list, ids: list) -> None:
    v = judge_task(t, CLASSES, USERS)
    assert v.rejected is None and not v.skipped and v.label is not None, case
    assert v.task_id == 7 and v.label.task_id == 7 and v.label.sha256 == "a" * 64
    np.testing.assert_allclose(v.label.detections.xyxy, np.asarray(xyxy, float).reshape(-1, 4))
    assert v.label.detections.class_id.tolist() == ids
    assert v.label.detections.image_wh == (200, 100)
    assert v.label.detections.confidence is None  # ground truth carries no scores
    assert v.label.image_url == DATA["image"]


# (case, task, expected error type of the cause, a word the reason must contain)
REJECTED = [
    ("unknown label", task([ann(1, [rect(1, 1, 5, 5, "rust")])]), UnknownLabelError, "rust"),
    ("rotated box", task([ann(1, [rect(1, 1, 5, 5, rotation=30)])]), ConversionError, "rotated"),
    ("outside the image", task([ann(1, [rect(90, 1, 20, 5)])]), ConversionError, "outside the image"),
    ("zero area", task([ann(1, [rect(10, 10, 0, 5)])]), ConversionError, "zero area"),
    ("polygon outside", task([ann(1, [poly([[10, 10], [130, 5], [20, 40]])])]), ConversionError, "outside the image"),
    ("polygon of two points", task([ann(1, [poly([[10, 10], [30, 5]])])]), ConversionError, "3 [x, y] points"),
    ("defect-free with regions", task([ann(1, [verdict(), rect(1, 1, 5, 5)])]), ConversionError, "defect-free"),
    ("image path escapes the root", task([ann(1, [])], image="/data/local-files/?d=../x.png"), UnsafeImagePathError, "escapes"),
    ("no image URL", task([ann(1, [])], image=None), ConversionError, "no image URL"),
    ("no sha256", task([ann(1, [])], sha256=None), ConversionError, "sha256"),
    ("empty and no size", task([ann(1, [])], width=None, height=None), ConversionError, "image size unknown"),
    ("drawn on another size", task([ann(1, [{**rect(1, 1, 5, 5), "original_width": 300}])]), ConversionError, "300x100"),
    ("non-numeric x", task([ann(1, [rect("ten", 1, 5, 5)])]), ConversionError, "must be a number"),
    ("annotation without an id", task([ann(None, [])]), ConversionError, "integer id"),  # type: ignore[arg-type]
    ("was_cancelled not a bool", task([ann(1, [], was_cancelled="no")]), ConversionError, "was_cancelled"),
    ("result not a list", task([ann(1, {"x": 1})]), ConversionError, "list of regions"),  # type: ignore[arg-type]
    ("negative lead time", task([ann(1, [], lead_time=-3)]), ConversionError, "lead_time"),
    ("annotations not a list", {"id": 7, "data": DATA, "annotations": "x"}, ConversionError, "not a list"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "t", "cause", "word"), REJECTED, ids=[c[0] for c in REJECTED])
def test_unusable_tasks_are_rejected_with_the_reason(
    case: str, t: dict, cause: type, word: str
) -> None:
    v = judge_task(t, CLASSES, USERS)
    assert v.label is None and not v.skipped and v.rejected is not None, case
    assert v.rejected.task_id == 7 and isinstance(v.rejected.__cause__, cause)
    assert word in v.rejected.reason


def test_too_many_regions_is_rejected_only_above_the_limit() -> None:
    t = task([ann(1, [rect(1, 1, 5, 5)] * 3)])
    assert judge_task(t, CLASSES, USERS, max_regions=3).label is not None
    v = judge_task(t, CLASSES, USERS, max_regions=2)
    assert v.rejected is not None and "labelstudio.max_regions" in v.rejected.reason


@pytest.mark.parametrize(
    ("anns", "skipped"),
    [([ann(1, [], was_cancelled=True)], True), ([], False)],
    ids=["every annotation cancelled: skipped", "no annotation: nothing"],
)
def test_skipped_and_unannotated_tasks(anns: list, skipped: bool) -> None:
    v = judge_task(task(anns), CLASSES, USERS)
    assert v.label is None and v.rejected is None and v.skipped is skipped


def test_several_annotators_keep_their_boxes_and_agreement() -> None:
    v = judge_task(
        task(
            [
                ann(1, [rect(10, 10, 20, 20)], "2026-01-01T00:00:00Z", by=1),
                ann(2, [rect(10, 10, 20, 20)], "2026-01-02T00:00:00Z", by=2),
                ann(3, [], "2026-01-03T00:00:00Z", by=3),
                ann(4, [], "2026-01-01T12:00:00Z", by={"email": "dee@x", "id": 9}),  # type: ignore[arg-type]
            ]
        ),
        CLASSES,
        USERS,
    )
    label = v.label
    assert label is not None and label.annotation_id == 3 and label.annotator == "cy@x"
    assert label.annotators == ("ann@x", "dee@x", "bob@x", "cy@x")  # by recency of their latest
    assert sorted(label.per_annotator) == ["ann@x", "bob@x", "cy@x", "dee@x"]
    # ann-bob agree (1), the two empty ones agree (1), the other four pairs do not (0).
    assert label.agreement == pytest.approx(2 / 6)


def test_the_prediction_the_labeler_saw_comes_back_with_scores() -> None:
    pred = {"model_version": "round-3", "result": [{**rect(10, 10, 20, 20), "score": 0.8}]}
    v = judge_task(task([ann(1, [rect(10, 10, 20, 20)], prediction=pred)]), CLASSES, USERS)
    label = v.label
    assert label is not None and label.prediction_model_version == "round-3"
    assert label.prediction is not None and label.prediction.confidence.tolist() == [0.8]
    assert label.lead_time == 4.5 and label.updated_at is not None
