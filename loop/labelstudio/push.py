"""Pushing pre-annotated tasks to Label Studio, best first (`Pushing`, part of
`LabelStudioGateway`).

Queue order: Label Studio's "Uncertainty sampling" serves the task with the LOWEST prediction
``score`` first, counting only predictions whose ``model_version`` equals the project's. `push`
stores ``score = 1 / (1 + priority)`` (priority >= 0) and sets the project's model_version, so the
most valuable task comes first; tasks already waiting get a new prediction when the model
version changes. The saved view "defect-loop: most valuable first" sorts by
``-tasks:data.priority`` for "Label All Tasks" from the Data Manager: both give the same order.
Task data: ``{"image": url, "sha256", "priority", "width", "height"}`` (`loop.formats.
labelstudio`), plus ``"overlap": n`` for a task chosen for n annotators, whose Label Studio
``overlap`` field is set to n right after the import (`loop.consensus`); a project never holds
two tasks with the same sha256.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loop.errors import (
    ConfigError,
    ConversionError,
    InvalidDetectionsError,
    LabelStudioError,
    ServiceError,
    UnknownLabelError,
)
from loop.formats.labelstudio_config import check_class_names
from loop.formats.labelstudio_regions import prediction_to_ls_results
from loop.labeling import PushItem, PushSummary
from loop.labelstudio.transport import (
    BULK_TIMEOUT_S,
    UNANNOTATED,
    Transport,
    progress_bar,
)

_MAX_OVERLAP = 20


def _data_overlap(data: dict[str, Any]) -> int:
    """The annotators a task's data asks for (``data.overlap`` written by push; 1 without)."""
    raw = data.get("overlap", 1)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= _MAX_OVERLAP:
        return 1
    return raw


@dataclass(frozen=True)
class _Existing:
    task_id: int
    data: dict[str, Any]
    model_versions: frozenset[str]
    labeled: bool
    overlap: int = 1  # Label Studio's per-task overlap


