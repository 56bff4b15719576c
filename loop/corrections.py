"""Correction analytics: how labelers changed the model's suggestions (pure; `write_corrections`
and `read_corrections` are the only I/O).

For every pulled task that showed a prediction, the predicted boxes and the final (submitted) boxes
are matched one-to-one with the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) on
IoU; pairs below ``MATCH_IOU`` never match, and a same-class pair is preferred over an other-class
pair whatever their IoUs. Each prediction then ends as exactly one outcome:

- ``accepted``: matched, same class, IoU >= ``ACCEPT_IOU`` (0.9),
- ``adjusted``: matched, same class, ``MATCH_IOU`` (0.5) <= IoU < 0.9 (the labeler moved it),
- ``relabeled``: matched with IoU >= 0.5 but the labeler chose another class,
- ``removed``: unmatched (a false positive the labeler deleted),

and each unmatched final box is ``added`` (a defect the model missed). Per class, the first four
count under the PREDICTED class and ``added`` under the FINAL box's class, so for a class
``accepted + adjusted + relabeled + removed`` is the number of its predictions.

In ``segment`` projects an instance may carry polygon rings (`loop.polygons.Rings`, pixels);
a pair whose two instances both have rings is compared by MASK IoU (`instance_iou`: both
rasterised on the image's pixel grid by `loop.polygons.rings_to_mask`), any other pair by box
IoU, with the same thresholds. ``match`` in the document says which (``"mask"`` when any pair
of the image was compared by mask).

All boxes are pixel ``xyxy`` (see `loop.detections`); lead times are seconds.

The analytics document (`build_corrections`) has the shape stored as
``<workspace>/datasets/<digest>/corrections.json``::

    {"per_class": {cls: {"accepted", "adjusted", "relabeled", "removed", "added"}},
     "lead_times": [seconds, ...], "tasks": n,
     "images": [{"sha256", "task_id", "disagreement", "match",
                 "predicted": [[x1, y1, x2, y2, cls, score], ...],
                 "final": [[x1, y1, x2, y2, cls], ...],
                 "predicted_rings": [[[[x, y], ...], ...], ...],   # optional, see below
                 "final_rings": [[[[x, y], ...], ...], ...]}]}     # optional

where ``cls`` is the class NAME and ``score`` the model confidence (None when unknown).
``predicted_rings``/``final_rings`` are present only when that side has polygons: one entry per
box of ``predicted``/``final`` (same order), each a list of rings of pixel ``[x, y]`` points
(``[]`` for a box without an outline); the report draws them as mask overlays.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from loop.detections import Detections, box_iou
from loop.errors import InvalidDetectionsError, UnknownLabelError
from loop.polygons import Rings, mask_iou, rings_to_mask

MATCH_IOU = 0.5
ACCEPT_IOU = 0.9
OUTCOMES = ("accepted", "adjusted", "relabeled", "removed", "added")
_EPS = 1e-9  # IoUs computed from float pixels: 0.9 must count as 0.9


def instance_iou(
    a: Detections,
    b: Detections,
    a_rings: Sequence[Rings] = (),
    b_rings: Sequence[Rings] = (),
) -> np.ndarray:
    """``(len(a), len(b))`` IoU matrix: mask IoU for pairs where both instances have rings,
    box IoU for the rest. ``a_rings``/``b_rings``: empty (boxes only) or one `Rings` per box
    (``()`` for a box without a polygon). Only pairs whose boxes overlap are rasterised."""
    for det, rings, name in ((a, a_rings, "a"), (b, b_rings, "b")):
        if rings and len(rings) != len(det):
            raise InvalidDetectionsError(
                f"{name} has {len(det)} boxes but {len(rings)} polygon instances"
            )
    iou = box_iou(a.xyxy, b.xyxy)
    if not a_rings or not b_rings:
        return iou
    masks_a: dict[int, np.ndarray] = {}
    masks_b: dict[int, np.ndarray] = {}
    for i, j in zip(*np.nonzero(iou > 0), strict=True):
        if not a_rings[i] or not b_rings[j]:
            continue
        if i not in masks_a:
            masks_a[i] = rings_to_mask(a_rings[i], a.image_wh)
        if j not in masks_b:
            masks_b[j] = rings_to_mask(b_rings[j], b.image_wh)
        iou[i, j] = mask_iou(masks_a[i], masks_b[j])
    return iou


def match_boxes(
    a: Detections,
    b: Detections,
    min_iou: float = MATCH_IOU,
    same_class_only: bool = False,
    iou: np.ndarray | None = None,
) -> list[tuple[int, int, float]]:
    """One-to-one matching of ``a``'s boxes to ``b``'s: ``[(i, j, iou), ...]`` sorted by ``i``.

    Maximises the summed IoU over pairs with IoU >= ``min_iou``, where a same-class pair always
    beats an other-class pair (weight IoU + 1). ``same_class_only`` forbids other-class pairs.
    ``iou``: a precomputed ``(len(a), len(b))`` matrix (e.g. `instance_iou`); box IoU otherwise.
    """
    if len(a) == 0 or len(b) == 0:
        return []
    if iou is None:
        iou = box_iou(a.xyxy, b.xyxy)
    elif iou.shape != (len(a), len(b)):
        raise InvalidDetectionsError(f"iou must have shape {(len(a), len(b))}, got {iou.shape}")
    same = a.class_id[:, None] == b.class_id[None, :]
    eligible = iou >= min_iou - _EPS
    if same_class_only:
        eligible &= same
    weight = np.where(eligible, iou + same.astype(np.float64), 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    pairs = [
        (int(i), int(j), float(iou[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if eligible[i, j]
    ]
    return sorted(pairs)


@dataclass(frozen=True)
class TaskCorrections:
    """Outcome of `compare` for one image.

    ``counts``: class name -> outcome -> count (only classes that occur). ``disagreement``: 0 when
    the labeler kept every suggestion exactly, 1 when nothing survived (see `compare`).
    ``pairs``: matched ``(prediction index, final index, IoU)``.
    """

    counts: dict[str, dict[str, int]]
    disagreement: float
    pairs: list[tuple[int, int, float]] = field(default_factory=list)

    def total(self, outcome: str) -> int:
        return sum(c.get(outcome, 0) for c in self.counts.values())


def _name(class_names: Sequence[str], cls: int) -> str:
    if not 0 <= cls < len(class_names):
        raise UnknownLabelError(f"class id {cls} has no name in {list(class_names)}")
    return class_names[cls]


def compare(
    predicted: Detections,
    final: Detections,
    class_names: Sequence[str],
    predicted_rings: Sequence[Rings] = (),
    final_rings: Sequence[Rings] = (),
) -> TaskCorrections:
    """Classify every predicted and final box of one image (see the module docstring).

    ``disagreement`` = 1 - (sum of IoUs of same-class matches) / (predicted + final - same-class
    matches): a soft Jaccard distance between the two box sets; 0.0 when both are empty.
    With rings on both sides, pairs of polygon instances are compared by mask IoU.
    """
    pairs = match_boxes(
        predicted, final, iou=instance_iou(predicted, final, predicted_rings, final_rings)
    )
    counts: dict[str, dict[str, int]] = {}

    def bump(cls: int, outcome: str) -> None:
        per = counts.setdefault(_name(class_names, cls), dict.fromkeys(OUTCOMES, 0))
        per[outcome] += 1

    matched_p = {i for i, _, _ in pairs}
    matched_f = {j for _, j, _ in pairs}
    same_iou_sum = 0.0
    n_same = 0
    for i, j, iou in pairs:
        pc, fc = int(predicted.class_id[i]), int(final.class_id[j])
        if pc != fc:
            bump(pc, "relabeled")
            continue
        n_same += 1
        same_iou_sum += iou
        bump(pc, "accepted" if iou >= ACCEPT_IOU - _EPS else "adjusted")
    for i in range(len(predicted)):
        if i not in matched_p:
            bump(int(predicted.class_id[i]), "removed")
    for j in range(len(final)):
        if j not in matched_f:
            bump(int(final.class_id[j]), "added")
    denom = len(predicted) + len(final) - n_same
    disagreement = 0.0 if denom == 0 else 1.0 - same_iou_sum / denom
    return TaskCorrections(counts, float(min(max(disagreement, 0.0), 1.0)), pairs)


def pairwise_f1(a: Detections, b: Detections, min_iou: float = MATCH_IOU) -> float:
    """Agreement of two labelers' box sets: F1 of same-class matches with IoU >= ``min_iou``
    (``2 * matches / (len(a) + len(b))``); 1.0 when both are empty (both say defect-free)."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    matches = len(match_boxes(a, b, min_iou, same_class_only=True))
    return 2.0 * matches / (len(a) + len(b))


