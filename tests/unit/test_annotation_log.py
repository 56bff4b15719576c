"""The annotation log keeps every annotator's work: round trip, torn lines, unknown classes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from loop.annotation_log import (
    AnnotationRecord,
    TaskOutcome,
    append_outcomes,
    latest_per_task,
    read_outcomes,
)
from loop.detections import Detections
from loop.errors import DatasetError, UnknownLabelError

CLASSES = ["scratch", "pit"]
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _det(rows: list[list[float]]) -> Detections:
    arr = np.asarray(rows, dtype=float).reshape(-1, 5)
    return Detections(arr[:, 1:], arr[:, 0].astype(int), (200, 100))


def _outcome(task_id: int, status: str, minutes: int = 0) -> TaskOutcome:
    a = AnnotationRecord("a@x", 11, _det([[0, 1.25, 2, 30, 40]]), 3.5, T0, False)
    b = AnnotationRecord("b@x", 12, _det([[1, 1, 2, 30.5, 40], [0, 50, 50, 60, 70]]), None, None)
    ref = None if status == "review" else _det([[0, 1.1, 2, 30.2, 40]])
    return TaskOutcome(
        task_id,
        "ab" * 32,
        T0 + timedelta(minutes=minutes),
        status,  # type: ignore[arg-type]
        (a, b),
        ref,
        None if ref is None else "d1",
        0.5,
    )


@pytest.mark.parametrize("status", ["single", "ground_truth", "merged", "review"])
def test_round_trip_keeps_every_annotation(tmp_path: Path, status: str) -> None:
    log = tmp_path / "annotation-log.jsonl"
    assert append_outcomes(log, [_outcome(7, status)], CLASSES) == 1
    (back,) = read_outcomes(log, CLASSES)
    want = _outcome(7, status)
    assert back.status == status and back.task_id == 7 and back.version == want.version
    assert [a.annotator for a in back.annotations] == ["a@x", "b@x"]
    for got, exp in zip(back.annotations, want.annotations, strict=True):
        assert got.boxes.same_boxes(exp.boxes, atol=1e-3)
        assert got.lead_time == exp.lead_time and got.updated_at == exp.updated_at
    assert (back.reference is None) == (status == "review")


def test_torn_last_line_is_ignored_but_a_bad_middle_line_is_an_error(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_outcomes(log, [_outcome(1, "single"), _outcome(2, "merged")], CLASSES)
    with log.open("a") as fh:
        fh.write('{"task_id": 3, "sha')
    assert [o.task_id for o in read_outcomes(log, CLASSES)] == [1, 2]
    log.write_text("not json\n" + log.read_text())
    with pytest.raises(DatasetError, match=":1 is not JSON"):
        read_outcomes(log, CLASSES)


def test_unknown_class_in_the_log_is_an_error(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_outcomes(log, [_outcome(1, "single")], CLASSES)
    with pytest.raises(UnknownLabelError, match="'pit'"):
        read_outcomes(log, ["scratch"])


def test_latest_per_task_keeps_the_newest_pull() -> None:
    outs = [_outcome(1, "review", 0), _outcome(1, "ground_truth", 5), _outcome(2, "single", 1)]
    latest = latest_per_task(outs)
    assert latest[1].status == "ground_truth" and latest[2].status == "single"


def test_review_outcome_must_not_carry_a_reference() -> None:
    good = _outcome(1, "single")
    with pytest.raises(DatasetError, match="must not carry"):
        TaskOutcome(1, "x", T0, "review", good.annotations, good.reference)
    with pytest.raises(DatasetError, match="needs"):
        TaskOutcome(1, "x", T0, "merged", good.annotations, None)
