"""Model-assisted label error finding: rank labeled images by how likely their labels are wrong.

The scores are cleanlab's (ObjectLab, `cleanlab.object_detection`), computed from each image's
labels and **out-of-sample** predictions: boxes from a model that did not train on that image
(a cross-fitted fold model, see `loop.crossfit`, or a model of an earlier round). In-sample
predictions agree with the labels they were fit to, errors included, and hide them.

Per image (`LabelSuspect`):

- ``quality``: `cleanlab.object_detection.rank.get_label_quality_scores`, in ``[0, 1]``; low
  means the labels are likely wrong. Suspects are ranked by it, lowest first.
- ``overlooked``, ``swap``, ``badloc``: cleanlab's per-subtype image scores (``compute_*_box_scores``
  pooled with ``pool_box_scores_per_image``), in ``[0, 1]``, low = likely: a box the model is sure
  of has no label (a missing box), a labeled box the model sees as another class (a swapped
  class), a labeled box the model places elsewhere (a badly located box). ``issue`` names the
  lowest of the three.
- ``flagged``: `cleanlab.object_detection.filter.find_label_issues` marks the image as having a
  label issue (its per-class thresholds; ranking does not depend on it).

Images are keyed by their sha256; boxes are pixel ``xyxy`` (see `loop.detections`). cleanlab is
imported inside `find_label_errors` (it loads scikit-learn and pandas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loop.datasets import DatasetVersion
from loop.detections import Detections, box_iou
from loop.errors import LabelQualityError
from loop.formats.cleanlab import (
    detections_to_cleanlab_labels,
    detections_to_cleanlab_predictions,
)

ISSUE_TYPES = ("overlooked", "swap", "badloc")


@dataclass(frozen=True)
class LabelCheck:
    """One labeled image to check: its ``labels`` (ground truth, no confidences) and the
    out-of-sample ``predictions`` (with confidences) of a model that did not train on it; both
    pixel xyxy of the same image size."""

    sha256: str
    labels: Detections
    predictions: Detections


@dataclass(frozen=True)
class LabelSuspect:
    """cleanlab's verdict on one image (see the module docstring); ``rank`` 1 = most suspect."""

    sha256: str
    rank: int
    quality: float
    overlooked: float
    swap: float
    badloc: float
    flagged: bool

    @property
    def issue(self) -> str:
        """The likeliest kind of error: the subtype with the lowest score (ties: the first of
        `ISSUE_TYPES`)."""
        scores = (self.overlooked, self.swap, self.badloc)
        return ISSUE_TYPES[int(np.argmin(scores))]


def _check(items: Sequence[LabelCheck], num_classes: int) -> None:
    if num_classes < 1:
        raise LabelQualityError(f"num_classes must be >= 1, got {num_classes}")
    seen: set[str] = set()
    for it in items:
        if it.sha256 in seen:
            raise LabelQualityError(
                f"image {it.sha256} is listed twice; give each image once, keyed by its sha256"
            )
        seen.add(it.sha256)
        if it.labels.image_wh != it.predictions.image_wh:
            raise LabelQualityError(
                f"image {it.sha256}: labels are for a {it.labels.image_wh} image but the "
                f"predictions for {it.predictions.image_wh}; predict on the labeled image itself"
            )


