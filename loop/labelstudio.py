"""The Label Studio gateway: the ONLY module that talks to Label Studio.

It uses label-studio-sdk 2.x (``from label_studio_sdk import LabelStudio``) and converts between
Label Studio JSON and `Detections` with the pure converters in `loop.formats.labelstudio`.

Conventions:

- Labeling config: one ``RectangleLabels`` named ``label`` on an ``Image`` named ``image`` whose
  value is ``$image`` (see `label_config_xml`).
- Task data: ``{"image": url, "sha256": hex digest, "priority": float, "width": px,
  "height": px}``; ``url`` is ``/data/local-files/?d=<path relative to the document root>``.
  ``sha256`` identifies the image: a project never holds two tasks with the same sha256.
- Prediction score: Label Studio's "Uncertainty sampling" serves the task with the LOWEST
  prediction ``score`` first (only predictions whose ``model_version`` equals the project's count).
  `push` therefore stores ``score = 1 / (1 + priority)`` (priority >= 0): the most valuable task has
  the lowest score, and the order is the same as ranking by descending priority.
- Region coordinates in Label Studio are percent of the image (top-left origin); `Detections`
  holds pixel ``xyxy``.

Network calls are retried with exponential backoff on connection errors, timeouts and HTTP 5xx,
never on 4xx. Clients are constructed in ``__init__``, never at import time.
"""

from __future__ import annotations

import colorsys
import html
import json
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from loop.detections import Detections
from loop.errors import (
    ConfigError,
    ConversionError,
    InvalidDetectionsError,
    LabelStudioError,
    ServiceError,
    TaskRejectedError,
    UnknownLabelError,
)
from loop.formats.labelstudio import (
    FROM_NAME,
    RECTANGLE,
    TO_NAME,
    detections_to_ls_results,
    ls_results_to_detections,
)

T = TypeVar("T")

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
STORAGE_TITLE = "defect-loop images"
_PAGE_SIZE = 1000
_RETRIES = 4  # attempts after the first one
_BACKOFF_S = 0.5  # first wait; doubles each time
# Distinct, readable colours (tab10 + a few extra); more classes get evenly spaced hues.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd",
]  # fmt: skip


# --- labeling config -------------------------------------------------------------------------
def _colour(i: int, n: int) -> str:
    if n <= len(_PALETTE):
        return _PALETTE[i]
    r, g, b = colorsys.hsv_to_rgb(i / n, 0.75, 0.85)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _check_class_names(class_names: list[str]) -> None:
    if not class_names:
        raise ConfigError("class_names must list at least one class")
    if any(not isinstance(c, str) or not c.strip() for c in class_names):
        raise ConfigError(f"class names must be non-empty strings, got {class_names}")
    if len(set(class_names)) != len(class_names):
        raise ConfigError(f"class names must be unique, got {class_names}")


def label_config_xml(class_names: list[str], instructions: str = "") -> str:
    """Label Studio labeling config: rectangles (``RectangleLabels`` named ``label``) on an
    ``Image`` named ``image`` (value ``$image``), one ``Label`` per class in the given order, each
    with its own colour; ``instructions`` (plain text) appear as a header above the image.

    Raises `ConfigError` for an empty, blank or duplicate class list.
    """
    _check_class_names(class_names)
    view = ET.Element("View")
    if instructions.strip():
        ET.SubElement(view, "Header", value=instructions.strip())
    ET.SubElement(view, "Image", name=TO_NAME, value="$" + TO_NAME, zoom="true")
    rect = ET.SubElement(view, "RectangleLabels", name=FROM_NAME, toName=TO_NAME)
    for i, name in enumerate(class_names):
        ET.SubElement(rect, "Label", value=name, background=_colour(i, len(class_names)))
    ET.indent(view)
    return ET.tostring(view, encoding="unicode")


