"""Label review: the labeled images whose labels are most likely wrong go back to Label Studio.

`find_suspects` cross-fits the current dataset version (`loop.crossfit`, cached) and ranks its
train and val images with cleanlab (`loop.label_errors`). `push_review_tasks` sends the top
suspects to Label Studio as review tasks (`loop.labelstudio.review`): the current label as the
task's annotation beside the model's disagreeing boxes as a prediction of model version
``review:crossfit``, marked with ``review_*`` task data and listed in the "Label review" view.
A reviewer edits the annotation; the next pull (`loop.sync.pull`) takes the corrected label
into a new dataset version like any other, because a review task is a task of the ledger
(`loop.ledger.TaskLedger`) still naming its image.

What was pushed, with the suspect scores, is kept in ``<workspace>/label-review.json``
(`ReviewRecord`): one entry per run. The "seed" annotations (the current label, given to a task
that had no submitted annotation, e.g. an image whose labels were imported) are recorded there
too: a pull ignores a seed annotation nobody changed (`SeedAnnotations`), so an untouched review
task neither changes the dataset nor credits the label to the API token's user.

Images are keyed by sha256, tasks by Label Studio id; boxes are pixel xyxy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.datasets import DatasetVersion, LabeledImage
from loop.detections import Detections
from loop.errors import DatasetError, LabelStudioError, ServiceError
from loop.formats.labelstudio_review import REVIEW_MODEL_VERSION, review_fields
from loop.images import atomic_write_text
from loop.label_errors import (
    disagreeing_boxes,
    find_label_errors,
    label_checks,
    suspects_to_json,
)
from loop.labeling import PulledLabel

if TYPE_CHECKING:
    from loop.labelstudio import LabelStudioGateway
    from loop.labelstudio.review import ReviewPushSummary
    from loop.project import Project

_FORMAT = 1


@dataclass(frozen=True)
class Suspects:
    """The finder's verdict on one dataset ``version``: ``rows`` (every train and val image,
    most suspect first: `loop.label_errors.suspects_to_json` fields plus the pool ``source``)
    and the out-of-sample ``predictions`` (sha256 -> `Detections` with confidences)."""

    version: DatasetVersion
    rows: list[dict[str, Any]]
    predictions: dict[str, Detections]
    folds: int
    seed: int


def find_suspects(
    project: Project,
    folds: int,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
    use_cache: bool = True,
) -> Suspects:
    """Cross-fit ``folds`` models on the current version (`loop.crossfit.project_cross_fit`,
    cached under ``<workspace>/crossfit``) and rank its train and val images with cleanlab.
    ``seed``: fold assignment (None: ``label_review.seed``, else ``train.seed``).
    Raises `DatasetError` without a labeled version, `LabelQualityError` with fewer labeled
    images than ``folds``."""
    from loop.crossfit import project_cross_fit

    cfg = project.cfg
    if seed is None:
        seed = cfg.label_review.seed if cfg.label_review.seed is not None else cfg.train.seed
    version, oos = project_cross_fit(project, folds, seed, progress, use_cache=use_cache)
    predictions = {sha: o.predictions for sha, o in oos.items()}
    ranked = find_label_errors(label_checks(version, predictions), len(cfg.classes))
    rows = [
        {**row, "source": project.pool.get(row["sha256"]).source}
        for row in suspects_to_json(ranked, version)
    ]
    return Suspects(version, rows, predictions, folds, seed)


def shown_conf(project: Project) -> float:
    """The lowest confidence of a model box shown to reviewers."""
    cfg = project.cfg
    conf = cfg.label_review.shown_conf
    return cfg.select.preannotation_conf if conf is None else conf


# ------------------------------------------------------------------------------ the record
class ReviewRecord:
    """``<workspace>/label-review.json``: every review push, newest last::

        {"format": 1, "runs": [{"at", "version", "folds", "seed", "project_id", "view_id",
          "tasks": [{"sha256", "task_id", "rank", "quality", "issue", "overlooked", "swap",
                     "badloc", "flagged", "created", "seed_annotation", "model_boxes"}],
          "failures": {sha256: reason}}]}

    ``created``: the task was made for the review (the image had none); ``seed_annotation``:
    the id of the annotation holding the current label that the task got (None when a
    labeler's annotation was already there); ``model_boxes``: how many model boxes are shown.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"{path} (the label review record) is unreadable: {exc}; restore or delete it"
            ) from exc
        if not isinstance(doc, dict):
            raise DatasetError(f"{path} (the label review record) is not a JSON object")
        self.runs: list[dict[str, Any]] = list(doc.get("runs") or [])

    def add(self, run: dict[str, Any]) -> None:
        self.runs.append(run)
        atomic_write_text(self.path, json.dumps({"format": _FORMAT, "runs": self.runs}, indent=1))

    def latest(self) -> dict[str, Any] | None:
        return self.runs[-1] if self.runs else None

    def seed_annotations(self, project_id: int) -> dict[int, str]:
        """Annotation id -> sha256 of every seed annotation pushed to project ``project_id``."""
        out: dict[int, str] = {}
        for run in self.runs:
            if int(run.get("project_id", -1)) != int(project_id):
                continue
            for t in run.get("tasks") or []:
                if t.get("seed_annotation") is not None:
                    out[int(t["seed_annotation"])] = str(t["sha256"])
        return out


