"""What a label review task holds in Label Studio (pure: values in, JSON-ready dicts out).

A review task shows one labeled image that the label error finder (`loop.label_errors`) ranks as
suspect, with two things side by side:

- its **current label** as an annotation (`labels_to_ls_results`): the reviewer edits it (and
  clicks Update) rather than drawing from scratch; a task that already holds a labeler's
  annotation keeps it, an image without one (imported labels) gets a "seed" annotation;
- the out-of-sample **model boxes** that disagree with it, as a prediction of model version
  `REVIEW_MODEL_VERSION` (its own tab in the labeling editor: the Data Manager's task view
  lists every prediction of a task, whatever the project's model version).

The task data carries the suspect's scores in flat ``review_*`` fields (`review_fields`), which
the saved Data Manager view `REVIEW_VIEW_TITLE` filters on (`review_view`) and sorts by rank.
Coordinates: pixel boxes and rings in, Label Studio percent out (`loop.formats.labelstudio`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.labelstudio import (
    POLYGON,
    POLYGON_NAME,
    detections_to_ls_results,
    region_result,
    without_scores,
)
from loop.formats.labelstudio_regions import ring_to_ls_points
from loop.polygons import Rings

REVIEW_MODEL_VERSION = "review:crossfit"
REVIEW_VIEW_TITLE = "Label review"
# Task data fields of a review task (all flat, so the Data Manager can filter and sort on them).
REVIEW_FIELDS = ("review_rank", "review_quality", "review_issue", "review_version")


def labels_to_ls_results(
    labels: Detections, polygons: Sequence[Rings], class_names: list[str]
) -> list[dict[str, Any]]:
    """An image's current label -> the ``result`` of an annotation showing it.

    ``labels``: pixel xyxy boxes (confidences ignored). ``polygons``: ``()`` (boxes only) or one
    `Rings` per box: an instance with one ring becomes a ``polygonlabels`` region, one with
    ``()`` a rectangle. Zero boxes give ``[]`` (a defect-free image). Raises `ConversionError`
    for an instance of several rings (a polygon with holes or parts: a Label Studio polygon is
    one outline) and `UnknownLabelError` for a class id without a name.
    """
    rects = detections_to_ls_results(without_scores(labels), class_names)
    if not polygons:
        return rects
    if len(polygons) != len(labels):
        raise ConversionError(
            f"{len(labels)} boxes but {len(polygons)} polygon instances; give one per box"
        )
    w, h = labels.image_wh
    out: list[dict[str, Any]] = []
    for i, (rect, rings) in enumerate(zip(rects, polygons, strict=True)):
        if not rings:
            out.append(rect)
            continue
        if len(rings) != 1:
            raise ConversionError(
                f"instance {i} has {len(rings)} rings (holes or parts); a Label Studio polygon "
                "is one outline, so this label cannot be shown for review"
            )
        cls = int(labels.class_id[i])
        if not 0 <= cls < len(class_names):
            raise UnknownLabelError(f"class id {cls} has no name in {class_names}")
        value = {
            "points": ring_to_ls_points(rings[0], (w, h)),
            "closed": True,
            POLYGON: [class_names[cls]],
        }
        out.append(region_result(f"{rect['id']}p", POLYGON, value, (w, h), POLYGON_NAME))
    return out


def review_fields(rank: int, quality: float, issue: str, version: str) -> dict[str, Any]:
    """The ``review_*`` task data of a suspect: its ``rank`` (1 = most suspect), cleanlab's label
    ``quality`` in [0, 1] (low = likely wrong), the likeliest ``issue`` (overlooked, swap,
    badloc) and the dataset ``version`` digest it was found in."""
    if rank < 1:
        raise ConversionError(f"rank must be >= 1, got {rank}")
    return {
        "review_rank": int(rank),
        "review_quality": round(float(quality), 6),
        "review_issue": str(issue),
        "review_version": str(version),
    }


def review_prediction(
    task_id: int, model_boxes: Detections, quality: float, class_names: list[str]
) -> dict[str, Any]:
    """The model's boxes for task ``task_id`` as a Label Studio prediction of
    `REVIEW_MODEL_VERSION` (region scores are the boxes' confidences; the prediction's score is
    the label quality, so the most suspect sorts first)."""
    return {
        "task": int(task_id),
        "model_version": REVIEW_MODEL_VERSION,
        "score": float(quality),
        "result": detections_to_ls_results(model_boxes, class_names),
    }


def review_view() -> dict[str, Any]:
    """The Data Manager view's ``data``: review tasks only (``review_rank`` set), most suspect
    first."""
    return {
        "title": REVIEW_VIEW_TITLE,
        "ordering": ["tasks:data.review_rank"],
        "filters": {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:data.review_rank",
                    "operator": "empty",
                    "type": "Number",
                    "value": False,
                }
            ],
        },
    }