def classes_from_label_config(xml: str) -> list[str]:
    """Class names of the ``RectangleLabels`` named ``label`` in a labeling config, in order.

    Raises `LabelStudioError` when the config has no such control.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelStudioError(f"project labeling config is not valid XML: {exc}") from exc
    for el in root.iter("RectangleLabels"):
        if el.get("name") == FROM_NAME:
            return [str(lbl.get("value")) for lbl in el.iter("Label")]
    raise LabelStudioError(
        f"project labeling config has no <RectangleLabels name={FROM_NAME!r}>; it was not "
        "created by defect-loop: choose another project title"
    )


# --- data types ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushItem:
    """One image to label.

    ``image_url``: as Label Studio should load it, e.g. ``/data/local-files/?d=images/ab.png``
    (path relative to the document root). ``detections``: pixel boxes already filtered to what
    labelers should see (confidences become region scores). ``priority``: >= 0, higher = more
    worth labeling.
    """

    sha256: str
    image_url: str
    detections: Detections
    priority: float


@dataclass
class PushSummary:
    """Outcome of `LabelStudioGateway.push`.

    ``task_ids`` maps sha256 -> task id for created AND skipped (already present) items.
    ``failures`` maps sha256 -> reason for items that could not be converted (not imported).
    """

    created: int = 0
    skipped: int = 0
    failed: int = 0
    task_ids: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PulledLabel:
    """The chosen annotation of one task as ground truth.

    ``detections``: pixel boxes without confidences (zero boxes = defect-free image).
    ``annotator``: e-mail of the user who completed it (its id when unknown).
    ``lead_time``: seconds the labeler spent, or None. ``updated_at``: timezone-aware.
    ``prediction``: the model boxes (with confidences when stored) that Label Studio snapshot into
    the annotation when it was created (the prediction of the project's model_version at that
    time), or None; ``prediction_model_version`` names its model.
    """

    task_id: int
    sha256: str
    detections: Detections
    annotation_id: int
    annotator: str
    lead_time: float | None
    updated_at: datetime | None
    ground_truth: bool = False
    prediction: Detections | None = None
    prediction_model_version: str | None = None


@dataclass
class PullResult:
    """Outcome of `LabelStudioGateway.pull`: usable labels, rejected tasks, and the ids of tasks
    whose annotations were all cancelled (skipped by the labeler)."""

    labels: list[PulledLabel] = field(default_factory=list)
    rejected: list[TaskRejectedError] = field(default_factory=list)
    skipped_task_ids: list[int] = field(default_factory=list)

    @property
    def predictions(self) -> dict[int, Detections]:
        """task id -> model boxes the labeler saw (only tasks whose annotation stored them)."""
        return {lb.task_id: lb.prediction for lb in self.labels if lb.prediction is not None}


# --- helpers ---------------------------------------------------------------------------------
def _api_detail(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict):
        parts = [str(body.get("detail") or "")]
        if body.get("validation_errors"):
            parts.append(str(body["validation_errors"]))
        text = " ".join(p for p in parts if p)
        return text or str(body)
    return str(body)[:500]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):  # connect errors, timeouts, dropped connections
        return True
    if isinstance(exc, ApiError):
        return exc.status_code is None or exc.status_code >= 500
    return False


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _without_scores(det: Detections) -> Detections:
    return Detections(det.xyxy, det.class_id, det.image_wh)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _sort_key(annotation: dict[str, Any]) -> tuple[bool, datetime, int]:
    # Ground truth first, then the most recently updated, then the highest id.
    when = _parse_time(annotation.get("updated_at") or annotation.get("created_at")) or _EPOCH
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (bool(annotation.get("ground_truth")), when, int(annotation.get("id") or 0))


class LabelStudioGateway:
    """Everything defect-loop does with a Label Studio server.

    ``url``: base URL such as ``http://127.0.0.1:8080``. ``api_token``: a legacy token (sent as
    ``Authorization: Token ...``) or a personal access token (JWT; the SDK refreshes it).
    ``timeout_s``: per-request timeout in seconds.
    """

    def __init__(self, url: str, api_token: str, timeout_s: float = 30) -> None:
        if not api_token:
            raise ConfigError(
                "no Label Studio API token: set DEFECT_LOOP_LABELSTUDIO__API_TOKEN (or run "
                "`defect-loop services up`, which creates one)"
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # The SDK's own retries are off: `_call` retries (also on timeouts, which the SDK does not).
        self._client = LabelStudio(
            base_url=self.url, api_key=api_token, timeout=timeout_s, max_retries=0
        )
        self._users: dict[int, str] | None = None

    # --- plumbing ----------------------------------------------------------------------------
    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        before_retry: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn``; retry transient failures with backoff; turn SDK errors into ours."""
        attempt = 0
        while True:
            try:
                return fn()
            except (httpx.TransportError, ApiError) as exc:
                if not (_retryable(exc) and attempt < _RETRIES):
                    raise self._translate(what, exc) from exc
            time.sleep(_BACKOFF_S * 2**attempt)
            attempt += 1
            if before_retry is not None:
                before_retry()

    def _translate(self, what: str, exc: httpx.TransportError | ApiError) -> Exception:
        if isinstance(exc, httpx.TransportError):
            return ServiceError(
                f"Label Studio at {self.url} is unreachable while trying to {what} "
                f"({type(exc).__name__}: {exc}); start it with `defect-loop services up` "
                "or check labelstudio.url"
            )
        if exc.status_code in (401, 403):
            return LabelStudioError(
                f"Label Studio refused the API token while trying to {what} "
                f"(HTTP {exc.status_code}: {_api_detail(exc)}); check "
                "DEFECT_LOOP_LABELSTUDIO__API_TOKEN and that legacy tokens are enabled"
            )
        return LabelStudioError(
            f"Label Studio refused to {what} (HTTP {exc.status_code}): {_api_detail(exc)}"
        )

    def close(self) -> None:
        """Close the underlying HTTP connection pool."""
        self._client._client_wrapper.httpx_client.httpx_client.close()

    def __enter__(self) -> LabelStudioGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- projects ----------------------------------------------------------------------------
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

    def ensure_project(self, title: str, class_names: list[str], instructions: str = "") -> int:
        """Get the project titled ``title`` or create it (uncertainty sampling, predictions shown
        to labelers, empty annotations allowed = defect-free). Returns its id.

        Raises `LabelStudioError` when the existing project's classes differ from ``class_names``
        (names or order).
        """
        xml = label_config_xml(class_names, instructions)
        found = self._find_project(title)
        if found is not None:
            pid = int(found.id)
            project = self._call("read a project", lambda: self._client.projects.get(pid))
            existing = classes_from_label_config(project.label_config or "")
            if existing != list(class_names):
                raise LabelStudioError(
                    f"Label Studio project {title!r} (id {pid}) has classes {existing}, but the "
                    f"config lists {list(class_names)}. Class ids are fixed for the life of a "
                    "project: restore the original class list, or set labelstudio.project_title "
                    "to start a new project"
                )
            if (project.label_config or "").strip() != xml.strip():
                # Same classes; only the instructions or colours changed: safe to update.
                self._call(
                    "update the labeling config",
                    lambda: self._client.projects.update(
                        pid, label_config=xml, expert_instruction=html.escape(instructions)
                    ),
                )
            return pid
        created = self._call(
            f"create project {title!r}",
            lambda: self._client.projects.create(
                title=title,
                label_config=xml,
                description="Surface-defect boxes, managed by defect-loop.",
                expert_instruction=html.escape(instructions),
                show_instruction=bool(instructions.strip()),
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

    def project_info(self, project_id: int) -> dict[str, Any]:
        """``{"id", "title", "model_version", "sampling", "task_number", "classes"}``."""
        p = self._call("read a project", lambda: self._client.projects.get(project_id))
        return {
            "id": int(project_id),
            "title": p.title,
            "model_version": p.model_version or "",
            "sampling": p.sampling,
            "task_number": p.task_number,
            "classes": classes_from_label_config(p.label_config or ""),
        }

    # --- storage -----------------------------------------------------------------------------
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

    # --- tasks -------------------------------------------------------------------------------
    def existing_sha256(self, project_id: int) -> dict[str, int]:
        """sha256 -> task id of every task in the project that carries ``data.sha256``."""
        tasks: list[Any] = self._call(
            "list tasks",
            lambda: list(
                self._client.tasks.list(
                    project=project_id, fields="task_only", include="id,data", page_size=_PAGE_SIZE
                )
            ),
        )
        out: dict[str, int] = {}
        for t in tasks:
            sha = (t.data or {}).get("sha256")
            if sha and t.id is not None:
                out.setdefault(str(sha), int(t.id))
        return out

    @staticmethod
    def _task_payload(item: PushItem, model_version: str, class_names: list[str]) -> dict[str, Any]:
        if not item.sha256:
            raise ConversionError("sha256 must not be empty")
        if not item.image_url:
            raise ConversionError("image_url must not be empty")
        priority = float(item.priority)
        if not math.isfinite(priority) or priority < 0:
            raise ConversionError(f"priority must be a finite number >= 0, got {item.priority}")
        det = item.detections
        w, h = det.image_wh
        return {
            "data": {
                "image": item.image_url,
                "sha256": item.sha256,
                "priority": priority,
                "width": int(w),
                "height": int(h),
            },
            "predictions": [
                {
                    "model_version": model_version,
                    # Lowest score is served first by uncertainty sampling: see module docstring.
                    "score": 1.0 / (1.0 + priority),
                    "result": detections_to_ls_results(det, class_names),
                }
            ],
        }

    def push(
        self,
        project_id: int,
        items: list[PushItem],
        model_version: str,
        class_names: list[str],
        batch_size: int = 500,
    ) -> PushSummary:
        """Import ``items`` as tasks with predictions, in the given order (most valuable first,
        so task ids ascend with rank), then set the project's ``model_version``.

        Items whose sha256 is already in the project (or repeated in ``items``) are skipped;
        items that cannot be converted (bad class id, negative priority) are counted as failed
        and listed in ``failures``. A retried batch re-checks which of its items arrived, so
        retries never duplicate tasks. Raises `LabelStudioError` when Label Studio refuses a batch
        (earlier batches stay imported; pushing again skips them).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not model_version:
            raise ConfigError("model_version must not be empty")
        _check_class_names(class_names)
        summary = PushSummary()
        existing = self.existing_sha256(project_id)
        pending: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for item in items:
            if item.sha256 in existing or item.sha256 in seen:
                summary.skipped += 1
                if item.sha256 in existing:
                    summary.task_ids[item.sha256] = existing[item.sha256]
                continue
            try:
                payload = self._task_payload(item, model_version, class_names)
            except (ConversionError, UnknownLabelError, InvalidDetectionsError) as exc:
                summary.failed += 1
                summary.failures[item.sha256] = str(exc)
                continue
            seen.add(item.sha256)
            pending.append((item.sha256, payload))

        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            state = {"batch": batch}

            def recheck(state: dict[str, Any] = state) -> None:
                # A timed-out or failed request may still have been committed: drop what arrived.
                now = self.existing_sha256(project_id)
                keep = []
                for sha, payload in state["batch"]:
                    if sha in now:
                        summary.created += 1
                        summary.task_ids[sha] = now[sha]
                    else:
                        keep.append((sha, payload))
                state["batch"] = keep

            def do_import(state: dict[str, Any] = state) -> list[int]:
                if not state["batch"]:
                    return []
                res = self._client.projects.import_tasks(
                    project_id,
                    request=[p for _, p in state["batch"]],
                    return_task_ids=True,
                )
                # task_ids is in the JSON but not in the SDK's model (extra field)
                return [int(i) for i in (getattr(res, "task_ids", None) or [])]

            task_ids = self._call(f"import {len(batch)} tasks", do_import, before_retry=recheck)
            done = state["batch"]
            if len(task_ids) != len(done):
                raise LabelStudioError(
                    f"Label Studio imported {len(task_ids)} tasks for {len(done)} items; check "
                    f"project {project_id} and push again (present images are skipped)"
                )
            for (sha, _), tid in zip(done, task_ids, strict=True):
                summary.task_ids[sha] = tid
            summary.created += len(done)

        if items:
            self._call(
                "set the project's model_version",
                lambda: self._client.projects.update(project_id, model_version=model_version),
            )
        return summary

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks, by ascending id: ``{"id", "data", "predictions": [{"model_version",
        "score", "result"}], "annotations": [{"id", "result", "was_cancelled", "ground_truth",
        "completed_by"}]}`` (``result`` in Label Studio's percent coordinates)."""
        tasks: list[Any] = self._call(
            "list tasks",
            lambda: list(
                self._client.tasks.list(project=project_id, fields="all", page_size=_PAGE_SIZE)
            ),
        )
        out = []
        for t in tasks:
            preds = [
                {"model_version": p.model_version, "score": p.score, "result": list(p.result)}
                for p in (t.predictions or [])
            ]
            anns = [
                {
                    k: a.get(k)
                    for k in ("id", "result", "was_cancelled", "ground_truth", "completed_by")
                }
                for a in (t.annotations or [])
                if isinstance(a, dict)
            ]
            out.append(
                {
                    "id": int(t.id or 0),
                    "data": dict(t.data or {}),
                    "predictions": preds,
                    "annotations": anns,
                }
            )
        return sorted(out, key=lambda d: d["id"])

    # --- annotations (test labeler) ----------------------------------------------------------
    def annotate_results(
        self,
        task_id: int,
        results: list[dict[str, Any]],
        lead_time: float | None = None,
        ground_truth: bool = False,
        was_cancelled: bool = False,
    ) -> int:
        """Create an annotation from raw Label Studio ``results``; returns its id."""
        extra: dict[str, Any] = {}
        if lead_time is not None:
            extra["lead_time"] = float(lead_time)
        created = self._call(
            f"annotate task {task_id}",
            lambda: self._client.annotations.create(
                id=task_id,
                result=results,
                was_cancelled=was_cancelled,
                ground_truth=ground_truth,
                **extra,
            ),
        )
        if created.id is None:
            raise LabelStudioError(f"Label Studio annotated task {task_id} but returned no id")
        return int(created.id)

    def annotate(
        self,
        task_id: int,
        detections: Detections,
        class_names: list[str],
        lead_time: float | None = None,
        ground_truth: bool = False,
    ) -> int:
        """Annotate a task like a labeler would: ``detections`` (pixel xyxy; confidences are
        dropped) become rectangle regions. Zero boxes = a submitted defect-free image.
        Returns the annotation id."""
        results = detections_to_ls_results(_without_scores(detections), class_names)
        return self.annotate_results(task_id, results, lead_time, ground_truth)

    # --- pull --------------------------------------------------------------------------------
    def _user_emails(self) -> dict[int, str]:
        if self._users is None:
            try:
                users = self._call("list users", lambda: self._client.users.list())
                self._users = {int(u.id): str(u.email) for u in users if u.id is not None}
            except LabelStudioError:
                self._users = {}
        return self._users

    def export_annotated(self, project_id: int) -> list[dict[str, Any]]:
        """Label Studio's JSON export of every task with at least one annotation."""

        def fetch() -> bytes:
            return b"".join(
                self._client.projects.exports.download_sync(project_id, export_type="JSON")
            )

        raw = self._call("export annotations", fetch)
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise LabelStudioError(f"Label Studio export is not JSON: {exc}") from exc
        if not isinstance(data, list):
            raise LabelStudioError("Label Studio export is not a list of tasks")
        return data

    def pull(self, project_id: int, class_names: list[str]) -> PullResult:
        """Ground truth from every annotated task.

        Per task: among non-cancelled annotations, one marked ground_truth wins, else the most
        recently updated. Its regions become pixel `Detections` (image size from the regions'
        ``original_width/height``; an annotation with no regions is a defect-free image sized by
        the task's ``width/height``). A task whose annotation cannot be converted (unknown label,
        rotated box, missing size or sha256) goes to ``rejected`` without blocking the others.
        """
        _check_class_names(class_names)
        tasks = sorted(self.export_annotated(project_id), key=lambda t: int(t.get("id") or 0))
        users = self._user_emails()
        out = PullResult()
        for task in tasks:
            task_id = int(task["id"])
            live = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
            if not live:
                out.skipped_task_ids.append(task_id)
                continue
            ann = max(live, key=_sort_key)
            try:
                out.labels.append(self._to_label(task, ann, class_names, users))
            except (UnknownLabelError, ConversionError, InvalidDetectionsError) as exc:
                out.rejected.append(TaskRejectedError(task_id, str(exc)))
        return out

    @staticmethod
    def _to_label(
        task: dict[str, Any],
        ann: dict[str, Any],
        class_names: list[str],
        users: dict[int, str],
    ) -> PulledLabel:
        task_id = int(task["id"])
        data = task.get("data") or {}
        sha = data.get("sha256")
        if not sha:
            raise ConversionError(
                "task data has no sha256: it was not created by defect-loop push; delete it or "
                "import images through defect-loop"
            )
        data_wh: tuple[int, int] | None = None
        if data.get("width") and data.get("height"):
            data_wh = (int(data["width"]), int(data["height"]))
        results = [r for r in ann.get("result") or [] if r.get("type") == RECTANGLE]
        wh = data_wh
        if results:
            r0 = results[0]
            if "original_width" in r0 and "original_height" in r0:
                wh = (int(r0["original_width"]), int(r0["original_height"]))
                if data_wh is not None and wh != data_wh:
                    raise ConversionError(
                        f"annotation was drawn on a {wh[0]}x{wh[1]} image but the task's image is "
                        f"{data_wh[0]}x{data_wh[1]} px; re-annotate the task"
                    )
        if wh is None:
            raise ConversionError(
                "image size unknown: the annotation has no regions and the task data no "
                "width/height; push the image again through defect-loop"
            )
        det = ls_results_to_detections(results, class_names, image_wh=wh)

        pred_det: Detections | None = None
        pred_mv: str | None = None
        pred = ann.get("prediction")
        if isinstance(pred, dict) and isinstance(pred.get("result"), list):
            pred_mv = pred.get("model_version")
            pred_det = _prediction_detections(pred["result"], class_names, data_wh or wh)

        completed_by = ann.get("completed_by")
        if isinstance(completed_by, dict):
            annotator = str(completed_by.get("email") or completed_by.get("id"))
        elif completed_by is not None:
            annotator = users.get(int(completed_by), str(completed_by))
        else:
            annotator = "unknown"
        lead = ann.get("lead_time")
        return PulledLabel(
            task_id=task_id,
            sha256=str(sha),
            detections=det,
            annotation_id=int(ann["id"]),
            annotator=annotator,
            lead_time=float(lead) if lead is not None else None,
            updated_at=_parse_time(ann.get("updated_at") or ann.get("created_at")),
            ground_truth=bool(ann.get("ground_truth")),
            prediction=pred_det,
            prediction_model_version=pred_mv,
        )


def _prediction_detections(
    results: Iterable[dict[str, Any]], class_names: list[str], wh: tuple[int, int]
) -> Detections | None:
    """Prediction regions -> `Detections` with confidences from region scores (None if unusable)."""
    rects = [r for r in results if r.get("type") == RECTANGLE]
    try:
        det = ls_results_to_detections(rects, class_names, image_wh=wh)
    except (UnknownLabelError, ConversionError, InvalidDetectionsError):
        return None
    scores = [r.get("score") for r in rects]
    if rects and all(isinstance(s, int | float) for s in scores):
        conf = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        return Detections(det.xyxy, det.class_id, det.image_wh, confidence=conf)
    return det