@dataclass(frozen=True)
class SeedAnnotations:
    """The seed annotations of one Label Studio project (see the module docstring)."""

    by_annotation: Mapping[int, str]
    classes: tuple[str, ...]

    @classmethod
    def load(cls, project: Project, project_id: int) -> SeedAnnotations:
        record = ReviewRecord(project.cfg.paths.label_review)
        return cls(record.seed_annotations(project_id), tuple(project.cfg.classes))

    def unchanged(self, lab: PulledLabel, rows: Mapping[str, LabeledImage]) -> bool:
        """True when ``lab`` is a seed annotation that still holds the image's current label
        (nobody edited it): a pull must not take it."""
        if self.by_annotation.get(int(lab.annotation_id)) != lab.sha256:
            return False
        row = rows.get(lab.sha256)
        if row is None:
            return False
        try:
            pulled = replace(row, boxes=lab.detections, polygons=lab.polygons)
        except DatasetError:
            return False
        classes = list(self.classes)
        return pulled.canonical(classes) == row.canonical(classes)


# ------------------------------------------------------------------------------ the push
def _ledger_tasks(project: Project, pid: int) -> dict[str, int]:
    from loop.sync import _ledger

    out: dict[str, int] = {}
    for t in _ledger(project, pid).tasks(pid):
        out[t.sha256] = max(t.task_id, out.get(t.sha256, -1))
    return out


def push_review_tasks(
    project: Project,
    gw: LabelStudioGateway,
    suspects: Suspects,
    top: int,
    progress: bool | None = None,
) -> ReviewPushSummary:
    """Push the ``top`` most suspect images of ``suspects`` as review tasks (see the module
    docstring) and record them: new tasks in the task ledger (so pulls accept their
    annotations), the run in `ReviewRecord`. Refuses suspects of another dataset version than
    the current one (`DatasetError`: the labels shown would be stale). Holds the workspace lock.
    Raises `ServiceError` / `LabelStudioError` when Label Studio fails; what was created before
    is recorded all the same, and running again completes it without duplicates."""
    from loop.labelstudio.review import ReviewItem
    from loop.sync import _ledger

    cfg = project.cfg
    with project.writing("label review push"):
        current = project.state.current_version
        if current != suspects.version.digest:
            raise DatasetError(
                f"the suspects were found in dataset version {suspects.version.short}, but the "
                f"current version is {str(current)[:12]}; run review-labels again"
            )
        pid = project.ensure_ls_project(gw)
        known = _ledger_tasks(project, pid)
        rows = suspects.version.by_sha()
        conf = shown_conf(project)
        chosen = suspects.rows[:top]
        items = []
        shown: dict[str, int] = {}
        for s in chosen:
            row = rows[s["sha256"]]
            model = disagreeing_boxes(row.boxes, suspects.predictions[s["sha256"]], conf)
            shown[row.sha256] = len(model)
            items.append(
                ReviewItem(
                    sha256=row.sha256,
                    image_url=project.image_url(row.sha256),
                    labels=row.boxes,
                    model_boxes=model,
                    fields=review_fields(
                        int(s["rank"]),
                        float(s["quality"]),
                        str(s["issue"]),
                        suspects.version.digest,
                    ),
                    quality=float(s["quality"]),
                    polygons=tuple(row.polygons),
                    task_id=known.get(row.sha256),
                )
            )
        urls = {it.sha256: it.image_url for it in items}

        def remember(summary: ReviewPushSummary) -> None:
            ledger = _ledger(project, pid)
            for sha, tid in summary.task_ids.items():
                ledger.record(pid, tid, sha, urls[sha])
            ledger.save()
            tasks = []
            for s in chosen:
                sha = s["sha256"]
                if sha not in summary.task_ids:
                    continue
                tasks.append(
                    {
                        **{
                            k: s[k]
                            for k in (
                                "sha256",
                                "rank",
                                "quality",
                                "issue",
                                "overlooked",
                                "swap",
                                "badloc",
                                "flagged",
                            )
                        },
                        "task_id": summary.task_ids[sha],
                        "created": known.get(sha) != summary.task_ids[sha],
                        "seed_annotation": summary.seeded.get(sha),
                        "model_boxes": shown[sha],
                    }
                )
            ReviewRecord(cfg.paths.label_review).add(
                {
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "version": suspects.version.digest,
                    "folds": suspects.folds,
                    "seed": suspects.seed,
                    "project_id": pid,
                    "view_id": summary.view_id,
                    "model_version": REVIEW_MODEL_VERSION,
                    "shown_conf": conf,
                    "tasks": tasks,
                    "failures": dict(summary.failures),
                }
            )

        try:
            summary = gw.push_review(pid, items, list(cfg.classes), progress=progress)
        except (ServiceError, LabelStudioError) as exc:
            partial = getattr(exc, "partial", None)
            if partial is not None and partial.task_ids:
                remember(partial)
            raise
        remember(summary)
        return summary


def review_url(base_url: str, project_id: int, view_id: int | None) -> str:
    """The Data Manager address of the "Label review" view (the project's when no view)."""
    url = f"{base_url.rstrip('/')}/projects/{int(project_id)}/data"
    return url if view_id is None else f"{url}?tab={int(view_id)}"
