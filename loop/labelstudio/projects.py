"""Setting up the Label Studio project: labeling config, instructions, the priority view, the
review queue view, overlap settings, the images' local storage and webhooks (`ProjectSetup`,
part of `LabelStudioGateway`).

Overlap in Label Studio 1.23 OSS, as checked against the server: ``maximum_annotations`` with
``overlap_cohort_percentage`` < 100 lets the server choose (and re-choose on every import) which
tasks need several annotators; a task's own ``overlap`` is ignored on import but can be PATCHed,
and the next-task logic honours it (a task stays unlabeled until that many annotators submitted
it; ``show_overlap_first`` serves such tasks first). defect-loop therefore keeps one annotation
per task at project level and sets ``overlap`` per chosen task (`loop.labelstudio.push`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from label_studio_sdk.core.api_error import ApiError

from loop.errors import LabelStudioError
from loop.formats.labelstudio import BRUSH_NAME, KEYPOINT_NAME
from loop.formats.labelstudio_config import (
    classes_from_label_config,
    has_control,
    has_polygons,
    instructions_html,
    label_config_xml,
)
from loop.keypoints import KeypointNames
from loop.labelstudio.transport import Transport

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
STORAGE_TITLE = "defect-loop images"
PRIORITY_VIEW_TITLE = "defect-loop: most valuable first"
PRIORITY_ORDERING = ["-tasks:data.priority"]
REVIEW_VIEW_TITLE = "defect-loop: review queue"
# Annotation events a webhook subscribes to (see `LabelStudioGateway.ensure_webhook`).
WEBHOOK_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
)

_DESCRIPTION_PREFIX = "Surface-defect boxes, managed by defect-loop."


class ProjectSetup(Transport):
    """Get or create the project and keep its set-up in line with the config."""

    def _find_project(self, title: str) -> Any | None:
        projects: list[Any] = self._call(
            f"list projects titled {title!r}",
            lambda: list(self._client.projects.list(title=title, page_size=100)),
        )
        matches = [p for p in projects if p.title == title]
        if len(matches) > 1:
            ids = sorted(int(p.id) for p in matches)
            raise LabelStudioError(
                f"{len(matches)} Label Studio projects are titled {title!r} (ids {ids}); rename "
                "or delete all but one"
            )
        return matches[0] if matches else None

    def _get_project(self, project_id: int) -> Any | None:
        """The project, or None when it does not exist (deleted)."""
        try:
            return self._call(
                f"read project {project_id}", lambda: self._client.projects.get(project_id)
            )
        except LabelStudioError as exc:
            if isinstance(exc.__cause__, ApiError) and exc.__cause__.status_code == 404:
                return None
            raise

    @staticmethod
    def _identity(title: str) -> str:
        return f"{_DESCRIPTION_PREFIX} Identity: {title}"

    def ensure_project(
        self,
        title: str,
        class_names: list[str],
        instructions: str = "",
        *,
        polygons: bool = False,
        project_id: int | None = None,
        brush: bool = False,
        keypoints: KeypointNames | None = None,
    ) -> int:
        """Get or create the project and bring its set-up in line with the config; returns its id.

        Identity: ``project_id`` (e.g. remembered from an earlier run) when that project still
        exists and carries this title's identity in its description, so a project renamed in the
        UI is still found; otherwise the project titled ``title``; otherwise a new one (uncertainty
        sampling, predictions shown to labelers, empty annotations allowed = defect-free, the
        instructions shown before labeling). Also ensures the "most valuable first" view.

        The class list may only GROW at its end (new classes get the next ids; the label config
        is updated); any other change (removal, renaming, reordering) raises `LabelStudioError`.
        """
        xml = label_config_xml(
            class_names, instructions, polygons, brush=brush, keypoints=keypoints
        )
        expert = instructions_html(
            class_names, instructions, polygons, brush=brush, keypoints=keypoints
        )
        identity = self._identity(title)
        project = None
        if project_id is not None:
            project = self._get_project(int(project_id))
            if project is not None and (project.description or "") != identity:
                project = None
        if project is None:
            found = self._find_project(title)
            if found is not None:
                pid = int(found.id)
                project = self._call("read a project", lambda: self._client.projects.get(pid))
        if project is None or project.id is None:
            pid = self._create_project(title, xml, expert, identity)
        else:
            pid = int(project.id)
            self._reconcile_project(project, title, class_names, xml, expert, identity)
        self.ensure_priority_view(pid)
        return pid

    def _create_project(self, title: str, xml: str, expert: str, identity: str) -> int:
        created = self._call(
            f"create project {title!r}",
            lambda: self._client.projects.create(
                title=title,
                label_config=xml,
                description=identity,
                expert_instruction=expert,
                show_instruction=True,
                sampling=UNCERTAINTY_SAMPLING,
                show_collab_predictions=True,
                enable_empty_annotation=True,
                show_skip_button=True,
                maximum_annotations=1,
            ),
        )
        if created.id is None:
            raise LabelStudioError(f"Label Studio created project {title!r} but returned no id")
        return int(created.id)

    def _reconcile_project(
        self,
        project: Any,
        title: str,
        class_names: list[str],
        xml: str,
        expert: str,
        identity: str,
    ) -> None:
        pid = int(project.id)
        existing = classes_from_label_config(project.label_config or "")
        wanted = list(class_names)
        if existing != wanted and wanted[: len(existing)] != existing:
            removed = [c for c in existing if c not in wanted]
            detail = f"removed {removed}" if removed else "renamed or reordered classes"
            raise LabelStudioError(
                f"Label Studio project {title!r} (id {pid}) has classes {existing}, but the "
                f"config lists {wanted} ({detail}). Class ids are fixed for the life of a "
                "project: only ADDING classes at the end of the list is allowed. Restore the "
                "original class list (append new ones at the end), or set "
                "labelstudio.project_title to start a new project"
            )
        changes: dict[str, Any] = {}
        if (project.label_config or "").strip() != xml.strip():
            changes["label_config"] = xml  # same classes, more classes, or new instructions
        if (project.expert_instruction or "").strip() != expert.strip():
            changes["expert_instruction"] = expert
        if not project.show_instruction:
            changes["show_instruction"] = True
        if (project.description or "") != identity:
            changes["description"] = identity
        if changes:
            what = "update the labeling config" if "label_config" in changes else "update a project"
            self._call(what, lambda: self._client.projects.update(pid, **changes))

    def project_info(self, project_id: int) -> dict[str, Any]:
        """``{"id", "title", "model_version", "sampling", "task_number", "classes", "polygons",
        "brush", "keypoints",
        "show_instruction", "expert_instruction", "label_config"}``."""
        p = self._call("read a project", lambda: self._client.projects.get(project_id))
        xml = p.label_config or ""
        return {
            "id": int(project_id),
            "title": p.title,
            "model_version": p.model_version or "",
            "sampling": p.sampling,
            "task_number": p.task_number,
            "classes": classes_from_label_config(xml),
            "polygons": has_polygons(xml),
            "brush": has_control(xml, "BrushLabels", BRUSH_NAME),
            "keypoints": has_control(xml, "KeyPointLabels", KEYPOINT_NAME),
            "show_instruction": bool(p.show_instruction),
            "expert_instruction": p.expert_instruction or "",
            "label_config": xml,
        }

    def ensure_priority_view(self, project_id: int) -> int:
        """Get, fix or create the Data Manager view "defect-loop: most valuable first" ordered by
        ``-tasks:data.priority`` (what "Label All Tasks" follows from that tab). Returns its id."""
        views = self._json("list views", "GET", "api/dm/views", params={"project": int(project_id)})
        data = {"title": PRIORITY_VIEW_TITLE, "ordering": PRIORITY_ORDERING}
        for v in views or []:
            vdata = v.get("data") or {}
            if vdata.get("title") == PRIORITY_VIEW_TITLE:
                if vdata.get("ordering") != PRIORITY_ORDERING:
                    merged = {**vdata, **data}
                    self._json(
                        "update the priority view",
                        "PATCH",
                        f"api/dm/views/{int(v['id'])}",
                        body={"project": int(project_id), "data": merged},
                    )
                return int(v["id"])
        created = self._json(
            "create the priority view",
            "POST",
            "api/dm/views",
            body={"project": int(project_id), "data": data},
        )
        return int(created["id"])

    def ensure_overlap_settings(self, project_id: int, overlap_first: bool) -> None:
        """Make the project fit per-task overlap (`loop.consensus`): Label Studio's own
        "show overlap first" set to ``overlap_first``. A project whose "annotations per task"
        is above 1 with an overlap cohort below 100 % is refused (`LabelStudioError`): Label
        Studio 1.23 then re-draws which tasks get overlap on every import, by its own rule,
        overwriting the tasks chosen by ``quality.overlap_rule``."""
        p = self._call("read a project", lambda: self._client.projects.get(project_id))
        if int(p.maximum_annotations or 1) > 1 and int(p.overlap_cohort_percentage or 100) < 100:
            raise LabelStudioError(
                f"Label Studio project {project_id} has {p.maximum_annotations} annotations per "
                f"task for {p.overlap_cohort_percentage} % of the tasks: Label Studio would "
                "re-draw the overlap of every task on each import. Set the overlap cohort to "
                "100 % (Settings > Quality) and let quality.overlap_share choose the tasks"
            )
        if bool(p.show_overlap_first) != overlap_first:
            self._call(
                "set show overlap first",
                lambda: self._client.projects.update(project_id, show_overlap_first=overlap_first),
            )

    def ensure_review_view(self, project_id: int, task_ids: Sequence[int]) -> int:
        """Get, fix or create the Data Manager view "defect-loop: review queue" listing exactly
        ``task_ids`` (a filter ``tasks:id equal`` per task, joined by ``or``; none: a filter that
        matches nothing), by ascending id. Returns the view's id (its URL: `view_url`)."""
        ids = sorted({int(t) for t in task_ids})
        items = [
            {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": t}
            for t in (ids or [0])  # task ids start at 1: 0 lists nothing
        ]
        data = {
            "title": REVIEW_VIEW_TITLE,
            "filters": {"conjunction": "or", "items": items},
            "ordering": ["tasks:id"],
        }
        views = self._json("list views", "GET", "api/dm/views", params={"project": int(project_id)})
        for v in views or []:
            vdata = v.get("data") or {}
            if vdata.get("title") == REVIEW_VIEW_TITLE:
                if (
                    vdata.get("filters") != data["filters"]
                    or vdata.get("ordering") != data["ordering"]
                ):
                    self._json(
                        "update the review queue view",
                        "PATCH",
                        f"api/dm/views/{int(v['id'])}",
                        body={"project": int(project_id), "data": {**vdata, **data}},
                    )
                return int(v["id"])
        created = self._json(
            "create the review queue view",
            "POST",
            "api/dm/views",
            body={"project": int(project_id), "data": data},
        )
        return int(created["id"])

    def view_url(self, project_id: int, view_id: int) -> str:
        """The Data Manager address of a saved view (tab) of the project."""
        return f"{self.url}/projects/{int(project_id)}/data?tab={int(view_id)}"

    def ensure_local_storage(self, project_id: int, path: Path) -> int:
        """Attach the local folder ``path`` (a SUBfolder of the server's document root) to the
        project so ``/data/local-files/?d=...`` URLs under it are served; get-or-create, no sync.
        Returns the storage id. The folder is created when missing.
        """
        path = Path(path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        storages = self._call(
            "list local storages",
            lambda: self._client.import_storage.local.list(project=project_id),
        )
        for s in storages:
            if s.path and Path(s.path).expanduser().resolve() == path and s.id is not None:
                return int(s.id)
        try:
            created = self._call(
                f"attach local storage {path}",
                lambda: self._client.import_storage.local.create(
                    project=project_id,
                    path=str(path),
                    title=STORAGE_TITLE,
                    use_blob_urls=True,
                    recursive_scan=True,
                ),
            )
        except LabelStudioError as exc:
            raise LabelStudioError(
                f"{exc}. The storage folder must be a SUBfolder of Label Studio's document root "
                "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) and local file serving must be enabled"
            ) from exc
        if created.id is None:
            raise LabelStudioError("Label Studio created the local storage but returned no id")
        return int(created.id)

    def ensure_webhook(
        self,
        project_id: int,
        url: str,
        actions: Sequence[str] = WEBHOOK_ACTIONS,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Get, fix or create the project's webhook to ``url`` for ``actions`` (with payloads and
        the extra HTTP ``headers``, e.g. a shared secret); returns its id.

        Label Studio refuses loopback/private URLs unless the server runs with
        ``SSRF_PROTECTION_ENABLED=false``; without Redis it calls the webhook synchronously
        inside the annotation request (``WEBHOOK_TIMEOUT``, default 1 s), so the receiver must
        answer at once (see `loop.webhooks`).
        """
        hooks = self._json("list webhooks", "GET", "api/webhooks", params={"project": project_id})
        body = {
            "project": int(project_id),
            "url": url,
            "send_payload": True,
            "send_for_all_actions": False,
            "actions": list(actions),
            "is_active": True,
            "headers": dict(headers or {}),
        }
        hint = (
            " Label Studio refuses webhooks to loopback or private addresses unless it runs with "
            "SSRF_PROTECTION_ENABLED=false (LabelStudioService(extra_env=...)), or use polling"
        )
        try:
            for h in hooks or []:
                if h.get("url") == url and int(h.get("project") or 0) == int(project_id):
                    stale = (
                        sorted(h.get("actions") or []) != sorted(actions)
                        or (h.get("headers") or {}) != body["headers"]
                        or not h.get("is_active")
                    )
                    if stale:
                        self._json(
                            "update a webhook", "PATCH", f"api/webhooks/{int(h['id'])}", body=body
                        )
                    return int(h["id"])
            created = self._json("create a webhook", "POST", "api/webhooks", body=body)
        except LabelStudioError as exc:
            raise LabelStudioError(f"{exc}.{hint}") from exc
        return int(created["id"])

    def delete_webhook(self, webhook_id: int) -> None:
        """Remove a webhook (no error when it is already gone)."""
        try:
            self._json("delete a webhook", "DELETE", f"api/webhooks/{int(webhook_id)}")
        except LabelStudioError as exc:
            if not (isinstance(exc.__cause__, ApiError) and exc.__cause__.status_code == 404):
                raise
