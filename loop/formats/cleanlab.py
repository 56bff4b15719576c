"""`Detections` <-> the input formats of cleanlab's object-detection functions
(`cleanlab.object_detection.rank.get_label_quality_scores`, ``filter.find_label_issues``).

cleanlab takes, for each image (both in pixel ``[x1, y1, x2, y2]``, top-left origin, like
`Detections`):

- a **label**: ``{"bboxes": (L, 4) float, "labels": (L,) int, "image_name": str}``;
- a **prediction**: a list of ``num_classes`` arrays, ``prediction[k]`` of shape ``(M_k, 5)``
  with rows ``[x1, y1, x2, y2, pred_prob]``: the boxes the model predicted as class ``k`` and its
  confidence in that class (MMDetection's per-class layout).

Each predicted box goes under its own ``class_id`` with its ``confidence``; within a class the
boxes keep their order in the `Detections`. Pure functions, no cleanlab import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError


def _check_ids(det: Detections, num_classes: int, what: str) -> None:
    if num_classes < 1:
        raise ConversionError(f"num_classes must be >= 1, got {num_classes}")
    if len(det) and int(det.class_id.max()) >= num_classes:
        raise UnknownLabelError(
            f"{what} has class id {int(det.class_id.max())} but the project has "
            f"{num_classes} classes; use the project's class list"
        )


def detections_to_cleanlab_labels(
    det: Detections, num_classes: int, image_name: str
) -> dict[str, Any]:
    """Ground truth of one image -> cleanlab's label dict.

    ``bboxes`` ``(L, 4)`` float64 pixel xyxy, ``labels`` ``(L,)`` int64, ``image_name`` (the
    image's sha256 in defect-loop). Raises `UnknownLabelError` for a class id outside
    ``[0, num_classes)``.
    """
    _check_ids(det, num_classes, f"label of image {image_name}")
    return {
        "bboxes": np.array(det.xyxy, dtype=np.float64).reshape(-1, 4),
        "labels": np.array(det.class_id, dtype=np.int64).reshape(-1),
        "image_name": str(image_name),
    }


def cleanlab_labels_to_detections(
    label: Mapping[str, Any], image_wh: tuple[int, int]
) -> Detections:
    """cleanlab's label dict -> ground-truth `Detections` (no confidences) of size ``image_wh``.

    Raises `ConversionError` when ``bboxes`` or ``labels`` is missing or malformed.
    """
    try:
        boxes = np.asarray(label["bboxes"], dtype=np.float64).reshape(-1, 4)
        ids = np.asarray(label["labels"]).reshape(-1)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(
            f"a cleanlab label needs 'bboxes' (L, 4) and 'labels' (L,): {e}"
        ) from e
    return Detections(boxes, ids, image_wh, meta={"image_name": str(label.get("image_name", ""))})


def detections_to_cleanlab_predictions(det: Detections, num_classes: int) -> list[np.ndarray]:
    """Model predictions of one image -> ``num_classes`` arrays of ``[x1, y1, x2, y2, prob]``.

    ``prediction[k]`` is ``(M_k, 5)`` float64: the boxes with ``class_id == k``, in their order,
    and their ``confidence``; a class without boxes gets a ``(0, 5)`` array. Raises
    `ConversionError` when ``det`` has no confidences (ground truth is not a prediction) and
    `UnknownLabelError` for a class id outside ``[0, num_classes)``.
    """
    if det.confidence is None:
        raise ConversionError(
            "predictions need confidences: pass the model's Detections, not ground truth"
        )
    _check_ids(det, num_classes, "prediction")
    rows = np.concatenate([det.xyxy, det.confidence[:, None]], axis=1).reshape(-1, 5)
    return [rows[det.class_id == k].astype(np.float64) for k in range(num_classes)]


def cleanlab_predictions_to_detections(
    prediction: Sequence[np.ndarray], image_wh: tuple[int, int]
) -> Detections:
    """cleanlab's per-class arrays -> `Detections` with ``confidence`` (no ``class_probs``),
    boxes ordered by class, then by their row within the class. Raises `ConversionError` for an
    array that is not ``(M, 5)``."""
    boxes: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for k, arr in enumerate(prediction):
        a = np.asarray(arr, dtype=np.float64)
        if a.size == 0:
            continue
        if a.ndim != 2 or a.shape[1] != 5:
            raise ConversionError(
                f"prediction for class {k} must have shape (M, 5) [x1, y1, x2, y2, prob], "
                f"got {a.shape}"
            )
        boxes.append(a)
        ids.append(np.full(len(a), k, dtype=np.int64))
    if not boxes:
        return Detections(np.zeros((0, 4)), np.zeros(0, np.int64), image_wh, confidence=np.zeros(0))
    rows = np.concatenate(boxes)
    return Detections(rows[:, :4], np.concatenate(ids), image_wh, confidence=rows[:, 4])