class Pushing(Transport):
    """Import tasks with predictions; refresh the predictions of tasks still waiting."""

    def task_ids(self, project_id: int) -> set[int]:
        """Ids of every task of the project."""
        return {int(t["id"]) for t in self._list_tasks_raw(project_id, "id") if "id" in t}

    def existing_sha256(self, project_id: int) -> dict[str, int]:
        """sha256 -> task id of every task in the project that carries ``data.sha256``."""
        out: dict[str, int] = {}
        for t in self._list_tasks_raw(project_id, "id,data"):
            sha = (t.get("data") or {}).get("sha256")
            if sha and t.get("id") is not None:
                out.setdefault(str(sha), int(t["id"]))
        return out

    def _existing_tasks(self, project_id: int) -> dict[str, _Existing]:
        """sha256 -> the task's id, data, prediction model versions and whether it is labeled.

        Two listings: every task's id and data (light), then the prediction model versions of
        the unlabeled ones only (the costly field; usually the short labeling queue)."""
        tasks = self._list_tasks_raw(project_id, "id,data,total_annotations,overlap")
        versions: dict[int, frozenset[str]] = {}
        if any(int(t.get("total_annotations") or 0) == 0 for t in tasks):
            for t in self._list_tasks_raw(
                project_id, "id,predictions_model_versions", fields="all", query=UNANNOTATED
            ):
                raw = t.get("predictions_model_versions") or ""
                names = raw.split(",") if isinstance(raw, str) else [str(v) for v in raw]
                versions[int(t["id"])] = frozenset(v.strip() for v in names if v.strip())
        out: dict[str, _Existing] = {}
        for t in tasks:
            data = t.get("data") or {}
            sha = data.get("sha256")
            if not sha or t.get("id") is None or str(sha) in out:
                continue
            tid = int(t["id"])
            labeled = int(t.get("total_annotations") or 0) > 0
            overlap = int(t.get("overlap") or 1)
            out[str(sha)] = _Existing(
                tid, dict(data), versions.get(tid, frozenset()), labeled, overlap
            )
        return out

    @staticmethod
    def _prediction(item: PushItem, model_version: str, class_names: list[str]) -> dict[str, Any]:
        priority = float(item.priority)
        if not math.isfinite(priority) or priority < 0:
            raise ConversionError(f"priority must be a finite number >= 0, got {item.priority}")
        return {
            "model_version": model_version,
            # Lowest score is served first by uncertainty sampling: see module docstring.
            "score": 1.0 / (1.0 + priority),
            # Region scores are the model's confidences (when the detections carry them);
            # a segmentation model's outlines go as polygons.
            "result": prediction_to_ls_results(item.detections, class_names),
        }

    @classmethod
    def _task_payload(
        cls, item: PushItem, model_version: str, class_names: list[str]
    ) -> dict[str, Any]:
        if not item.sha256:
            raise ConversionError("sha256 must not be empty")
        if not item.image_url:
            raise ConversionError("image_url must not be empty")
        if not 1 <= int(item.overlap) <= _MAX_OVERLAP:
            raise ConversionError(
                f"overlap must be 1-{_MAX_OVERLAP} annotators, got {item.overlap}"
            )
        prediction = cls._prediction(item, model_version, class_names)
        w, h = item.detections.image_wh
        data: dict[str, Any] = {
            "image": item.image_url,
            "sha256": item.sha256,
            "priority": float(item.priority),
            "width": int(w),
            "height": int(h),
        }
        if item.overlap > 1:
            data["overlap"] = int(item.overlap)  # the record of the choice, shown in the UI
        return {"data": data, "predictions": [prediction]}

    def push(
        self,
        project_id: int,
        items: list[PushItem],
        model_version: str,
        class_names: list[str],
        batch_size: int = 500,
        progress: bool | None = None,
    ) -> PushSummary:
        """Import ``items`` as pre-annotated tasks in the given order (most valuable first, so
        task ids ascend with rank), then set the project's ``model_version``.

        An item whose sha256 is already a task: if the task is still unlabeled and has no
        prediction of ``model_version``, it gets one (and its ``data.priority`` is updated):
        ``refreshed``; otherwise ``skipped``. Items that cannot be converted (bad class id,
        negative priority) are ``failed`` and listed in ``failures``. A retried batch re-checks
        which of its items arrived, so retries never duplicate tasks or predictions.

        ``progress``: a progress bar on stderr (None: only when stderr is a TTY).
        Raises `ServiceError` (unreachable) or `LabelStudioError` (refused) naming how far the
        push got; what was imported stays, and pushing again completes it without duplicates.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not model_version:
            raise ConfigError("model_version must not be empty")
        check_class_names(class_names)
        summary = PushSummary()
        existing = self._existing_tasks(project_id) if items else {}
        new: list[tuple[str, dict[str, Any]]] = []
        refresh: list[tuple[str, _Existing, dict[str, Any], float]] = []
        seen: set[str] = set()
        for item in items:
            if item.sha256 in seen:
                summary.skipped += 1
                continue
            seen.add(item.sha256)
            old = existing.get(item.sha256)
            if old is not None and old.data.get("image") != item.image_url:
                # Same sha256, another image: the task was edited (or made) outside defect-loop.
                summary.failed += 1
                summary.failures[item.sha256] = (
                    f"task {old.task_id} claims this image's sha256 but shows "
                    f"{old.data.get('image')!r}, not {item.image_url!r}: it was changed outside "
                    "defect-loop; delete it in Label Studio and push again"
                )
                continue
            if old is not None and not old.labeled and _data_overlap(old.data) > old.overlap:
                # A push interrupted between the import and setting the overlap: finish it.
                self._set_overlap(old.task_id, _data_overlap(old.data))
            if old is not None and (old.labeled or model_version in old.model_versions):
                summary.skipped += 1
                summary.task_ids[item.sha256] = old.task_id
                continue
            try:
                if old is None:
                    new.append((item.sha256, self._task_payload(item, model_version, class_names)))
                else:
                    pred = self._prediction(item, model_version, class_names)
                    refresh.append((item.sha256, old, pred, float(item.priority)))
            except (ConversionError, UnknownLabelError, InvalidDetectionsError) as exc:
                summary.failed += 1
                summary.failures[item.sha256] = str(exc)

        total = len(new) + len(refresh)
        try:
            with progress_bar(total, "push to Label Studio", progress) as advance:
                self._import_new(project_id, new, batch_size, summary, advance)
                self._refresh(project_id, refresh, model_version, batch_size, summary, advance)
        except (ServiceError, LabelStudioError) as exc:
            err: Any = type(exc)(
                f"push interrupted after {summary.created} of {len(new)} new tasks and "
                f"{summary.refreshed} of {len(refresh)} refreshed predictions: {exc}. "
                "What was imported stays in Label Studio: run the push again when the server is "
                "back; images already there are skipped, so nothing is duplicated"
            )
            err.partial = summary  # what arrived before the failure, for the caller to record
            raise err from exc
        if summary.created or summary.refreshed or items:
            self._call(
                "set the project's model_version",
                lambda: self._client.projects.update(project_id, model_version=model_version),
            )
        return summary

    def _import_new(
        self,
        project_id: int,
        pending: list[tuple[str, dict[str, Any]]],
        batch_size: int,
        summary: PushSummary,
        advance: Callable[[int], None],
    ) -> None:
        for start in range(0, len(pending), batch_size):
            state: dict[str, Any] = {"batch": pending[start : start + batch_size]}

            def recheck(state: dict[str, Any] = state) -> None:
                # A timed-out or failed request may still have been committed: drop what arrived.
                now = self.existing_sha256(project_id)
                keep = []
                for sha, payload in state["batch"]:
                    if sha in now:
                        summary.created += 1
                        summary.task_ids[sha] = now[sha]
                        self._set_overlap(now[sha], _data_overlap(payload["data"]))
                        advance(1)
                    else:
                        keep.append((sha, payload))
                state["batch"] = keep

            def do_import(state: dict[str, Any] = state) -> list[int]:
                if not state["batch"]:
                    return []
                resp = self._raw(
                    "POST",
                    f"api/projects/{int(project_id)}/import",
                    params={"return_task_ids": "true"},
                    body=[p for _, p in state["batch"]],
                    timeout_s=BULK_TIMEOUT_S,
                )
                return [int(i) for i in (resp.json().get("task_ids") or [])]

            n = len(state["batch"])
            task_ids = self._call(f"import {n} tasks", do_import, before_retry=recheck)
            done = state["batch"]
            if len(task_ids) != len(done):
                raise LabelStudioError(
                    f"Label Studio imported {len(task_ids)} tasks for {len(done)} items; check "
                    f"project {project_id} and push again (present images are skipped)"
                )
            for (sha, payload), tid in zip(done, task_ids, strict=True):
                summary.task_ids[sha] = tid
                self._set_overlap(tid, _data_overlap(payload["data"]))
            summary.created += len(done)
            advance(len(done))

    def _set_overlap(self, task_id: int, overlap: int) -> None:
        """Set a new task's Label Studio ``overlap`` (the distinct annotators it needs before it
        counts as labeled and leaves the queue). The import API ignores the field, so it is
        PATCHed right after the import, before anyone can annotate: Label Studio 1.23 does not
        recompute ``is_labeled`` when the overlap of an annotated task changes."""
        if overlap > 1:
            self._json(
                f"set the overlap of task {task_id}",
                "PATCH",
                f"api/tasks/{int(task_id)}",
                body={"overlap": int(overlap)},
            )

    def _refresh(
        self,
        project_id: int,
        pending: list[tuple[str, _Existing, dict[str, Any], float]],
        model_version: str,
        batch_size: int,
        summary: PushSummary,
        advance: Callable[[int], None],
    ) -> None:
        for start in range(0, len(pending), batch_size):
            state: dict[str, Any] = {"batch": pending[start : start + batch_size]}

            def recheck(state: dict[str, Any] = state) -> None:
                now = self._existing_tasks(project_id)
                keep = []
                for entry in state["batch"]:
                    cur = now.get(entry[0])
                    if cur is not None and model_version in cur.model_versions:
                        self._finish_refresh(entry, summary, advance)
                    else:
                        keep.append(entry)
                state["batch"] = keep

            def do_import(state: dict[str, Any] = state) -> None:
                if state["batch"]:
                    self._raw(
                        "POST",
                        f"api/projects/{int(project_id)}/import/predictions",
                        body=[{"task": old.task_id, **pred} for _, old, pred, _ in state["batch"]],
                        timeout_s=BULK_TIMEOUT_S,
                    )

            n = len(state["batch"])
            self._call(f"import {n} predictions", do_import, before_retry=recheck)
            for entry in state["batch"]:
                self._finish_refresh(entry, summary, advance)

    def _finish_refresh(
        self,
        entry: tuple[str, _Existing, dict[str, Any], float],
        summary: PushSummary,
        advance: Callable[[int], None],
    ) -> None:
        sha, old, _, priority = entry
        if float(old.data.get("priority", math.nan)) != priority:
            # Keep the priority view in step with the new prediction score.
            data = {**old.data, "priority": priority}
            self._json(
                f"update the priority of task {old.task_id}",
                "PATCH",
                f"api/tasks/{old.task_id}",
                body={"data": data},
            )
        summary.refreshed += 1
        summary.task_ids[sha] = old.task_id
        advance(1)