def mean_pairwise_f1(sets: Sequence[Detections], min_iou: float = MATCH_IOU) -> float | None:
    """Mean `pairwise_f1` over all pairs of annotators' box sets; None with fewer than two."""
    if len(sets) < 2:
        return None
    scores = [
        pairwise_f1(sets[i], sets[j], min_iou)
        for i in range(len(sets))
        for j in range(i + 1, len(sets))
    ]
    return float(np.mean(scores))


@dataclass(frozen=True)
class CorrectionInput:
    """One labeled image that showed a prediction. Boxes in pixels; ``lead_time`` in seconds."""

    sha256: str
    task_id: int
    predicted: Detections
    final: Detections
    lead_time: float | None = None
    predicted_rings: tuple[Rings, ...] = ()
    final_rings: tuple[Rings, ...] = ()


def _boxes(det: Detections, class_names: Sequence[str], with_score: bool) -> list[list[Any]]:
    out: list[list[Any]] = []
    for k, (box, cls) in enumerate(zip(det.xyxy.tolist(), det.class_id.tolist(), strict=True)):
        row: list[Any] = [round(float(v), 3) for v in box]
        row.append(_name(class_names, int(cls)))
        if with_score:
            row.append(None if det.confidence is None else round(float(det.confidence[k]), 6))
        out.append(row)
    return out


