"""Every annotator's raw work, kept: an append-only JSON-lines log of pulled tasks.

A pull decides one outcome per Label Studio task (`TaskOutcome`): a single annotator's label,
a lead's ``ground_truth`` annotation, the merge of agreeing annotators (consensus), or a trip to
the review queue when they disagree. Whatever it decides, every annotator's latest submitted
annotation of the task is recorded here with it, so nothing a labeler did is lost, and the
per-annotator quality figures (`loop.annotator_quality`) can be computed later against the
reference the task ended with.

File: ``<workspace>/annotation-log.jsonl`` (`Workspace.annotation_log`), one JSON object per
line, appended by each pull (a task pulled again gets a newer line; `latest_per_task` keeps the
newest). Boxes are stored as ``[class name, x1, y1, x2, y2]`` in pixels, so the log is readable
without the class list; reading maps names through the project's fixed class list and an
unknown name raises `UnknownLabelError`. Times are ISO 8601 with a timezone.

An annotation's polygons and keypoints (``segment`` projects, ``keypoints:`` in the config) are
kept too, losslessly, under two optional keys of each annotation, present only when it has
some: ``polygons``, one entry per box (its rings as ``[[x, y], ...]`` pixel lists, ``[]`` for a
rectangle), and ``keypoints``, one entry per box (``[[name, x, y, visibility], ...]`` pixels,
``[]`` for an instance without keypoints). Lines written before these keys existed read as
boxes only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from loop.detections import Detections
from loop.errors import ConversionError, DatasetError, UnknownLabelError
from loop.keypoints import InstanceKeypoints, Keypoint, check_instance_keypoints
from loop.polygons import Rings, as_ring

OutcomeStatus = Literal["single", "ground_truth", "merged", "review"]
"""How a pull turned a task's annotations into a label: ``single`` one annotator;
``ground_truth`` a lead's annotation marked ground truth won; ``merged`` several annotators
agreed and their boxes were merged; ``review`` they disagreed and the task waits in the review
queue (its image gets no new label)."""
STATUSES: tuple[str, ...] = get_args(OutcomeStatus)


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotator's latest submitted annotation of a task: pixel xyxy boxes, no scores.

    ``polygons``: empty, or one `loop.polygons.Rings` per box (pixels; ``()`` for a rectangle);
    ``keypoints``: empty, or one `loop.keypoints.InstanceKeypoints` per box (pixels).
    """

    annotator: str
    annotation_id: int
    boxes: Detections
    lead_time: float | None = None
    updated_at: datetime | None = None
    ground_truth: bool = False
    polygons: tuple[Rings, ...] = ()
    keypoints: tuple[InstanceKeypoints, ...] = ()

    def __post_init__(self) -> None:
        for what, items in (("polygons", self.polygons), ("keypoints", self.keypoints)):
            if items and len(items) != len(self.boxes):
                raise DatasetError(
                    f"annotation {self.annotation_id}: {len(self.boxes)} boxes but "
                    f"{len(items)} entries of {what}"
                )


@dataclass(frozen=True)
class TaskOutcome:
    """What one pull made of one task (see the module docstring).

    ``reference``: the boxes that went into the dataset version (None for ``review``);
    ``version``: that version's digest (None for ``review``, or when the pull made no new
    version); ``agreement``: mean pairwise F1 between the annotators (None with one);
    ``annotations``: every annotator's latest submitted annotation.
    """

    task_id: int
    sha256: str
    pulled_at: datetime
    status: OutcomeStatus
    annotations: tuple[AnnotationRecord, ...]
    reference: Detections | None = None
    version: str | None = None
    agreement: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise DatasetError(f"unknown task outcome {self.status!r}; expected one of {STATUSES}")
        if (self.reference is None) != (self.status == "review"):
            raise DatasetError(
                f"task {self.task_id}: a {self.status!r} outcome "
                + ("must not carry" if self.status == "review" else "needs")
                + " a reference label"
            )


