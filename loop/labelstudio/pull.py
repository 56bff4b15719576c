"""Pulling annotations back from Label Studio (`Pulling`, part of `LabelStudioGateway`).

Pull is incremental: a cursor on the tasks' ``updated_at`` (an annotation created, updated or
deleted bumps it) selects what changed; tasks whose annotations were all deleted are reported in
``unlabeled_task_ids`` so that their labels can be dropped. What an exported task means (label,
rejection, skip) is decided by the pure rules of `loop.formats.labelstudio_pull.judge_task`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from loop.errors import ConfigError, LabelStudioError
from loop.formats.labelstudio import format_cursor, parse_time, task_key
from loop.formats.labelstudio_config import check_class_names
from loop.formats.labelstudio_pull import judge_task
from loop.keypoints import KeypointNames
from loop.labeling import PullResult
from loop.labelstudio.brush import rle_to_mask
from loop.labelstudio.transport import BULK_TIMEOUT_S, UNANNOTATED, Transport

_EXPORT_IDS_PER_CALL = 400  # keeps the query string of `?ids[]=...` well under 8 KB


class Pulling(Transport):
    """Export what changed and judge it task by task."""

    def _user_emails(self) -> dict[int, str]:
        if self._users is None:
            try:
                users = self._call("list users", lambda: self._client.users.list())
                self._users = {int(u.id): str(u.email) for u in users if u.id is not None}
            except LabelStudioError:
                self._users = {}
        return self._users

    def export_tasks(
        self, project_id: int, ids: Sequence[int] | None = None, all_tasks: bool = False
    ) -> list[dict[str, Any]]:
        """Label Studio's JSON export (one bulk call, or one per 400 ``ids``): the tasks with at
        least one annotation (``all_tasks``: every task), restricted to ``ids`` when given."""

        def fetch(chunk: Sequence[int] | None) -> list[dict[str, Any]]:
            params: dict[str, Any] = {"exportType": "JSON"}
            if all_tasks:
                params["download_all_tasks"] = "true"
            if chunk is not None:
                params["ids[]"] = [int(i) for i in chunk]
            resp = self._raw(
                "GET",
                f"api/projects/{int(project_id)}/export",
                params=params,
                timeout_s=BULK_TIMEOUT_S,
            )
            try:
                data = json.loads(resp.content)
            except ValueError as exc:
                raise LabelStudioError(f"Label Studio export is not JSON: {exc}") from exc
            if not isinstance(data, list):
                raise LabelStudioError("Label Studio export is not a list of tasks")
            return data

        if ids is None:
            return self._call("export annotations", lambda: fetch(None))
        out: list[dict[str, Any]] = []
        ids = list(ids)
        for start in range(0, len(ids), _EXPORT_IDS_PER_CALL):
            chunk = ids[start : start + _EXPORT_IDS_PER_CALL]
            out.extend(self._call(f"export {len(chunk)} tasks", functools.partial(fetch, chunk)))
        return out

    def latest_update(self, project_id: int) -> str | None:
        """The newest task ``updated_at`` of the project as a pull cursor (None: no tasks)."""
        tasks = self._list_tasks_raw(
            project_id, "id,updated_at", query={"ordering": ["-tasks:updated_at"]}, limit=1
        )
        when = parse_time(tasks[0].get("updated_at")) if tasks else None
        return None if when is None else format_cursor(when)

    def changed_since(self, project_id: int, since: str) -> list[tuple[int, datetime]]:
        """``(task id, time)`` of the tasks changed strictly after the cursor ``since``: updated
        (an annotation created, updated or deleted, a prediction added, data edited) or given
        an annotation newer than it (``completed_at``: Label Studio 1.23 stores some malformed
        annotations with an error answer and without bumping the task's ``updated_at``).
        ``time`` is the later of the two."""
        when = parse_time(since)
        if when is None:
            raise ConfigError(f"pull cursor {since!r} is not an ISO time; drop it to pull all")
        query = {
            "filters": {
                "conjunction": "or",
                "items": [
                    {
                        "filter": f"filter:tasks:{name}",
                        "operator": "greater",
                        "type": "Datetime",
                        "value": format_cursor(when),
                    }
                    for name in ("updated_at", "completed_at")
                ],
            },
            "ordering": ["tasks:id"],
        }
        out = []
        for t in self._list_tasks_raw(project_id, "id,updated_at,completed_at", query=query):
            times = [parse_time(t.get(k)) for k in ("updated_at", "completed_at")]
            known = [x for x in times if x is not None]
            if t.get("id") is not None and known:
                out.append((int(t["id"]), max(known)))
        return out

    def unannotated_task_ids(self, project_id: int) -> list[int]:
        """Ids of the tasks with no submitted (non-cancelled) annotation."""
        return [int(t["id"]) for t in self._list_tasks_raw(project_id, "id", query=UNANNOTATED)]

    def uncounted_annotation_task_ids(self, project_id: int) -> list[int]:
        """Ids of the tasks that Label Studio counts as unannotated although they hold a
        non-cancelled annotation: one stored by a request that failed half-way (Label Studio
        1.23 answers 500 for some malformed results, keeps the annotation, and updates neither
        the task's counters nor its ``updated_at``). No cursor would ever select them."""
        out = []
        for t in self._list_tasks_raw(
            project_id,
            "id,annotations_ids,cancelled_annotations",
            fields="all",
            query=UNANNOTATED,
        ):
            raw = t.get("annotations_ids")
            ids = raw.split(",") if isinstance(raw, str) else list(raw or [])
            n = sum(1 for i in ids if str(i).strip())
            if t.get("id") is not None and n > int(t.get("cancelled_annotations") or 0):
                out.append(int(t["id"]))
        return out

    def pull(
        self,
        project_id: int,
        class_names: list[str],
        *,
        since: str | None = None,
        known_labeled: Mapping[int, str] | None = None,
        document_root: Path | None = None,
        full_export_above: int = 2000,
        max_regions: int | None = None,
        polygons: bool = False,
        keypoints: KeypointNames | None = None,
    ) -> PullResult:
        """Ground truth from the tasks annotated, changed or un-annotated since the cursor.

        ``since``: the ``cursor`` of the previous `PullResult` (None: every annotated task, one
        bulk export). Changed tasks are exported by id (or, above ``full_export_above`` of them,
        with one bulk export). ``known_labeled``: task id -> sha256 of the labels already taken
        from this project; those whose annotations are all gone now are listed in
        ``unlabeled_task_ids``/``unlabeled_sha256``. ``document_root``: refuse image paths that
        resolve outside it. ``polygons``: keep polygon regions as pixel polygons and brush
        regions as the polygons of their painted pixels (decoded by label-studio-sdk,
        `loop.labelstudio.brush`; `segment` projects); otherwise each polygon becomes its bounding
        box. ``keypoints``: the config's keypoint names per class: keypoint regions are kept
        per instance (`loop.formats.labelstudio_regions.ls_results_to_keypoints`).

        Each exported task is judged by the pull rules (`loop.formats.labelstudio_pull.judge_task`):
        a usable one goes to ``labels``; one that cannot be used goes to ``rejected`` with its
        task id and the reason, never blocking the others; one whose annotations were all
        cancelled goes to ``skipped_task_ids``.
        """
        check_class_names(class_names)
        out = PullResult()
        # Annotations Label Studio stored but does not count (see the method): judged each time.
        uncounted = self.uncounted_annotation_task_ids(project_id)
        if since is None:
            out.cursor = self.latest_update(project_id)  # before the export: nothing is missed
            tasks = self.export_tasks(project_id)
            exported = {task_key(t) for t in tasks}
            missing = [i for i in uncounted if i not in exported]
            if missing:
                tasks += self.export_tasks(project_id, ids=missing, all_tasks=True)
        else:
            changed = self.changed_since(project_id, since)
            out.full = False
            newest = max((u for _, u in changed), default=parse_time(since))
            out.cursor = since if newest is None else format_cursor(newest)
            ids = sorted({i for i, _ in changed} | set(uncounted))
            if not ids:
                tasks = []
            elif len(ids) > full_export_above:
                wanted = set(ids)
                tasks = [t for t in self.export_tasks(project_id) if task_key(t) in wanted]
            else:
                tasks = self.export_tasks(project_id, ids=ids, all_tasks=True)
        users = self._user_emails() if tasks else {}
        for task in sorted((t for t in tasks if isinstance(t, dict)), key=task_key):
            if task_key(task) < 0:
                continue  # not a task (an export always gives ids): nothing to name or report
            out.examined_task_ids.append(task_key(task))
            verdict = judge_task(
                task,
                class_names,
                users,
                document_root,
                max_regions,
                polygons=polygons,
                keypoints=keypoints,
                brush=rle_to_mask if polygons else None,
            )
            if verdict.label is not None:
                out.labels.append(verdict.label)
            elif verdict.rejected is not None:
                out.rejected.append(verdict.rejected)
            elif verdict.skipped:
                out.skipped_task_ids.append(verdict.task_id)
        if known_labeled:
            # A task judged now holds a submitted annotation, counted by Label Studio or not.
            judged = {r.task_id for r in out.rejected} | {lb.task_id for lb in out.labels}
            for tid in self.unannotated_task_ids(project_id):
                if tid in known_labeled and tid not in judged:
                    out.unlabeled_task_ids.append(tid)
                    out.unlabeled_sha256.append(str(known_labeled[tid]))
        return out
