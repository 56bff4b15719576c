"""Overlap on purpose and consensus at pull: pure rules, no I/O.

**Which tasks get overlap** (`choose_overlap`): of a push's new tasks, ``round(share x n)``
(half up) are labeled by ``quality.overlap_annotators`` different annotators. Rule ``random``:
a uniform sample drawn with a seeded `numpy.random.Generator`; rule ``uncertain``: the tasks
with the highest priority (the scorer's value; ties: the earlier task in the batch).

**Consensus** (`decide`), per pulled task, from every annotator's latest submitted annotation
(`loop.annotation_log.AnnotationRecord`):

- an annotation marked ``ground_truth`` (a lead's resolution) wins: status ``ground_truth``;
- a task that must be labeled by ``required`` annotators and has fewer: ``waiting`` (it is not
  labeled yet, nothing goes into the dataset version, nothing is logged);
- one annotator: ``single``;
- several: their agreement is the mean pairwise F1 of same-class boxes matched one-to-one with
  the correction analytics' Hungarian matching (`loop.corrections.match_boxes`, IoU >=
  ``match_iou``); 1.0 when all say defect-free. At or above ``threshold``: ``merged`` by the
  merge rule; below: ``review`` (no reference: the image gets no label until a lead resolves it).

Merge rule ``fusion`` (`fuse_boxes`): annotators are taken in order; each one's boxes are matched
(same class only, IoU >= ``match_iou``) to the clusters built so far, represented by their mean
box; a matched box joins its cluster, an unmatched one starts a new cluster. A cluster is kept
when a strict majority of the annotators drew it (2 of 2, 2 of 3, 3 of 4 ...), its box being the
mean of its members' corners. Merge rule ``latest``: the most recently updated annotation.
Boxes are pixel ``xyxy`` (`loop.detections`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np

from loop.annotation_log import AnnotationRecord
from loop.corrections import MATCH_IOU, match_boxes, mean_pairwise_f1
from loop.detections import Detections
from loop.errors import ConfigError

OverlapRule = Literal["random", "uncertain"]
MergeRule = Literal["fusion", "latest"]
Status = Literal["single", "ground_truth", "merged", "review", "waiting"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def overlap_count(n: int, share: float) -> int:
    """How many of ``n`` tasks get overlap: ``share x n`` rounded half up."""
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"quality.overlap_share must lie in [0, 1], got {share}")
    return min(n, math.floor(share * n + 0.5))


def choose_overlap(
    priorities: Sequence[float],
    share: float,
    rule: OverlapRule,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean mask (n,) of the tasks that get overlap, for ``priorities`` in batch order (see
    the module docstring). ``rng`` is only drawn from by the ``random`` rule."""
    n = len(priorities)
    k = overlap_count(n, share)
    mask = np.zeros(n, dtype=bool)
    if k == 0:
        return mask
    if rule == "random":
        mask[rng.choice(n, size=k, replace=False)] = True
    elif rule == "uncertain":
        order = np.argsort(-np.asarray(priorities, dtype=np.float64), kind="stable")
        mask[order[:k]] = True
    else:
        raise ConfigError(f"unknown quality.overlap_rule {rule!r}; use 'random' or 'uncertain'")
    return mask


def fuse_boxes(sets: Sequence[Detections], min_iou: float = MATCH_IOU) -> Detections:
    """Box fusion of several annotators' boxes of one image (rule in the module docstring).

    ``sets``: one `Detections` per annotator, same ``image_wh``. Returns the kept clusters'
    mean boxes in the order the clusters were started, without confidences."""
    if not sets:
        raise ConfigError("fuse_boxes needs at least one annotator's boxes")
    wh = sets[0].image_wh
    members: list[list[np.ndarray]] = []
    classes: list[int] = []
    for det in sets:
        if len(members):
            reps = Detections(
                np.array([np.mean(m, axis=0) for m in members]).reshape(-1, 4),
                np.asarray(classes, dtype=np.int64),
                wh,
            )
            pairs = match_boxes(det, reps, min_iou, same_class_only=True)
        else:
            pairs = []
        matched = {i: j for i, j, _ in pairs}
        for i in range(len(det)):
            if i in matched:
                members[matched[i]].append(det.xyxy[i])
            else:
                members.append([det.xyxy[i]])
                classes.append(int(det.class_id[i]))
    need = len(sets) // 2 + 1
    keep = [k for k, m in enumerate(members) if len(m) >= need]
    xyxy = np.array([np.mean(members[k], axis=0) for k in keep], dtype=np.float64).reshape(-1, 4)
    return Detections(xyxy, np.asarray([classes[k] for k in keep], dtype=np.int64), wh)


@dataclass(frozen=True)
class Decision:
    """What consensus makes of one task. ``reference``: the boxes that go into the dataset
    version (None for ``review`` and ``waiting``); ``chosen``: the annotation whose label was
    taken as is (``single``, ``ground_truth``, ``merged`` by ``latest``), else None;
    ``agreement``: mean pairwise F1 (None with fewer than two annotators); ``reason``: one line
    for people."""

    status: Status
    reference: Detections | None
    agreement: float | None
    chosen: AnnotationRecord | None
    reason: str


def _recency(a: AnnotationRecord) -> tuple[datetime, int]:
    when = a.updated_at or _EPOCH
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC), a.annotation_id)


def decide(
    annotations: Sequence[AnnotationRecord],
    *,
    required: int = 1,
    threshold: float = 0.7,
    match_iou: float = MATCH_IOU,
    merge_rule: MergeRule = "fusion",
) -> Decision:
    """The consensus on one task from its annotators' latest annotations (one per annotator;
    rules in the module docstring). ``required``: annotators the task was pushed for (1: no
    overlap). Raises `ConfigError` for no annotation or an unknown merge rule."""
    if not annotations:
        raise ConfigError("consensus needs at least one annotation")
    if merge_rule not in ("fusion", "latest"):
        raise ConfigError(f"unknown quality.merge_rule {merge_rule!r}; use 'fusion' or 'latest'")
    n = len(annotations)
    sets = [a.boxes for a in annotations]
    agreement = mean_pairwise_f1(sets, match_iou) if n > 1 else None
    truth = [a for a in annotations if a.ground_truth]
    if truth:
        lead = max(truth, key=_recency)
        return Decision(
            "ground_truth", lead.boxes, agreement, lead, f"ground truth by {lead.annotator}"
        )
    if n < required:
        return Decision(
            "waiting", None, agreement, None, f"{n} of {required} annotators have labeled it"
        )
    latest = max(annotations, key=_recency)
    if n == 1:
        return Decision("single", latest.boxes, None, latest, f"labeled by {latest.annotator}")
    score = 1.0 if agreement is None else agreement  # n > 1: never None here
    if score < threshold:
        return Decision(
            "review",
            None,
            agreement,
            None,
            f"{n} annotators disagree (agreement {score:.2f} < {threshold:.2f})",
        )
    if merge_rule == "latest":
        return Decision(
            "merged", latest.boxes, agreement, latest, f"{n} annotators agree; latest taken"
        )
    fused = fuse_boxes(sets, match_iou)
    return Decision(
        "merged", fused, agreement, None, f"{n} annotators agree ({score:.2f}); boxes fused"
    )