def find_label_errors(items: Sequence[LabelCheck], num_classes: int) -> list[LabelSuspect]:
    """Every image of ``items`` with cleanlab's scores, most suspect first (ties by sha256).

    The scores are relative to the set (cleanlab normalises similarities over all images), so
    pass the whole labeled train + val set at once. An empty ``items`` gives ``[]``.
    Raises `LabelQualityError` for a repeated sha256 or labels and predictions of different
    image sizes, `loop.errors.ConversionError` for predictions without confidences and
    `loop.errors.UnknownLabelError` for a class id outside ``[0, num_classes)``.
    """
    _check(items, num_classes)
    if not items:
        return []
    from cleanlab.object_detection import filter as cl_filter
    from cleanlab.object_detection import rank as cl_rank

    labels = [detections_to_cleanlab_labels(it.labels, num_classes, it.sha256) for it in items]
    predictions = [detections_to_cleanlab_predictions(it.predictions, num_classes) for it in items]
    quality = cl_rank.get_label_quality_scores(labels, predictions, verbose=False)
    subtype = {
        "overlooked": cl_rank.compute_overlooked_box_scores,
        "swap": cl_rank.compute_swap_box_scores,
        "badloc": cl_rank.compute_badloc_box_scores,
    }
    pooled = {
        name: cl_rank.pool_box_scores_per_image(fn(labels=labels, predictions=predictions))
        for name, fn in subtype.items()
    }
    flagged = cl_filter.find_label_issues(labels, predictions)
    order = sorted(range(len(items)), key=lambda i: (float(quality[i]), items[i].sha256))
    return [
        LabelSuspect(
            sha256=items[i].sha256,
            rank=r,
            quality=float(quality[i]),
            overlooked=float(pooled["overlooked"][i]),
            swap=float(pooled["swap"][i]),
            badloc=float(pooled["badloc"][i]),
            flagged=bool(flagged[i]),
        )
        for r, i in enumerate(order, start=1)
    ]


def label_checks(
    version: DatasetVersion, predictions: Mapping[str, Detections]
) -> list[LabelCheck]:
    """One `LabelCheck` per train and val image of ``version`` (sha256 order), its labels
    paired with ``predictions[sha256]`` (out-of-sample, e.g. from `loop.crossfit`). Test images
    are left out: they judge models and are never relabeled from a model's opinion.

    Raises `LabelQualityError` when an image has no prediction or a prediction is for an image
    that is not a train or val image of ``version`` (stale predictions of another version).
    """
    rows = [r for r in version.rows if r.split != "test"]
    wanted = {r.sha256 for r in rows}
    missing = sorted(wanted - set(predictions))
    if missing:
        raise LabelQualityError(
            f"{len(missing)} labeled images of version {version.short} have no out-of-sample "
            f"prediction (first: {missing[0]}); cross-fit the current version again"
        )
    extra = sorted(set(predictions) - wanted)
    if extra:
        raise LabelQualityError(
            f"{len(extra)} predictions are for images that are not train or val images of "
            f"version {version.short} (first: {extra[0]}); cross-fit the current version again"
        )
    return [LabelCheck(r.sha256, r.boxes, predictions[r.sha256]) for r in rows]


def suspects_to_json(
    suspects: Sequence[LabelSuspect], version: DatasetVersion
) -> list[dict[str, Any]]:
    """JSON-ready rows, one per suspect in rank order: the `LabelSuspect` fields plus ``issue``
    and the image's ``path`` (relative to the pool's images folder) and ``split`` in
    ``version``."""
    rows = version.by_sha()
    out: list[dict[str, Any]] = []
    for s in suspects:
        row = rows.get(s.sha256)
        if row is None:
            raise LabelQualityError(
                f"suspect {s.sha256} is not an image of version {version.short}"
            )
        out.append({**asdict(s), "issue": s.issue, "path": row.path, "split": row.split})
    return out


def disagreeing_boxes(
    labels: Detections, predictions: Detections, min_confidence: float, iou: float = 0.5
) -> Detections:
    """The boxes of ``predictions`` (confidence >= ``min_confidence``) that no box of
    ``labels`` confirms, i.e. none of the same class overlaps it with IoU >= ``iou``: a box the
    label lacks, sees as another class (swap) or places elsewhere (badloc). Pixel xyxy, the
    predictions' confidences kept, in their order; what a reviewer is shown beside the label."""
    shown = predictions.with_min_confidence(min_confidence)
    if not len(shown) or not len(labels):
        return shown
    overlap = box_iou(shown.xyxy, labels.xyxy)
    same = shown.class_id[:, None] == labels.class_id[None, :]
    confirmed = np.any(same & (overlap >= iou), axis=1)
    return shown[np.flatnonzero(~confirmed)]
