"""Per-annotator and per-class label quality, measured against a reference (pure numpy;
`read_label_quality` is the only I/O).

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

From the annotation log (`loop.annotation_log`, every annotator's work and each task's outcome),
`label_quality` chooses the reference per task (`scored_tasks`): a ``merged`` task's consensus,
a ``ground_truth`` task's lead-resolved label (the lead's own annotation is not scored); ``single``
tasks (no independent reference) and ``review`` tasks (no reference yet) are counted and listed,
never scored. `label_quality_metrics` and `label_quality_to_json` are what MLflow gets.

Boxes are pixel xyxy (`loop.detections`); images keyed by sha256, tasks by Label Studio id;
lead times in seconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from loop.annotation_log import STATUSES, TaskOutcome, latest_per_task, read_outcomes
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


# ------------------------------------------------------------------ from the annotation log


@dataclass(frozen=True)
class AnnotatorFigures:
    """One annotator in a `LabelQuality`: ``quality`` against the tasks' references (None when
    none of their tasks could be scored), ``tasks_annotated`` every task of the log they
    submitted an annotation for, and their ``lead_times`` (seconds) over those tasks."""

    annotator: str
    tasks_annotated: int
    quality: AnnotatorQuality | None
    lead_times: tuple[float, ...] = ()

    @property
    def lead_time_median_s(self) -> float | None:
        return float(np.median(self.lead_times)) if self.lead_times else None

    @property
    def lead_time_total_s(self) -> float | None:
        return float(np.sum(self.lead_times)) if self.lead_times else None

    @property
    def lead_time_mean_s(self) -> float | None:
        return float(np.mean(self.lead_times)) if self.lead_times else None


@dataclass(frozen=True)
class LabelQuality:
    """The label quality figures of an annotation log (`label_quality`).

    ``tasks``: tasks in the log (newest outcome of each); ``scored_tasks``, ``review_tasks``,
    ``single_tasks``: the task ids scored against a reference, waiting in the review queue,
    and labeled by one annotator only (no independent reference, not scored);
    ``status_counts``: tasks per outcome status; ``agreement``: `class_agreement` over the
    ``agreement_tasks`` tasks with at least two annotators."""

    class_names: tuple[str, ...]
    min_iou: float
    tasks: int
    status_counts: Mapping[str, int]
    scored_tasks: tuple[int, ...]
    review_tasks: tuple[int, ...]
    single_tasks: tuple[int, ...]
    annotators: Mapping[str, AnnotatorFigures]
    agreement: Mapping[str, float | None]
    agreement_tasks: int

    @property
    def scored(self) -> dict[str, AnnotatorQuality]:
        """Annotator -> figures, for the annotators with at least one scored task."""
        return {n: a.quality for n, a in self.annotators.items() if a.quality is not None}


def _by_annotator(outcome: TaskOutcome, ground_truth: bool) -> dict[str, Detections]:
    """Annotator -> boxes of the outcome's annotations whose ``ground_truth`` flag is
    ``ground_truth`` (the newest annotation of an annotator who appears twice)."""
    out: dict[str, Detections] = {}
    for a in sorted(outcome.annotations, key=lambda a: a.annotation_id):
        if a.ground_truth is ground_truth:
            out[a.annotator] = a.boxes
    return out


def scored_tasks(outcomes: Iterable[TaskOutcome]) -> list[AnnotatedTask]:
    """The tasks that can be scored, each against the reference its outcome ended with.

    The rule, per task (give the newest outcome of each, `latest_per_task`):

    - ``merged``: every annotator is scored against the consensus (the merged boxes);
    - ``ground_truth``: the other annotators are scored against the lead's resolved label;
      the lead's own annotation (``ground_truth=True``) is the reference and is not scored;
    - ``single``: one annotator and no independent reference: not scored;
    - ``review``: no reference yet (waiting in the review queue): not scored.

    A lead's ground-truth annotation is never scored, whatever the status. Sorted by task id.
    """
    out = []
    for o in sorted(outcomes, key=lambda o: o.task_id):
        if o.status not in ("merged", "ground_truth") or o.reference is None:
            continue
        annotations = _by_annotator(o, ground_truth=False)
        if annotations:
            out.append(AnnotatedTask(o.task_id, o.sha256, o.reference, annotations))
    return out


def label_quality(
    outcomes: Iterable[TaskOutcome], class_names: Sequence[str], min_iou: float = MATCH_IOU
) -> LabelQuality:
    """Per-annotator and per-class figures of a log's outcomes (the newest one of each task
    counts; the scoring rule is `scored_tasks`'s). Lead times and ``tasks_annotated`` count
    every task an annotator submitted, scored or not; the lead's review time included. Class
    agreement is measured between the (non-ground-truth) annotators of every task that has at
    least two, whatever its status: leaving out the tasks in review would hide exactly the
    disagreements."""
    latest = sorted(latest_per_task(outcomes).values(), key=lambda o: o.task_id)
    tasks = scored_tasks(latest)
    quality = annotator_quality(tasks, class_names, min_iou)
    counts: dict[str, int] = {}
    leads: dict[str, list[float]] = {}
    for o in latest:
        # One record per annotator and task: their newest annotation.
        newest = {a.annotator: a for a in sorted(o.annotations, key=lambda a: a.annotation_id)}
        for name, a in newest.items():
            counts[name] = counts.get(name, 0) + 1
            if a.lead_time is not None and np.isfinite(a.lead_time):
                leads.setdefault(name, []).append(float(a.lead_time))
    several = [
        AnnotatedTask(o.task_id, o.sha256, Detections.empty(_image_wh(o)), ann)
        for o in latest
        if len(ann := _by_annotator(o, ground_truth=False)) >= 2
    ]
    return LabelQuality(
        class_names=tuple(class_names),
        min_iou=min_iou,
        tasks=len(latest),
        status_counts={s: sum(o.status == s for o in latest) for s in STATUSES},
        scored_tasks=tuple(t.task_id for t in tasks),
        review_tasks=tuple(o.task_id for o in latest if o.status == "review"),
        single_tasks=tuple(o.task_id for o in latest if o.status == "single"),
        annotators={
            name: AnnotatorFigures(
                name, counts[name], quality.get(name), tuple(leads.get(name, ()))
            )
            for name in sorted(counts)
        },
        agreement=class_agreement(several, class_names, min_iou),
        agreement_tasks=len(several),
    )


def _image_wh(outcome: TaskOutcome) -> tuple[int, int]:
    if outcome.reference is not None:
        return outcome.reference.image_wh
    return outcome.annotations[0].boxes.image_wh


def read_label_quality(
    path: Path, class_names: Sequence[str], min_iou: float = MATCH_IOU
) -> LabelQuality:
    """`label_quality` of the annotation log at ``path`` (no tasks when there is no log yet).
    Raises `DatasetError` for a malformed log and `UnknownLabelError` for a class it names
    that is not in ``class_names``."""
    return label_quality(read_outcomes(path, class_names), class_names, min_iou)


def label_quality_metrics(lq: LabelQuality, prefix: str = "label_quality") -> dict[str, float]:
    """`quality_metrics` of the scored annotators plus, per annotator,
    ``<prefix>.annotator.<name>.tasks_annotated`` and ``lead_time_{median,mean,total}_s`` (over
    every task they annotated), and the task counts ``<prefix>.tasks``, ``.tasks_scored``,
    ``.review_queue``, ``.tasks_single``. ``...annotator.<name>.tasks`` counts scored tasks."""
    out = quality_metrics(lq.scored, lq.agreement, prefix)
    for name, a in lq.annotators.items():
        key = f"{prefix}.annotator.{_metric_key(name)}"
        values = {
            "tasks_annotated": float(a.tasks_annotated),
            "lead_time_median_s": a.lead_time_median_s,
            "lead_time_mean_s": a.lead_time_mean_s,
            "lead_time_total_s": a.lead_time_total_s,
        }
        out.update({f"{key}.{k}": float(v) for k, v in values.items() if v is not None})
    out[f"{prefix}.tasks"] = float(lq.tasks)
    out[f"{prefix}.tasks_scored"] = float(len(lq.scored_tasks))
    out[f"{prefix}.review_queue"] = float(len(lq.review_tasks))
    out[f"{prefix}.tasks_single"] = float(len(lq.single_tasks))
    return out


def most_confused(
    q: AnnotatorQuality, class_names: Sequence[str], top: int = 3
) -> list[tuple[str, str, int]]:
    """The ``top`` most frequent ``(reference class, annotator's class, count)`` swaps, most
    frequent first (ties by class order)."""
    pairs = q.confused_pairs(class_names)
    order = {c: i for i, c in enumerate(class_names)}
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], order[kv[0][0]], order[kv[0][1]]))
    return [(r, a, n) for (r, a), n in ranked[:top]]


def label_quality_to_json(lq: LabelQuality) -> dict[str, Any]:
    """The full table as a JSON-ready dict (the MLflow artifact): every annotator's figures,
    confusion matrix (rows reference class, columns annotator's class, last index no box),
    class swaps, lead times and the task ids behind each error kind; per-class agreement;
    the scored, review and single task ids."""
    classes = list(lq.class_names)
    annotators = []
    for name, a in lq.annotators.items():
        q = a.quality
        row: dict[str, Any] = {
            "annotator": name,
            "tasks_annotated": a.tasks_annotated,
            "lead_time_median_s": a.lead_time_median_s,
            "lead_time_mean_s": a.lead_time_mean_s,
            "lead_time_total_s": a.lead_time_total_s,
            "tasks_scored": 0 if q is None else q.tasks,
        }
        if q is not None:
            c = len(classes)
            row |= {
                "boxes": q.boxes,
                "reference_boxes": q.reference_boxes,
                "true_positives": q.true_positives,
                "precision": q.precision,
                "recall": q.recall,
                "missed": int(q.confusion[:c, c].sum()),
                "extra": int(q.confusion[c, :c].sum()),
                "confused": int(q.confusion[:c, :c].sum() - np.trace(q.confusion[:c, :c])),
                "confused_pairs": [
                    {"reference": r, "annotator": x, "count": n}
                    for r, x, n in most_confused(q, classes, top=c * c)
                ],
                "confusion": q.confusion.tolist(),
                "task_ids": {k: list(v) for k, v in q.task_ids.items()},
            }
        annotators.append(row)
    return {
        "classes": classes,
        "min_iou": lq.min_iou,
        "tasks": lq.tasks,
        "status_counts": dict(lq.status_counts),
        "scored_tasks": list(lq.scored_tasks),
        "review_tasks": list(lq.review_tasks),
        "single_tasks": list(lq.single_tasks),
        "annotators": annotators,
        "agreement": dict(lq.agreement),
        "agreement_tasks": lq.agreement_tasks,
    }
