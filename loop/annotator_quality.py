"""Per-annotator and per-class label quality, measured against a reference (pure numpy).

The reference of a task is its consensus or a lead's reviewed ground truth. Each annotator's
boxes are matched to it one-to-one with the correction analytics' matching
(`loop.corrections.match_boxes`: Hungarian on IoU, pairs below ``min_iou`` never match, a
same-class pair beats an other-class pair). Then, per annotator over all tasks:

- a same-class match is a true positive; ``precision`` = true positives / the annotator's boxes,
  ``recall`` = true positives / the reference boxes (None where the denominator is 0);
- ``confusion`` is ``(C + 1, C + 1)``: rows the reference class, columns the annotator's class,
  index ``C`` = no box. ``confusion[r, a]`` counts matched pairs (the diagonal holds the true
  positives), ``confusion[r, C]`` reference boxes the annotator missed, ``confusion[C, a]``
  boxes the annotator drew where the reference has none;
- ``task_ids``: the tasks behind each kind of error (``missed``, ``extra``, ``confused``), so
  that a number in a report links to the tasks that make it.

`class_agreement` is the per-class agreement between annotators (no reference needed): the
mean `loop.corrections.pairwise_f1` of their boxes of that class. `quality_metrics` flattens
both for MLflow.

Boxes are pixel xyxy (`loop.detections`); images keyed by sha256, tasks by Label Studio id;
lead times in seconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from loop.corrections import MATCH_IOU, match_boxes, pairwise_f1
from loop.detections import Detections
from loop.errors import LabelQualityError, UnknownLabelError

ERROR_KINDS = ("missed", "extra", "confused")


@dataclass(frozen=True)
class AnnotatedTask:
    """One task: the ``reference`` boxes and each annotator's (name -> boxes), all of the same
    image; ``lead_times``: annotator -> seconds spent, where known."""

    task_id: int
    sha256: str
    reference: Detections
    annotations: Mapping[str, Detections]
    lead_times: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AnnotatorQuality:
    """One annotator's figures over the tasks they annotated (see the module docstring)."""

    annotator: str
    tasks: int
    boxes: int
    reference_boxes: int
    true_positives: int
    precision: float | None
    recall: float | None
    confusion: npt.NDArray[np.int64]
    lead_time_mean_s: float | None
    task_ids: Mapping[str, tuple[int, ...]]

    def confused_pairs(self, class_names: Sequence[str]) -> dict[tuple[str, str], int]:
        """``(reference class, annotator's class) -> count`` of matched boxes the annotator
        labeled as another class; only pairs that occur."""
        c = len(class_names)
        return {
            (class_names[r], class_names[a]): int(self.confusion[r, a])
            for r in range(c)
            for a in range(c)
            if r != a and self.confusion[r, a]
        }


def _check_ids(det: Detections, num_classes: int, what: str) -> None:
    if len(det) and int(det.class_id.max()) >= num_classes:
        raise UnknownLabelError(
            f"{what} has class id {int(det.class_id.max())}; the project has {num_classes} classes"
        )


def _check_task(task: AnnotatedTask, num_classes: int) -> None:
    _check_ids(task.reference, num_classes, f"the reference of task {task.task_id}")
    for name, det in task.annotations.items():
        _check_ids(det, num_classes, f"{name}'s annotation of task {task.task_id}")
        if det.image_wh != task.reference.image_wh:
            raise LabelQualityError(
                f"task {task.task_id}: {name}'s boxes are for a {det.image_wh} image but the "
                f"reference for {task.reference.image_wh}; compare boxes of the same image"
            )


