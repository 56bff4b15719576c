"""Label review tasks: suspect labels back to Label Studio (`Reviewing`, part of
`LabelStudioGateway`).

What a review task shows is decided by `loop.formats.labelstudio_review`; here it is written:
an image's existing task is marked (its data gains the ``review_*`` fields; data.image and
data.sha256 are kept, so pulls still accept it), an image without a task gets one; a task
without a submitted annotation gets the current label as a "seed" annotation (not ground truth,
so it never outranks the reviewer's); earlier review predictions of the task are replaced by the
model's current boxes; and the saved view "Label review" lists the review tasks, most suspect
first. Measured on Label Studio 1.23.2: importing tasks (with or without annotations) and
``import/predictions`` leave the project's ``model_version`` as it was (so the labeling queue's
pre-annotations and order are untouched); importing an annotation makes it ground truth unless
told otherwise; a data PATCH bumps the task's ``updated_at``; ``GET /api/tasks/<id>`` (the Data
Manager's task view) returns every prediction, the labeling stream only those of the project's
model version (review tasks are labeled, so the stream never serves them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loop.detections import Detections
from loop.errors import ConversionError, LabelStudioError, ServiceError, UnknownLabelError
from loop.formats.labelstudio_config import check_class_names
from loop.formats.labelstudio_review import (
    REVIEW_MODEL_VERSION,
    REVIEW_VIEW_TITLE,
    labels_to_ls_results,
    review_prediction,
    review_view,
)
from loop.labelstudio.push import Pushing
from loop.labelstudio.transport import BULK_TIMEOUT_S, progress_bar
from loop.polygons import Rings


@dataclass(frozen=True)
class ReviewItem:
    """One suspect image to review.

    ``labels``/``polygons``: its current label (pixel boxes; ``()`` or one `Rings` per box).
    ``model_boxes``: the out-of-sample model boxes shown beside it (with confidences, already
    filtered to what the reviewer should see). ``fields``: its ``review_*`` task data
    (`loop.formats.labelstudio_review.review_fields`). ``quality``: the label quality score.
    ``task_id``: the task this workspace pushed for the image (its ledger), or None.
    """

    sha256: str
    image_url: str
    labels: Detections
    model_boxes: Detections
    fields: dict[str, Any]
    quality: float
    polygons: tuple[Rings, ...] = ()
    task_id: int | None = None


@dataclass
class ReviewPushSummary:
    """Outcome of `Reviewing.push_review`. ``created``: new tasks (images without one);
    ``flagged``: existing tasks marked for review; ``seeded``: sha256 -> id of the annotation
    holding the current label that a task without one got; ``task_ids``: sha256 -> task id of
    every review task; ``failures``: sha256 -> why that image got no review task;
    ``view_id``: the "Label review" view."""

    created: int = 0
    flagged: int = 0
    seeded: dict[str, int] = field(default_factory=dict)
    task_ids: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    view_id: int | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)


class Reviewing(Pushing):
    """Create or mark review tasks (see the module docstring)."""

    def push_review(
        self,
        project_id: int,
        items: list[ReviewItem],
        class_names: list[str],
        progress: bool | None = None,
    ) -> ReviewPushSummary:
        """Make every item a review task of ``project_id`` (see the module docstring).

        An item whose image already has a task: the task must be the item's ``task_id`` (the one
        this workspace pushed) and still show ``image_url``; otherwise the item fails (a task
        made or edited outside defect-loop is never touched). An item with a ``task_id`` whose
        task is gone gets a new task. Re-running marks the same tasks again (no duplicates) and
        replaces their review predictions. Raises `ServiceError` or `LabelStudioError` with
        ``partial`` (the summary so far) attached, so the caller can record the tasks created.
        """
        check_class_names(class_names)
        summary = ReviewPushSummary()
        existing = self._existing_tasks(project_id) if items else {}
        new: list[ReviewItem] = []
        flag: list[tuple[ReviewItem, int, dict[str, Any], bool]] = []
        seeds: dict[str, list[dict[str, Any]]] = {}
        preds: dict[str, dict[str, Any]] = {}
        for item in items:
            old = existing.get(item.sha256)
            if old is not None and item.task_id != old.task_id:
                summary.failures[item.sha256] = (
                    f"task {old.task_id} holds this image but defect-loop did not push it; "
                    "delete it in Label Studio (its annotations are never used) and run "
                    "review-labels again"
                )
                continue
            if old is not None and old.data.get("image") != item.image_url:
                summary.failures[item.sha256] = (
                    f"task {old.task_id} claims this image's sha256 but shows "
                    f"{old.data.get('image')!r}, not {item.image_url!r}: it was changed outside "
                    "defect-loop; restore data.image or delete the task"
                )
                continue
            try:
                if old is None or not old.labeled:
                    seeds[item.sha256] = labels_to_ls_results(
                        item.labels, item.polygons, class_names
                    )
                preds[item.sha256] = review_prediction(
                    0, item.model_boxes, item.quality, class_names
                )
            except (ConversionError, UnknownLabelError) as exc:
                summary.failures[item.sha256] = str(exc)
                seeds.pop(item.sha256, None)
                continue
            if old is None:
                new.append(item)
            else:
                flag.append((item, old.task_id, old.data, old.labeled))

        total = len(new) + len(flag)
        try:
            with progress_bar(total, "review tasks to Label Studio", progress) as advance:
                self._create_review_tasks(project_id, new, summary, advance)
                for item, tid, data, _ in flag:
                    self._json(
                        f"mark task {tid} for review",
                        "PATCH",
                        f"api/tasks/{tid}",
                        body={"data": {**data, **item.fields}},
                    )
                    summary.task_ids[item.sha256] = tid
                    summary.flagged += 1
                    advance(1)
                for sha, result in seeds.items():
                    tid = summary.task_ids[sha]
                    summary.seeded[sha] = self._seed_annotation(tid, result)
                self._replace_review_predictions(
                    project_id,
                    [{**preds[sha], "task": tid} for sha, tid in summary.task_ids.items()],
                )
            summary.view_id = self.ensure_label_review_view(project_id)
        except (ServiceError, LabelStudioError) as exc:
            err: Any = type(exc)(
                f"review push interrupted after {summary.created} of {len(new)} new tasks and "
                f"{summary.flagged} of {len(flag)} marked tasks: {exc}. Run review-labels "
                "again when the server is back: it marks the same tasks, without duplicates"
            )
            err.partial = summary
            raise err from exc
        return summary

    def _create_review_tasks(
        self,
        project_id: int,
        items: list[ReviewItem],
        summary: ReviewPushSummary,
        advance: Callable[[int], None],
    ) -> None:
        if not items:
            return
        state: dict[str, Any] = {"todo": list(items)}

        def recheck() -> None:
            # A failed request may still have been committed: keep only what did not arrive.
            now = self.existing_sha256(project_id)
            keep = []
            for it in state["todo"]:
                if it.sha256 in now:
                    summary.task_ids[it.sha256] = now[it.sha256]
                    summary.created += 1
                    advance(1)
                else:
                    keep.append(it)
            state["todo"] = keep

        def do_import() -> list[int]:
            if not state["todo"]:
                return []
            body = [
                {
                    "data": {
                        "image": it.image_url,
                        "sha256": it.sha256,
                        "width": int(it.labels.image_wh[0]),
                        "height": int(it.labels.image_wh[1]),
                        **it.fields,
                    }
                }
                for it in state["todo"]
            ]
            resp = self._raw(
                "POST",
                f"api/projects/{int(project_id)}/import",
                params={"return_task_ids": "true"},
                body=body,
                timeout_s=BULK_TIMEOUT_S,
            )
            return [int(i) for i in (resp.json().get("task_ids") or [])]

        ids = self._call(f"import {len(items)} review tasks", do_import, before_retry=recheck)
        done = state["todo"]
        if len(ids) != len(done):
            raise LabelStudioError(
                f"Label Studio imported {len(ids)} tasks for {len(done)} review items; check "
                f"project {project_id} and run review-labels again"
            )
        for it, tid in zip(done, ids, strict=True):
            summary.task_ids[it.sha256] = tid
            summary.created += 1
            advance(1)

    def _seed_annotation(self, task_id: int, result: list[dict[str, Any]]) -> int:
        """The current label as task ``task_id``'s annotation (as the token's user; not ground
        truth, so a reviewer's own annotation wins); its id."""
        created = self._json(
            f"annotate review task {task_id} with its current label",
            "POST",
            f"api/tasks/{int(task_id)}/annotations",
            body={"result": result, "ground_truth": False, "was_cancelled": False},
        )
        if not isinstance(created, dict) or created.get("id") is None:
            raise LabelStudioError(f"Label Studio annotated task {task_id} but returned no id")
        return int(created["id"])

    def _replace_review_predictions(
        self, project_id: int, predictions: list[dict[str, Any]]
    ) -> None:
        """Delete the earlier `REVIEW_MODEL_VERSION` predictions of these tasks, then import
        ``predictions`` (one call; before a retry the deletion runs again, so a request that was
        committed after all leaves no duplicates)."""
        if not predictions:
            return

        def delete_old() -> None:
            for p in predictions:
                tid = int(p["task"])
                old = self._json(
                    f"list the predictions of task {tid}",
                    "GET",
                    "api/predictions",
                    params={"task": tid},
                )
                for o in old or []:
                    if o.get("model_version") == REVIEW_MODEL_VERSION and o.get("id") is not None:
                        self._json(
                            f"delete an old review prediction of task {tid}",
                            "DELETE",
                            f"api/predictions/{int(o['id'])}",
                        )

        delete_old()
        self._call(
            f"import {len(predictions)} review predictions",
            lambda: self._raw(
                "POST",
                f"api/projects/{int(project_id)}/import/predictions",
                body=predictions,
                timeout_s=BULK_TIMEOUT_S,
            ),
            before_retry=delete_old,
        )

    def ensure_label_review_view(self, project_id: int) -> int:
        """Get, fix or create the Data Manager view "Label review": the review tasks, most
        suspect first. Returns its id."""
        views = self._json("list views", "GET", "api/dm/views", params={"project": int(project_id)})
        data = review_view()
        for v in views or []:
            vdata = v.get("data") or {}
            if vdata.get("title") == REVIEW_VIEW_TITLE:
                if any(vdata.get(k) != data[k] for k in ("ordering", "filters")):
                    self._json(
                        "update the label review view",
                        "PATCH",
                        f"api/dm/views/{int(v['id'])}",
                        body={"project": int(project_id), "data": {**vdata, **data}},
                    )
                return int(v["id"])
        created = self._json(
            "create the label review view",
            "POST",
            "api/dm/views",
            body={"project": int(project_id), "data": data},
        )
        return int(created["id"])