def _boxes_to_json(det: Detections, class_names: Sequence[str]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for box, cid in zip(det.xyxy, det.class_id, strict=True):
        if not 0 <= int(cid) < len(class_names):
            raise UnknownLabelError(f"class id {int(cid)} is not in the class list {class_names}")
        out.append([class_names[int(cid)], *(round(float(v), 3) for v in box)])
    return out


def _boxes_from_json(
    rows: Any, image_wh: tuple[int, int], class_names: Sequence[str]
) -> Detections:
    index = {name: i for i, name in enumerate(class_names)}
    xyxy, ids = [], []
    for row in rows:
        name = row[0]
        if name not in index:
            raise UnknownLabelError(
                f"annotation log names class {name!r}, which is not in the class list "
                f"{list(class_names)}; restore the class in the config"
            )
        ids.append(index[name])
        xyxy.append([float(v) for v in row[1:5]])
    return Detections(np.asarray(xyxy, dtype=np.float64).reshape(-1, 4), np.asarray(ids), image_wh)


def _polygons_to_json(polygons: Sequence[Rings]) -> list[list[list[list[float]]]]:
    return [[[[float(x), float(y)] for x, y in ring] for ring in rings] for rings in polygons]


def _polygons_from_json(rows: Any) -> tuple[Rings, ...]:
    try:
        return tuple(tuple(as_ring(ring) for ring in rings) for rings in rows)
    except ConversionError as exc:
        raise ValueError(str(exc)) from exc


def _keypoints_to_json(keypoints: Sequence[InstanceKeypoints]) -> list[list[list[Any]]]:
    return [
        [[k.name, float(k.x), float(k.y), int(k.visibility)] for k in inst] for inst in keypoints
    ]


def _keypoints_from_json(rows: Any, image_wh: tuple[int, int]) -> tuple[InstanceKeypoints, ...]:
    try:
        return tuple(
            check_instance_keypoints(
                (Keypoint(str(k[0]), float(k[1]), float(k[2]), int(k[3])) for k in inst), image_wh
            )
            for inst in rows
        )
    except ConversionError as exc:
        raise ValueError(str(exc)) from exc


def _annotation_to_json(a: AnnotationRecord, class_names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "annotator": a.annotator,
        "annotation_id": int(a.annotation_id),
        "boxes": _boxes_to_json(a.boxes, class_names),
        "lead_time": a.lead_time,
        "updated_at": _time(a.updated_at),
        "ground_truth": a.ground_truth,
    }
    # Only when present: a boxes-only annotation's line is what it was before these keys.
    if a.polygons:
        out["polygons"] = _polygons_to_json(a.polygons)
    if a.keypoints:
        out["keypoints"] = _keypoints_to_json(a.keypoints)
    return out


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def outcome_to_json(outcome: TaskOutcome, class_names: Sequence[str]) -> dict[str, Any]:
    """A JSON-ready dict of one outcome (boxes by class name, pixels)."""
    wh = (
        outcome.reference.image_wh
        if outcome.reference is not None
        else (outcome.annotations[0].boxes.image_wh if outcome.annotations else (0, 0))
    )
    return {
        "task_id": int(outcome.task_id),
        "sha256": outcome.sha256,
        "pulled_at": outcome.pulled_at.isoformat(),
        "status": outcome.status,
        "image_wh": [int(wh[0]), int(wh[1])],
        "version": outcome.version,
        "agreement": outcome.agreement,
        "reference": None
        if outcome.reference is None
        else _boxes_to_json(outcome.reference, class_names),
        "annotations": [_annotation_to_json(a, class_names) for a in outcome.annotations],
    }


def json_to_outcome(data: dict[str, Any], class_names: Sequence[str]) -> TaskOutcome:
    """The inverse of `outcome_to_json`; raises `DatasetError` for a malformed record and
    `UnknownLabelError` for a class name not in ``class_names``."""
    try:
        wh = (int(data["image_wh"][0]), int(data["image_wh"][1]))
        ref = data.get("reference")
        return TaskOutcome(
            task_id=int(data["task_id"]),
            sha256=str(data["sha256"]),
            pulled_at=datetime.fromisoformat(str(data["pulled_at"])),
            status=data["status"],
            version=data.get("version"),
            agreement=None if data.get("agreement") is None else float(data["agreement"]),
            reference=None if ref is None else _boxes_from_json(ref, wh, class_names),
            annotations=tuple(
                AnnotationRecord(
                    annotator=str(a["annotator"]),
                    annotation_id=int(a["annotation_id"]),
                    boxes=_boxes_from_json(a["boxes"], wh, class_names),
                    lead_time=None if a.get("lead_time") is None else float(a["lead_time"]),
                    updated_at=_parse_time(a.get("updated_at")),
                    ground_truth=bool(a.get("ground_truth", False)),
                    polygons=_polygons_from_json(a.get("polygons") or ()),
                    keypoints=_keypoints_from_json(a.get("keypoints") or (), wh),
                )
                for a in data["annotations"]
            ),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, UnknownLabelError):
            raise
        raise DatasetError(f"malformed annotation log record: {type(exc).__name__}: {exc}") from exc


def append_outcomes(path: Path, outcomes: Iterable[TaskOutcome], class_names: Sequence[str]) -> int:
    """Append ``outcomes`` to the log at ``path`` (created if missing), flushed and fsynced so a
    crash after a pull never loses an annotator's work. Returns how many lines were written."""
    lines = [json.dumps(outcome_to_json(o, class_names), sort_keys=True) for o in outcomes]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return len(lines)


def read_outcomes(path: Path, class_names: Sequence[str]) -> list[TaskOutcome]:
    """Every record of the log in file order ([] when there is no log yet). A torn last line
    (a crash mid-append) is ignored; a malformed line elsewhere raises `DatasetError` with its
    line number."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    raw = text.split("\n")
    out: list[TaskOutcome] = []
    for i, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            if i == len(raw) and not text.endswith("\n"):
                break  # torn final append
            raise DatasetError(f"{path}:{i} is not JSON ({exc}); restore it from a backup") from exc
        try:
            out.append(json_to_outcome(data, class_names))
        except DatasetError as exc:
            raise DatasetError(f"{path}:{i}: {exc}") from exc
    return out


def latest_per_task(outcomes: Iterable[TaskOutcome]) -> dict[int, TaskOutcome]:
    """Task id -> its newest outcome (by ``pulled_at``, file order breaking ties)."""
    latest: dict[int, TaskOutcome] = {}
    for o in outcomes:
        prev = latest.get(o.task_id)
        if prev is None or o.pulled_at >= prev.pulled_at:
            latest[o.task_id] = o
    return latest