def annotator_quality(
    tasks: Iterable[AnnotatedTask], class_names: Sequence[str], min_iou: float = MATCH_IOU
) -> dict[str, AnnotatorQuality]:
    """Annotator name -> `AnnotatorQuality` against each task's reference, sorted by name.

    Raises `LabelQualityError` for a task id given twice or boxes of a different image size
    than the reference, `UnknownLabelError` for a class id outside ``class_names``.
    """
    c = len(class_names)
    confusion: dict[str, npt.NDArray[np.int64]] = {}
    counts: dict[str, dict[str, int]] = {}
    leads: dict[str, list[float]] = {}
    where: dict[str, dict[str, list[int]]] = {}
    seen: set[int] = set()
    for task in tasks:
        if task.task_id in seen:
            raise LabelQualityError(f"task {task.task_id} is given twice; give each task once")
        seen.add(task.task_id)
        _check_task(task, c)
        ref = task.reference
        for name, ann in task.annotations.items():
            m = confusion.setdefault(name, np.zeros((c + 1, c + 1), dtype=np.int64))
            n = counts.setdefault(name, {"tasks": 0, "boxes": 0, "reference_boxes": 0})
            w = where.setdefault(name, {k: [] for k in ERROR_KINDS})
            n["tasks"] += 1
            n["boxes"] += len(ann)
            n["reference_boxes"] += len(ref)
            pairs = match_boxes(ann, ref, min_iou)
            for i, j, _ in pairs:
                m[int(ref.class_id[j]), int(ann.class_id[i])] += 1
            matched_a = {i for i, _, _ in pairs}
            matched_r = {j for _, j, _ in pairs}
            for j in range(len(ref)):
                if j not in matched_r:
                    m[int(ref.class_id[j]), c] += 1
            for i in range(len(ann)):
                if i not in matched_a:
                    m[c, int(ann.class_id[i])] += 1
            if len(matched_r) < len(ref):
                w["missed"].append(task.task_id)
            if len(matched_a) < len(ann):
                w["extra"].append(task.task_id)
            if any(ann.class_id[i] != ref.class_id[j] for i, j, _ in pairs):
                w["confused"].append(task.task_id)
            lead = task.lead_times.get(name)
            if lead is not None and np.isfinite(lead):
                leads.setdefault(name, []).append(float(lead))
    out: dict[str, AnnotatorQuality] = {}
    for name in sorted(confusion):
        m, n = confusion[name], counts[name]
        tp = int(np.trace(m[:c, :c]))
        m.setflags(write=False)
        out[name] = AnnotatorQuality(
            annotator=name,
            tasks=n["tasks"],
            boxes=n["boxes"],
            reference_boxes=n["reference_boxes"],
            true_positives=tp,
            precision=tp / n["boxes"] if n["boxes"] else None,
            recall=tp / n["reference_boxes"] if n["reference_boxes"] else None,
            confusion=m,
            lead_time_mean_s=float(np.mean(leads[name])) if leads.get(name) else None,
            task_ids={k: tuple(sorted(v)) for k, v in where[name].items()},
        )
    return out


def class_agreement(
    tasks: Iterable[AnnotatedTask], class_names: Sequence[str], min_iou: float = MATCH_IOU
) -> dict[str, float | None]:
    """Class name -> mean `pairwise_f1` of annotators' boxes of that class, over every pair of
    annotators of every task where at least one of the pair drew that class (a pair that both
    left it out says nothing about it); None for a class no pair drew. A box one annotator
    calls ``pit`` and the other ``patch`` lowers both classes. Tasks with one annotator are
    skipped; the reference is not used."""
    c = len(class_names)
    scores: dict[int, list[float]] = {k: [] for k in range(c)}
    for task in tasks:
        _check_task(task, c)
        sets = list(task.annotations.values())
        for a in range(len(sets)):
            for b in range(a + 1, len(sets)):
                for k in range(c):
                    da, db = sets[a][sets[a].class_id == k], sets[b][sets[b].class_id == k]
                    if len(da) or len(db):
                        scores[k].append(pairwise_f1(da, db, min_iou))
    return {class_names[k]: float(np.mean(v)) if v else None for k, v in scores.items()}


def _metric_key(text: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and spaces (as in loop.corrections).
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", text)


def quality_metrics(
    annotators: Mapping[str, AnnotatorQuality],
    agreement: Mapping[str, float | None] | None = None,
    prefix: str = "label_quality",
) -> dict[str, float]:
    """Flat ``{name: value}`` for MLflow: per annotator ``<prefix>.annotator.<name>.`` +
    ``tasks``, ``precision``, ``recall``, ``missed``, ``extra``, ``confused`` (box counts) and
    ``lead_time_mean_s``; per class ``<prefix>.agreement.<class>``. Figures that are None are
    left out (never logged as 0)."""
    out: dict[str, float] = {}
    for name, q in annotators.items():
        c = q.confusion.shape[0] - 1
        key = f"{prefix}.annotator.{_metric_key(name)}"
        values: dict[str, float | None] = {
            "tasks": float(q.tasks),
            "precision": q.precision,
            "recall": q.recall,
            "missed": float(q.confusion[:c, c].sum()),
            "extra": float(q.confusion[c, :c].sum()),
            "confused": float(q.confusion[:c, :c].sum() - np.trace(q.confusion[:c, :c])),
            "lead_time_mean_s": q.lead_time_mean_s,
        }
        out.update({f"{key}.{k}": float(v) for k, v in values.items() if v is not None})
    for cls, value in (agreement or {}).items():
        if value is not None:
            out[f"{prefix}.agreement.{_metric_key(cls)}"] = float(value)
    return out