def _rings_json(rings: Sequence[Rings]) -> list[list[list[list[float]]]]:
    """One entry per instance: its rings as ``[[x, y], ...]`` pixel lists (``[]``: a box)."""
    return [
        [[[round(float(x), 3), round(float(y), 3)] for x, y in ring] for ring in inst]
        for inst in rings
    ]


def build_corrections(
    items: Iterable[CorrectionInput], class_names: Sequence[str]
) -> dict[str, Any]:
    """The ``corrections.json`` document (shape in the module docstring); every class of
    ``class_names`` appears in ``per_class``, images in input order, lead times in seconds."""
    per_class = {c: dict.fromkeys(OUTCOMES, 0) for c in class_names}
    lead_times: list[float] = []
    images: list[dict[str, Any]] = []
    for it in items:
        tc = compare(it.predicted, it.final, class_names, it.predicted_rings, it.final_rings)
        by_mask = bool(it.predicted_rings) and bool(it.final_rings)
        for cls, outcome_counts in tc.counts.items():
            for outcome, n in outcome_counts.items():
                per_class[cls][outcome] += n
        if it.lead_time is not None and math.isfinite(it.lead_time):
            lead_times.append(float(it.lead_time))
        image: dict[str, Any] = {
            "sha256": it.sha256,
            "task_id": int(it.task_id),
            "disagreement": round(tc.disagreement, 6),
            "match": "mask" if by_mask else "box",
            "predicted": _boxes(it.predicted, class_names, with_score=True),
            "final": _boxes(it.final, class_names, with_score=False),
        }
        # Polygons only where a side has them: box-only documents stay as they were.
        if it.predicted_rings:
            image["predicted_rings"] = _rings_json(it.predicted_rings)
        if it.final_rings:
            image["final_rings"] = _rings_json(it.final_rings)
        images.append(image)
    return {
        "per_class": per_class,
        "lead_times": lead_times,
        "tasks": len(images),
        "images": images,
    }


def acceptance_rates(report: dict[str, Any]) -> dict[str, float | None]:
    """Class -> accepted / predictions of that class (None when the class had no predictions)."""
    rates: dict[str, float | None] = {}
    for cls, c in report["per_class"].items():
        n_pred = c["accepted"] + c["adjusted"] + c["relabeled"] + c["removed"]
        rates[cls] = c["accepted"] / n_pred if n_pred else None
    return rates


def _metric_key(text: str) -> str:
    # MLflow metric names: alphanumerics, _ - . / and spaces.
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", text)


def correction_metrics(report: dict[str, Any], prefix: str = "corrections") -> dict[str, float]:
    """Flat ``{name: value}`` for MLflow from a `build_corrections` document.

    Totals per outcome, overall and per-class acceptance rate (classes with no prediction are
    left out), number of tasks, mean/median lead time in seconds, mean/max disagreement.
    """
    out: dict[str, float] = {f"{prefix}.tasks": float(report["tasks"])}
    totals = dict.fromkeys(OUTCOMES, 0)
    for c in report["per_class"].values():
        for k in OUTCOMES:
            totals[k] += int(c[k])
    for k, v in totals.items():
        out[f"{prefix}.{k}"] = float(v)
    n_pred = totals["accepted"] + totals["adjusted"] + totals["relabeled"] + totals["removed"]
    if n_pred:
        out[f"{prefix}.acceptance_rate"] = totals["accepted"] / n_pred
    for cls, rate in acceptance_rates(report).items():
        if rate is not None:
            out[f"{prefix}.acceptance_rate.{_metric_key(cls)}"] = float(rate)
    lead = report["lead_times"]
    if lead:
        out[f"{prefix}.lead_time_mean_s"] = float(np.mean(lead))
        out[f"{prefix}.lead_time_median_s"] = float(np.median(lead))
    dis = [float(im["disagreement"]) for im in report["images"]]
    if dis:
        out[f"{prefix}.disagreement_mean"] = float(np.mean(dis))
        out[f"{prefix}.disagreement_max"] = float(np.max(dis))
    return out


def write_corrections(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON to ``path`` atomically (temporary file + rename)."""
    from loop.images import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1))
    return path


def read_corrections(path: Path) -> dict[str, Any]:
    """Load a ``corrections.json`` written by `write_corrections`."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data
