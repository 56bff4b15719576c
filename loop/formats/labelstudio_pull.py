"""The rules that turn one task of Label Studio's JSON export into a label (pure).

`judge_task`: among a task's non-cancelled annotations, one marked ground_truth wins, else the
most recently updated; no regions is a defect-free image (sized by the task data), with or
without the ``defect-free`` choice; a task whose annotations were all cancelled was skipped by the
labeler (not a negative); several annotators' latest annotations are kept with their agreement;
anything malformed rejects that one task with the reason. The regions themselves are read by
`loop.formats.labelstudio` (rectangles) and `loop.formats.labelstudio_regions` (polygons, brush
masks, keypoints).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loop.annotation_log import AnnotationRecord
from loop.corrections import mean_pairwise_f1
from loop.detections import Detections
from loop.errors import (
    ConversionError,
    InvalidDetectionsError,
    TaskRejectedError,
    UnknownLabelError,
)
from loop.formats.labelstudio import (
    BRUSH,
    DEFECT_FREE,
    KEYPOINT,
    POLYGON,
    RECTANGLE,
    VERDICT_NAME,
    BrushDecoder,
    annotation_order,
    check_annotation,
    check_image_url,
    ls_results_to_detections,
    parse_time,
    task_key,
    task_size,
    whole_number,
)
from loop.formats.labelstudio_regions import (
    ls_results_to_instances,
    ls_results_to_keypoints,
    region_results,
)
from loop.keypoints import (
    InstanceKeypoints,
    KeypointNames,
)
from loop.labeling import PulledLabel
from loop.polygons import Rings

# --- the pull rules ------------------------------------------------------------------------
# Errors a malformed task can raise on its way through the converters. The named ones carry a
# message of their own; the others are a last line of defence (a field of an unexpected type
# that no check foresaw) and still become a rejection of that one task.
_TASK_ERRORS = (UnknownLabelError, ConversionError, InvalidDetectionsError)

_MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


@dataclass(frozen=True)
class TaskVerdict:
    """What a pull makes of one exported task: a usable ``label``, a ``rejected`` task (with the
    reason; ``__cause__`` holds the named error), ``skipped`` (every annotation was cancelled:
    the labeler skipped it, it is not a negative), or none of these (no annotation at all)."""

    task_id: int
    label: PulledLabel | None = None
    rejected: TaskRejectedError | None = None
    skipped: bool = False


def judge_task(
    task: dict[str, Any],
    class_names: list[str],
    users: Mapping[int, str],
    document_root: Path | None = None,
    max_regions: int | None = None,
    *,
    polygons: bool = False,
    keypoints: KeypointNames | None = None,
    brush: BrushDecoder | None = None,
) -> TaskVerdict:
    """The verdict on one task of Label Studio's JSON export (see the module docstring).

    ``users``: user id -> e-mail (names the annotators). ``document_root``: refuse image paths
    that resolve outside it. Rejected: an unknown label, a rotated box, coordinates outside
    0-100 %, a zero-area box, more than ``max_regions`` regions, an image path escaping the
    document root, defect-free with regions, a missing size or sha256, or any field of any
    annotation malformed. With ``polygons`` (``segment`` projects) a polygon region is kept as
    a polygon instance (`ls_results_to_instances`), and a polygon that crosses itself also
    rejects the task; with ``brush`` too (the gateway's `BrushDecoder`) a brush region is kept
    as a polygon instance, and an empty or undecodable one rejects the task. ``keypoints`` (the
    config's names per class): keypoint regions are kept per instance
    (`ls_results_to_keypoints`); an unknown keypoint label, one outside the image or one without
    a region of its class rejects the task. Never raises for bad input.
    """
    task_id = task_key(task)
    try:
        anns = task.get("annotations") or []
        if not isinstance(anns, list):
            raise ConversionError("task annotations are not a list")
        for a in anns:
            check_annotation(a)
        if not isinstance(task.get("data") or {}, dict):
            raise ConversionError("task data is not an object")
        live = [a for a in anns if not a.get("was_cancelled")]
        if not live:
            return TaskVerdict(task_id, skipped=bool(anns))
        check_image_url((task.get("data") or {}).get("image"), document_root)
        label = _to_label(
            task, live, class_names, users, max_regions, polygons, keypoints=keypoints, brush=brush
        )
        return TaskVerdict(task_id, label=label)
    except _TASK_ERRORS as exc:
        rejected = TaskRejectedError(task_id, f"{type(exc).__name__}: {exc}")
        rejected.__cause__ = exc
        return TaskVerdict(task_id, rejected=rejected)
    except _MALFORMED as exc:
        rejected = TaskRejectedError(
            task_id,
            f"malformed annotation data ({type(exc).__name__}: {exc}); fix or delete the "
            "annotation in Label Studio",
        )
        rejected.__cause__ = exc
        return TaskVerdict(task_id, rejected=rejected)


def _annotator(ann: dict[str, Any], users: Mapping[int, str]) -> str:
    completed_by = ann.get("completed_by")
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id"))
    uid = whole_number(completed_by)
    if uid is not None:
        return users.get(uid, str(uid))
    return "unknown" if completed_by is None else str(completed_by)


def _annotation_labels(
    ann: dict[str, Any],
    class_names: list[str],
    data_wh: tuple[int, int] | None,
    max_regions: int | None = None,
    polygons: bool = False,
    keypoints: KeypointNames | None = None,
    brush: BrushDecoder | None = None,
) -> tuple[Detections, tuple[Rings, ...], tuple[InstanceKeypoints, ...]]:
    """One annotation's boxes, with ``polygons`` their rings (brush regions too with
    ``brush``; else ``()``) and with ``keypoints`` their keypoints (else ``()``)."""
    raw = ann.get("result") or []
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConversionError(f"annotation {ann.get('id')}: result must be a list of objects")
    n_regions = sum(1 for r in raw if r.get("type") in (RECTANGLE, POLYGON, BRUSH, KEYPOINT))
    if max_regions is not None and n_regions > max_regions:
        raise ConversionError(
            f"annotation {ann.get('id')} has {n_regions} regions, more than "
            f"labelstudio.max_regions ({max_regions}); split the image or raise the limit"
        )
    results = region_results(raw)
    if polygons and brush is not None:
        brushes = [r for r in raw if r.get("type") == BRUSH]
        for r in brushes:
            # Checked before decoding: the decoder allocates the whole image the region claims.
            if data_wh is None:
                raise ConversionError(
                    f"brush {r.get('id')!r}: the task data has no width/height to decode it "
                    "against; push the image again through defect-loop"
                )
            claimed = (r.get("original_width", data_wh[0]), r.get("original_height", data_wh[1]))
            if claimed != data_wh:
                raise ConversionError(
                    f"brush {r.get('id')!r} was painted on a {claimed[0]}x{claimed[1]} image but "
                    f"the task's image is {data_wh[0]}x{data_wh[1]} px; repaint it"
                )
        results += brushes
    points = [r for r in raw if r.get("type") == KEYPOINT] if keypoints else []
    defect_free = _marked_defect_free(raw)  # also validates the verdict choice
    if (results or points) and defect_free:
        raise ConversionError(
            f"annotation {ann.get('id')} is marked {DEFECT_FREE!r} but has "
            f"{len(results) + len(points)} regions; remove the regions or untick the choice in "
            "Label Studio"
        )
    if data_wh is None and not results:
        raise ConversionError(
            "image size unknown: the annotation has no regions and the task data no "
            "width/height; push the image again through defect-loop"
        )
    sized = any("original_width" in r or "original_height" in r for r in results)
    wh = None if sized else data_wh
    rings: tuple[Rings, ...] = ()
    if polygons:
        det, rings = ls_results_to_instances(raw, class_names, image_wh=wh, brush=brush)
    else:
        det = ls_results_to_detections(results, class_names, image_wh=wh)
    if data_wh is not None and det.image_wh != data_wh:
        w, h = det.image_wh
        raise ConversionError(
            f"annotation was drawn on a {w}x{h} image but the task's image is "
            f"{data_wh[0]}x{data_wh[1]} px; re-annotate the task"
        )
    kps: tuple[InstanceKeypoints, ...] = ()
    if points and keypoints:
        kps = ls_results_to_keypoints(
            raw, det, rings, class_names, keypoints, brush=polygons and brush is not None
        )
    return det, rings, kps


def _to_label(
    task: dict[str, Any],
    live: list[dict[str, Any]],
    class_names: list[str],
    users: Mapping[int, str],
    max_regions: int | None = None,
    polygons: bool = False,
    *,
    keypoints: KeypointNames | None = None,
    brush: BrushDecoder | None = None,
) -> PulledLabel:
    task_id = task_key(task)
    data = task.get("data") or {}
    sha = data.get("sha256")
    if not sha:
        raise ConversionError(
            "task data has no sha256: it was not created by defect-loop push; delete it or "
            "import images through defect-loop"
        )
    if not isinstance(sha, str) or len(sha) > 128:
        raise ConversionError(f"task data sha256 is not a digest: {str(sha)[:80]!r}")
    data_wh = task_size(data)
    ann = max(live, key=annotation_order)
    det, rings, kps = _annotation_labels(
        ann, class_names, data_wh, max_regions, polygons, keypoints, brush
    )

    # Every annotator's latest annotation is kept (annotation log, consensus) and, with
    # several, their agreement is measured.
    # Per annotator: their ground-truth annotation, else their most recent one (as for the task).
    latest: dict[str, dict[str, Any]] = {}
    for a in sorted(live, key=annotation_order):
        latest[_annotator(a, users)] = a
    per_annotator: dict[str, Detections] = {}
    unusable: dict[str, str] = {}
    records: list[AnnotationRecord] = []
    for name, a in latest.items():
        if a is ann:
            boxes, a_rings, a_kps = det, rings, kps
        else:
            # Only the chosen annotation makes the label: another annotator's unusable
            # annotation just leaves the agreement (and the log) without it, with the reason.
            try:
                boxes, a_rings, a_kps = _annotation_labels(
                    a, class_names, data_wh or det.image_wh, max_regions, polygons, keypoints, brush
                )
            except (*_TASK_ERRORS, *_MALFORMED) as exc:
                unusable[name] = f"annotation {a.get('id')}: {type(exc).__name__}: {exc}"
                continue
        per_annotator[name] = boxes
        a_lead = a.get("lead_time")
        records.append(
            AnnotationRecord(
                annotator=name,
                annotation_id=int(whole_number(a["id"]) or 0),
                boxes=boxes,
                lead_time=float(a_lead) if a_lead is not None else None,
                updated_at=parse_time(a.get("updated_at") or a.get("created_at")),
                ground_truth=bool(a.get("ground_truth")),
                polygons=a_rings,
                keypoints=a_kps,
            )
        )
    agreement: float | None = None
    if len(latest) > 1:
        agreement = mean_pairwise_f1(list(per_annotator.values()))
    else:
        per_annotator = {}

    pred_det: Detections | None = None
    pred_rings: tuple[Rings, ...] = ()
    pred_mv: str | None = None
    pred = ann.get("prediction")
    if isinstance(pred, dict) and isinstance(pred.get("result"), list):
        mv = pred.get("model_version")
        pred_mv = mv if isinstance(mv, str) else None
        pred_det, pred_rings = _prediction_instances(
            pred["result"], class_names, data_wh or det.image_wh, polygons
        )

    lead = ann.get("lead_time")
    return PulledLabel(
        task_id=task_id,
        sha256=str(sha),
        detections=det,
        annotation_id=int(whole_number(ann["id"]) or 0),
        annotator=_annotator(ann, users),
        lead_time=float(lead) if lead is not None else None,
        updated_at=parse_time(ann.get("updated_at") or ann.get("created_at")),
        ground_truth=bool(ann.get("ground_truth")),
        prediction=pred_det,
        prediction_model_version=pred_mv,
        prediction_polygons=pred_rings,
        annotators=tuple(latest),
        agreement=agreement,
        per_annotator=per_annotator,
        image_url=data.get("image") if isinstance(data.get("image"), str) else None,
        polygons=rings,
        keypoints=kps,
        annotations=tuple(records),
        unusable=unusable,
    )


def _marked_defect_free(results: Iterable[dict[str, Any]]) -> bool:
    for r in results:
        if r.get("type") != "choices" or r.get("from_name") != VERDICT_NAME:
            continue
        value = r.get("value")
        choices = value.get("choices") if isinstance(value, dict) else value
        if not isinstance(value, dict) or not isinstance(choices, list | None):
            raise ConversionError(
                f"choice {r.get('id')!r}: value must be an object with a list of choices, "
                f"got {value!r}"[:300]
            )
        if DEFECT_FREE in (choices or []):
            return True
    return False


def _prediction_detections(
    results: Iterable[dict[str, Any]], class_names: list[str], wh: tuple[int, int]
) -> Detections | None:
    """Prediction regions -> `Detections` with confidences from region scores (None if unusable)."""
    rects = [r for r in results if isinstance(r, dict) and r.get("type") == RECTANGLE]
    try:
        det = ls_results_to_detections(rects, class_names, image_wh=wh)
    except (*_TASK_ERRORS, *_MALFORMED):
        return None
    scores = [r.get("score") for r in rects]
    ok = all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
    if rects and ok and np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        conf = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        return Detections(det.xyxy, det.class_id, det.image_wh, confidence=conf)
    return det


def _prediction_instances(
    results: Iterable[dict[str, Any]],
    class_names: list[str],
    wh: tuple[int, int],
    polygons: bool,
) -> tuple[Detections | None, tuple[Rings, ...]]:
    """Prediction regions -> `Detections` (confidences from region scores) and, with
    ``polygons`` (``segment`` projects), one `Rings` per region parallel to it (a polygon
    region's ring in pixels, ``()`` for a rectangle; ``()`` overall without any polygon).
    Without ``polygons`` it is `_prediction_detections` (rectangles only). ``(None, ())`` when
    the prediction is unusable."""
    if not polygons:
        return _prediction_detections(results, class_names, wh), ()
    regions = [r for r in results if isinstance(r, dict) and r.get("type") in (RECTANGLE, POLYGON)]
    try:
        det, rings = ls_results_to_instances(regions, class_names, image_wh=wh)
    except (*_TASK_ERRORS, *_MALFORMED):
        return None, ()
    scores = [r.get("score") for r in regions]
    ok = all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
    if regions and ok and np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        conf = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        det = Detections(det.xyxy, det.class_id, det.image_wh, confidence=conf)
    return det, rings
