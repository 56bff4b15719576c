"""The Label Studio gateway: the ONLY module that talks to Label Studio.

It uses label-studio-sdk 2.x (``from label_studio_sdk import LabelStudio``) for small calls and
its authenticated HTTP client directly for the bulk ones (import, export, task listings), and
converts between Label Studio JSON and `Detections` with the pure converters in
`loop.formats.labelstudio`.

Conventions:

- Labeling config (`label_config_xml`): an ``Image`` named ``image`` (value ``$image``), one
  ``RectangleLabels`` named ``label`` with one ``Label`` per class in config order (class id =
  position), optionally a ``PolygonLabels`` named ``polygon`` with the same labels (a polygon
  becomes its bounding box on pull), and a ``Choices`` named ``verdict`` with one choice
  ``defect-free``. An annotation submitted with no regions is a defect-free image (a negative
  example), with or without that choice; the labeling instructions say so.
- Task data: ``{"image": url, "sha256": hex digest, "priority": float, "width": px,
  "height": px}``; ``url`` is ``/data/local-files/?d=<path relative to the document root>``.
  ``sha256`` identifies the image: a project never holds two tasks with the same sha256.
- Queue order: Label Studio's "Uncertainty sampling" serves the task with the LOWEST prediction
  ``score`` first, counting only predictions whose ``model_version`` equals the project's. `push`
  stores ``score = 1 / (1 + priority)`` (priority >= 0) and sets the project's model_version, so the
  most valuable task comes first; tasks already waiting get a new prediction when the model
  version changes. The saved view "defect-loop: most valuable first" sorts by
  ``-tasks:data.priority`` for "Label All Tasks" from the Data Manager: both give the same order.
- Region coordinates in Label Studio are percent (0-100) of the image, top-left origin;
  `Detections` holds pixel ``xyxy``.
- Pull is incremental: a cursor on the tasks' ``updated_at`` (an annotation created, updated or
  deleted bumps it) selects what changed; tasks whose annotations were all deleted are reported
  in ``unlabeled_task_ids`` so that their labels can be dropped.

Network calls are retried with exponential backoff and jitter on connection errors, timeouts and
HTTP 5xx, never on 4xx. Clients are constructed in ``__init__``, never at import time.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import html
import json
import math
import random
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from loop.corrections import mean_pairwise_f1
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
PRIORITY_VIEW_TITLE = "defect-loop: most valuable first"
PRIORITY_ORDERING = ["-tasks:data.priority"]
POLYGON = "polygonlabels"
POLYGON_NAME = "polygon"
VERDICT_NAME = "verdict"
DEFECT_FREE = "defect-free"
LOCAL_FILES_PREFIX = "/data/local-files/"
# Annotation events a webhook subscribes to (see `LabelStudioGateway.ensure_webhook`).
WEBHOOK_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
)
_DESCRIPTION_PREFIX = "Surface-defect boxes, managed by defect-loop."
_PAGE_SIZE = 1000
_EXPORT_IDS_PER_CALL = 400  # keeps the query string of `?ids[]=...` well under 8 KB
_RETRIES = 4  # attempts after the first one
_BACKOFF_S = 0.5  # first wait; doubles each time
_JITTER = 0.5  # each wait is multiplied by a random factor in [1 - _JITTER, 1 + _JITTER]
_BULK_TIMEOUT_S = 600.0  # bulk import/export calls may take minutes on large projects
_DM_DATETIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the Data Manager's Datetime filter format (UTC)
# Data Manager query: tasks without a submitted (non-cancelled) annotation.
_UNANNOTATED: dict[str, Any] = {
    "filters": {
        "conjunction": "and",
        "items": [
            {
                "filter": "filter:tasks:total_annotations",
                "operator": "equal",
                "type": "Number",
                "value": 0,
            }
        ],
    }
}
# Distinct, readable colours (tab10 + a few extra); more classes get evenly spaced hues.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd",
]  # fmt: skip


class UnsafeImagePathError(ConversionError):
    """A task's image path points outside Label Studio's document root (``..`` or absolute)."""


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


def label_config_xml(class_names: list[str], instructions: str = "", polygons: bool = False) -> str:
    """Label Studio labeling config: rectangles (``RectangleLabels`` named ``label``), and with
    ``polygons`` also ``PolygonLabels`` named ``polygon``, on an ``Image`` named ``image`` (value
    ``$image``); one ``Label`` per class in the given order, each with its own colour; a
    ``Choices`` named ``verdict`` offering ``defect-free``; ``instructions`` (plain text) appear
    as a header above the image.

    Raises `ConfigError` for an empty, blank or duplicate class list.
    """
    _check_class_names(class_names)
    view = ET.Element("View")
    if instructions.strip():
        ET.SubElement(view, "Header", value=instructions.strip())
    ET.SubElement(view, "Image", name=TO_NAME, value="$" + TO_NAME, zoom="true")
    controls = [("RectangleLabels", FROM_NAME)]
    if polygons:
        controls.append(("PolygonLabels", POLYGON_NAME))
    for tag, name in controls:
        el = ET.SubElement(view, tag, name=name, toName=TO_NAME)
        for i, cls in enumerate(class_names):
            ET.SubElement(el, "Label", value=cls, background=_colour(i, len(class_names)))
    verdict = ET.SubElement(
        view, "Choices", name=VERDICT_NAME, toName=TO_NAME, choice="single", showInline="true"
    )
    ET.SubElement(verdict, "Choice", value=DEFECT_FREE)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode")


def instructions_html(
    class_names: list[str], instructions: str = "", polygons: bool = False
) -> str:
    """The labeling instructions shown to labelers (project ``expert_instruction``, HTML): the
    guidelines, the classes with their colours, and how to submit a defect-free image."""
    paragraphs = [p.strip() for p in instructions.split("\n\n") if p.strip()]
    parts = [f"<p>{html.escape(p)}</p>" for p in paragraphs]
    items = "".join(
        f'<li><span style="color:{_colour(i, len(class_names))}">&#9632;</span> '
        f"{html.escape(c)}</li>"
        for i, c in enumerate(class_names)
    )
    shape = "a tight box (or a polygon)" if polygons else "a tight box"
    parts.append(f"<p>Classes (draw {shape} per defect):</p><ul>{items}</ul>")
    parts.append(
        "<p><b>Defect-free image:</b> submit it with NO regions (you may tick "
        f"&quot;{DEFECT_FREE}&quot;): it becomes a negative example for training. Use "
        "<i>Skip</i> only when you cannot decide: skipped images are not used as negatives.</p>"
    )
    return "\n".join(parts)


def _labels_of(root: ET.Element, tag: str, name: str) -> list[str] | None:
    for el in root.iter(tag):
        if el.get("name") == name:
            return [str(lbl.get("value")) for lbl in el.iter("Label")]
    return None


def classes_from_label_config(xml: str) -> list[str]:
    """Class names of the ``RectangleLabels`` named ``label`` in a labeling config, in order.

    Raises `LabelStudioError` when the config has no such control.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelStudioError(f"project labeling config is not valid XML: {exc}") from exc
    labels = _labels_of(root, "RectangleLabels", FROM_NAME)
    if labels is None:
        raise LabelStudioError(
            f"project labeling config has no <RectangleLabels name={FROM_NAME!r}>; it was not "
            "created by defect-loop: choose another project title"
        )
    return labels


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

    ``created``: new tasks. ``refreshed``: tasks already waiting in Label Studio that got a
    prediction of the new model version (and their new priority). ``skipped``: already present
    with this model version, already labeled, or repeated in the input. ``failed``: could not be
    converted (listed in ``failures``, sha256 -> reason). ``task_ids`` maps sha256 -> task id
    for every created, refreshed and skipped item.
    """

    created: int = 0
    skipped: int = 0
    failed: int = 0
    task_ids: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    refreshed: int = 0


@dataclass(frozen=True)
class PulledLabel:
    """The chosen annotation of one task as ground truth.

    ``detections``: pixel boxes without confidences (zero boxes = defect-free image).
    ``annotator``: e-mail of the user who completed it (its id when unknown).
    ``lead_time``: seconds the labeler spent, or None. ``updated_at``: timezone-aware.
    ``prediction``: the model boxes (with confidences when stored) that Label Studio snapshot into
    the annotation when it was created (the prediction of the project's model_version at that
    time), or None; ``prediction_model_version`` names its model.
    ``per_annotator``: every annotator's latest submitted boxes (pixels) when several labeled the
    task; ``annotators`` their names; ``agreement``: mean pairwise F1 (same class, IoU >= 0.5)
    between them, None with a single annotator. ``image_url``: the task's ``data.image`` as
    Label Studio holds it now (compare it with what was pushed: task data can be edited).
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
    annotators: tuple[str, ...] = ()
    agreement: float | None = None
    per_annotator: dict[str, Detections] = field(default_factory=dict)
    image_url: str | None = None


@dataclass
class PullResult:
    """Outcome of `LabelStudioGateway.pull`.

    ``labels``: usable labels of the tasks that changed. ``rejected``: unusable tasks with the
    reason (`TaskRejectedError`; ``__cause__`` holds the named error). ``skipped_task_ids``:
    tasks whose annotations were all cancelled (skipped by the labeler: not negatives).
    ``unlabeled_task_ids`` / ``unlabeled_sha256``: tasks of ``known_labeled`` that now have no
    submitted annotation (deleted): their labels must be dropped. ``cursor``: pass it as ``since``
    to the next pull. ``full``: whether every annotated task was exported.
    ``examined_task_ids``: every task this pull exported and judged (labeled, rejected, skipped
    or without a submitted annotation): an earlier verdict on any of them is out of date.
    """

    labels: list[PulledLabel] = field(default_factory=list)
    rejected: list[TaskRejectedError] = field(default_factory=list)
    skipped_task_ids: list[int] = field(default_factory=list)
    unlabeled_task_ids: list[int] = field(default_factory=list)
    unlabeled_sha256: list[str] = field(default_factory=list)
    cursor: str | None = None
    full: bool = True
    examined_task_ids: list[int] = field(default_factory=list)

    @property
    def predictions(self) -> dict[int, Detections]:
        """task id -> model boxes the labeler saw (only tasks whose annotation stored them)."""
        return {lb.task_id: lb.prediction for lb in self.labels if lb.prediction is not None}


@dataclass(frozen=True)
class _Existing:
    task_id: int
    data: dict[str, Any]
    model_versions: frozenset[str]
    labeled: bool


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


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential with random jitter."""
    return _BACKOFF_S * 2**attempt * random.uniform(1.0 - _JITTER, 1.0 + _JITTER)


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def format_cursor(when: datetime) -> str:
    """A pull cursor: UTC time with microseconds, in the Data Manager's filter format."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime(_DM_DATETIME)


def _without_scores(det: Detections) -> Detections:
    return Detections(det.xyxy, det.class_id, det.image_wh)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _task_key(task: Any) -> int:
    """A task's id, or -1 when it has none usable (never raises)."""
    tid = _whole(task.get("id")) if isinstance(task, dict) else None
    return -1 if tid is None else tid


def _sort_key(annotation: dict[str, Any]) -> tuple[bool, datetime, int]:
    # Ground truth first, then the most recently updated, then the highest id.
    when = _parse_time(annotation.get("updated_at") or annotation.get("created_at")) or _EPOCH
    return (bool(annotation.get("ground_truth")), when, _whole(annotation.get("id")) or 0)


def _recency(annotation: dict[str, Any]) -> tuple[datetime, int]:
    when = _parse_time(annotation.get("updated_at") or annotation.get("created_at")) or _EPOCH
    return (when, _whole(annotation.get("id")) or 0)


def image_path_from_url(url: str) -> PurePosixPath | None:
    """The ``d=`` path of a ``/data/local-files/?d=...`` URL (None for other URLs)."""
    parts = urlsplit(url)
    if not parts.path.startswith(LOCAL_FILES_PREFIX):
        return None
    values = parse_qs(parts.query).get("d")
    return PurePosixPath(values[0]) if values else PurePosixPath("")


def check_image_url(url: Any, document_root: Path | None = None) -> None:
    """Refuse a task image URL whose local-file path escapes the document root.

    A ``/data/local-files/?d=<path>`` path must be relative, without ``..``, and (when
    ``document_root`` is given) resolve, symlinks followed, to a file below it. Other URLs pass.
    Raises `UnsafeImagePathError` (a `ConversionError`) or `ConversionError` for a missing URL.
    """
    if not isinstance(url, str) or not url:
        raise ConversionError("task data has no image URL; push the image through defect-loop")
    rel = image_path_from_url(url)
    if rel is None:
        return
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise UnsafeImagePathError(
            f"image path {str(rel)!r} escapes Label Studio's document root (absolute or '..'); "
            "delete the task and push the image again through defect-loop"
        )
    if document_root is not None:
        root = Path(document_root).resolve()
        target = (root / Path(*rel.parts)).resolve()
        if not target.is_relative_to(root):
            raise UnsafeImagePathError(
                f"image path {str(rel)!r} resolves outside the document root {root} (symlink?); "
                "delete the task and push the image again through defect-loop"
            )


def _polygon_to_rect(r: dict[str, Any]) -> dict[str, Any]:
    """A ``polygonlabels`` result (points in percent) -> the ``rectanglelabels`` result of its
    bounding box, for `ls_results_to_detections`. Raises `ConversionError` for bad points."""
    value = r.get("value")
    if not isinstance(value, dict):
        raise ConversionError(
            f"polygon {r.get('id')!r}: value must be an object, got {type(value).__name__}"
        )
    try:
        pts = np.asarray(value.get("points"), dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ConversionError(f"polygon {r.get('id')!r} has non-numeric points") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.all(np.isfinite(pts)):
        raise ConversionError(f"polygon {r.get('id')!r} needs at least 3 [x, y] points")
    if np.any(pts < -1e-6) or np.any(pts > 100 + 1e-6):
        raise ConversionError(
            f"polygon {r.get('id')!r} has points outside the image (coordinates must be 0-100 %)"
        )
    x1, y1 = pts.min(axis=0)
    x2, y2 = pts.max(axis=0)
    out = {k: v for k, v in r.items() if k != "value"}
    out["type"] = RECTANGLE
    out["value"] = {
        "x": float(x1),
        "y": float(y1),
        "width": float(x2 - x1),
        "height": float(y2 - y1),
        "rotation": 0,
        RECTANGLE: value.get(POLYGON),
    }
    return out


def _region_results(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rectangle results, with polygons turned into their bounding rectangles."""
    out = []
    for r in results:
        if r.get("type") == RECTANGLE:
            out.append(r)
        elif r.get("type") == POLYGON:
            out.append(_polygon_to_rect(r))
    return out


def _marked_defect_free(results: Iterable[dict[str, Any]]) -> bool:
    for r in results:
        if r.get("type") != "choices" or r.get("from_name") != VERDICT_NAME:
            continue
        value = r.get("value")
        choices = value.get("choices") if isinstance(value, dict) else value
        if not isinstance(value, dict) or not isinstance(choices, list | None):
            raise ConversionError(
                f"choice {r.get('id')!r}: value must be an object with a list of choices, "
                f"got {value!r}"[:300]
            )
        if DEFECT_FREE in (choices or []):
            return True
    return False


# Errors a malformed task can raise on its way through the converters. The named ones carry a
# message of their own; the others are a last line of defence (a field of an unexpected type
# that no check foresaw) and still become a rejection of that one task.
_TASK_ERRORS = (UnknownLabelError, ConversionError, InvalidDetectionsError)
_MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


def _whole(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (int or numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _check_annotation(ann: Any) -> None:
    """Validate the fields of one exported annotation that pull reads to choose and attribute
    it (not its regions: see `ls_results_to_detections`). Raises `ConversionError`."""
    if not isinstance(ann, dict):
        raise ConversionError(f"an annotation is not an object: {type(ann).__name__}")
    aid = ann.get("id")
    if _whole(aid) is None:
        raise ConversionError(f"an annotation has no integer id (id={aid!r})")
    where = f"annotation {aid}"
    for key in ("was_cancelled", "ground_truth"):
        if not isinstance(ann.get(key), bool | None):
            raise ConversionError(f"{where}: {key} must be true or false, got {ann.get(key)!r}")
    if not isinstance(ann.get("result"), list | None):
        raise ConversionError(
            f"{where}: result must be a list of regions, got {type(ann.get('result')).__name__}"
        )
    for key in ("updated_at", "created_at"):
        when = ann.get(key)
        if when not in (None, "") and (not isinstance(when, str) or _parse_time(when) is None):
            raise ConversionError(f"{where}: {key} is not an ISO time: {when!r}")
    who = ann.get("completed_by")
    if who is not None and not isinstance(who, dict) and _whole(who) is None:
        raise ConversionError(f"{where}: completed_by must be a user id, got {who!r}")
    lead = ann.get("lead_time")
    if lead is not None:
        ok = isinstance(lead, int | float) and not isinstance(lead, bool)
        if not ok or not math.isfinite(float(lead)) or float(lead) < 0:
            raise ConversionError(f"{where}: lead_time must be seconds >= 0, got {lead!r}")


def _task_size(data: dict[str, Any]) -> tuple[int, int] | None:
    """The task's ``width``/``height`` (pixels), None when absent; `ConversionError` if bad."""
    w, h = data.get("width"), data.get("height")
    if w in (None, "", 0) and h in (None, "", 0):
        return None
    ww, hh = _whole(w), _whole(h)
    if ww is None or hh is None or ww < 1 or hh < 1:
        raise ConversionError(
            f"task data width/height must be whole numbers of pixels >= 1, got {w!r} x {h!r}"
        )
    return (ww, hh)


def _bulk_options() -> dict[str, Any]:
    return {"timeout_in_seconds": _BULK_TIMEOUT_S}


@contextlib.contextmanager
def _progress(
    total: int, description: str, enabled: bool | None
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; ``enabled=None`` shows it only when stderr is a TTY."""
    show = (sys.stderr.isatty() if enabled is None else enabled) and total > 0
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda n: bar.advance(tid, n)


class LabelStudioGateway:
    """Everything defect-loop does with a Label Studio server.

    ``url``: base URL such as ``http://127.0.0.1:8080``. ``api_token``: a legacy token (sent as
    ``Authorization: Token ...``) or a personal access token (JWT; the SDK refreshes it).
    ``timeout_s``: per-request timeout in seconds (bulk import/export calls get more).
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
        """Run ``fn``; retry transient failures with backoff and jitter; turn SDK errors into
        ours (`ServiceError` when unreachable, `LabelStudioError` when refused)."""
        attempt = 0
        while True:
            try:
                return fn()
            except (httpx.TransportError, ApiError) as exc:
                if not (_retryable(exc) and attempt < _RETRIES):
                    raise self._translate(what, exc) from exc
            time.sleep(_backoff(attempt))
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

    def _raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """One authenticated request through the SDK's HTTP client (no SDK models: fast for bulk
        payloads). Raises ``ApiError`` for HTTP >= 400, httpx errors for transport failures."""
        wrapper = self._client._client_wrapper
        headers = dict(wrapper.get_headers())
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = wrapper.httpx_client.httpx_client.request(
            method,
            f"{self.url}/{path.lstrip('/')}",
            params=dict(params) if params else None,
            content=content,
            headers=headers,
            timeout=timeout_s or self.timeout_s,
        )
        if resp.status_code >= 400:
            try:
                detail: Any = resp.json()
            except ValueError:
                detail = resp.text
            raise ApiError(status_code=resp.status_code, headers=dict(resp.headers), body=detail)
        return resp

    def _json(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
        before_retry: Callable[[], None] | None = None,
    ) -> Any:
        def go() -> Any:
            resp = self._raw(method, path, params=params, body=body, timeout_s=timeout_s)
            if resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError as exc:
                raise LabelStudioError(
                    f"Label Studio answered {what} with something that is not JSON: {exc}"
                ) from exc

        return self._call(what, go, before_retry=before_retry)

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
        xml = label_config_xml(class_names, instructions, polygons)
        expert = instructions_html(class_names, instructions, polygons)
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
        "show_instruction", "expert_instruction", "label_config"}``."""
        p = self._call("read a project", lambda: self._client.projects.get(project_id))
        xml = p.label_config or ""
        try:
            polygons = _labels_of(ET.fromstring(xml), "PolygonLabels", POLYGON_NAME) is not None
        except ET.ParseError:
            polygons = False
        return {
            "id": int(project_id),
            "title": p.title,
            "model_version": p.model_version or "",
            "sampling": p.sampling,
            "task_number": p.task_number,
            "classes": classes_from_label_config(xml),
            "polygons": polygons,
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
    def _list_tasks_raw(
        self,
        project_id: int,
        include: str,
        *,
        fields: str = "task_only",
        query: dict[str, Any] | None = None,
        page_size: int = _PAGE_SIZE,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Tasks of the project as plain dicts holding the ``include`` fields, paged; ``query``
        is a Data Manager ``{"filters", "ordering"}`` document. At most ``limit`` tasks."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, Any] = {
                "project": int(project_id),
                "fields": fields,
                "include": include,
                "page": page,
                "page_size": page_size if limit is None else min(page_size, limit),
            }
            if query:
                params["query"] = json.dumps(query)
            try:
                body = self._json("list tasks", "GET", "api/tasks", params=params)
            except LabelStudioError as exc:
                cause = exc.__cause__
                if page > 1 and isinstance(cause, ApiError) and cause.status_code == 404:
                    break  # past the last page
                raise
            tasks = list((body or {}).get("tasks") or [])
            out.extend(tasks)
            total = int((body or {}).get("total") or 0)
            if not tasks or len(out) >= total or (limit is not None and len(out) >= limit):
                break
            page += 1
        return out if limit is None else out[:limit]

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
        tasks = self._list_tasks_raw(project_id, "id,data,total_annotations")
        versions: dict[int, frozenset[str]] = {}
        if any(int(t.get("total_annotations") or 0) == 0 for t in tasks):
            for t in self._list_tasks_raw(
                project_id, "id,predictions_model_versions", fields="all", query=_UNANNOTATED
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
            out[str(sha)] = _Existing(tid, dict(data), versions.get(tid, frozenset()), labeled)
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
            # Region scores are the model's confidences (when the detections carry them).
            "result": detections_to_ls_results(item.detections, class_names),
        }

    @classmethod
    def _task_payload(
        cls, item: PushItem, model_version: str, class_names: list[str]
    ) -> dict[str, Any]:
        if not item.sha256:
            raise ConversionError("sha256 must not be empty")
        if not item.image_url:
            raise ConversionError("image_url must not be empty")
        prediction = cls._prediction(item, model_version, class_names)
        w, h = item.detections.image_wh
        return {
            "data": {
                "image": item.image_url,
                "sha256": item.sha256,
                "priority": float(item.priority),
                "width": int(w),
                "height": int(h),
            },
            "predictions": [prediction],
        }

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
        _check_class_names(class_names)
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
            with _progress(total, "push to Label Studio", progress) as advance:
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
                    timeout_s=_BULK_TIMEOUT_S,
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
            for (sha, _), tid in zip(done, task_ids, strict=True):
                summary.task_ids[sha] = tid
            summary.created += len(done)
            advance(len(done))

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
                        timeout_s=_BULK_TIMEOUT_S,
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

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks, by ascending id: ``{"id", "data", "predictions": [{"model_version",
        "score", "result"}], "annotations": [{"id", "result", "was_cancelled", "ground_truth",
        "completed_by"}]}`` (``result`` in Label Studio's percent coordinates; predictions in
        creation order)."""
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
                for p in sorted(t.predictions or [], key=lambda p: int(p.id or 0))
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
        completed_by: int | None = None,
    ) -> int:
        """Create an annotation from raw Label Studio ``results`` (as user id ``completed_by``,
        default: the token's user); returns its id."""
        extra: dict[str, Any] = {}
        if lead_time is not None:
            extra["lead_time"] = float(lead_time)
        if completed_by is not None:
            extra["completed_by"] = int(completed_by)
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

    def delete_annotation(self, annotation_id: int) -> None:
        """Delete one annotation (its task goes back to the labeling queue)."""
        self._call(
            f"delete annotation {annotation_id}",
            lambda: self._client.annotations.delete(int(annotation_id)),
        )

    # --- webhooks ----------------------------------------------------------------------------
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

    # --- pull --------------------------------------------------------------------------------
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
                timeout_s=_BULK_TIMEOUT_S,
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

    def export_annotated(self, project_id: int) -> list[dict[str, Any]]:
        """Label Studio's JSON export of every task with at least one annotation."""
        return self.export_tasks(project_id)

    def latest_update(self, project_id: int) -> str | None:
        """The newest task ``updated_at`` of the project as a pull cursor (None: no tasks)."""
        tasks = self._list_tasks_raw(
            project_id, "id,updated_at", query={"ordering": ["-tasks:updated_at"]}, limit=1
        )
        when = _parse_time(tasks[0].get("updated_at")) if tasks else None
        return None if when is None else format_cursor(when)

    def changed_since(self, project_id: int, since: str) -> list[tuple[int, datetime]]:
        """``(task id, time)`` of the tasks changed strictly after the cursor ``since``: updated
        (an annotation created, updated or deleted, a prediction added, data edited) or given
        an annotation newer than it (``completed_at``: Label Studio 1.23 stores some malformed
        annotations with an error answer and without bumping the task's ``updated_at``).
        ``time`` is the later of the two."""
        when = _parse_time(since)
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
            times = [_parse_time(t.get(k)) for k in ("updated_at", "completed_at")]
            known = [x for x in times if x is not None]
            if t.get("id") is not None and known:
                out.append((int(t["id"]), max(known)))
        return out

    def unannotated_task_ids(self, project_id: int) -> list[int]:
        """Ids of the tasks with no submitted (non-cancelled) annotation."""
        return [int(t["id"]) for t in self._list_tasks_raw(project_id, "id", query=_UNANNOTATED)]

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
            query=_UNANNOTATED,
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
    ) -> PullResult:
        """Ground truth from the tasks annotated, changed or un-annotated since the cursor.

        ``since``: the ``cursor`` of the previous `PullResult` (None: every annotated task, one
        bulk export). Changed tasks are exported by id (or, above ``full_export_above`` of them,
        with one bulk export). ``known_labeled``: task id -> sha256 of the labels already taken
        from this project; those whose annotations are all gone now are listed in
        ``unlabeled_task_ids``/``unlabeled_sha256``. ``document_root``: refuse image paths that
        resolve outside it.

        Per task: among non-cancelled annotations, one marked ground_truth wins, else the most
        recently updated. Its regions (rectangles, polygons as their bounding box) become pixel
        `Detections`; an annotation with no regions is a defect-free image sized by the task's
        ``width/height``. Every annotator's latest annotation is kept in ``per_annotator`` with
        their agreement. A task that cannot be used (unknown label, rotated box, coordinates
        outside 0-100 %, zero-area box, more than ``max_regions`` regions, image path escaping the
        document root, defect-free with regions, missing size or sha256, or any field of any
        annotation malformed) goes to ``rejected`` with its task id and the reason, never blocking
        the others; a task whose annotations were all cancelled goes to ``skipped_task_ids``.
        """
        _check_class_names(class_names)
        out = PullResult()
        # Annotations Label Studio stored but does not count (see the method): judged each time.
        uncounted = self.uncounted_annotation_task_ids(project_id)
        if since is None:
            out.cursor = self.latest_update(project_id)  # before the export: nothing is missed
            tasks = self.export_tasks(project_id)
            exported = {_task_key(t) for t in tasks}
            missing = [i for i in uncounted if i not in exported]
            if missing:
                tasks += self.export_tasks(project_id, ids=missing, all_tasks=True)
        else:
            changed = self.changed_since(project_id, since)
            out.full = False
            newest = max((u for _, u in changed), default=_parse_time(since))
            out.cursor = since if newest is None else format_cursor(newest)
            ids = sorted({i for i, _ in changed} | set(uncounted))
            if not ids:
                tasks = []
            elif len(ids) > full_export_above:
                wanted = set(ids)
                tasks = [t for t in self.export_tasks(project_id) if _task_key(t) in wanted]
            else:
                tasks = self.export_tasks(project_id, ids=ids, all_tasks=True)
        users = self._user_emails() if tasks else {}
        for task in sorted((t for t in tasks if isinstance(t, dict)), key=_task_key):
            if _task_key(task) < 0:
                continue  # not a task (an export always gives ids): nothing to name or report
            out.examined_task_ids.append(_task_key(task))
            self._pull_task(task, class_names, users, document_root, out, max_regions)
        if known_labeled:
            # A task judged now holds a submitted annotation, counted by Label Studio or not.
            judged = {r.task_id for r in out.rejected} | {lb.task_id for lb in out.labels}
            for tid in self.unannotated_task_ids(project_id):
                if tid in known_labeled and tid not in judged:
                    out.unlabeled_task_ids.append(tid)
                    out.unlabeled_sha256.append(str(known_labeled[tid]))
        return out

    def _pull_task(
        self,
        task: dict[str, Any],
        class_names: list[str],
        users: dict[int, str],
        document_root: Path | None,
        out: PullResult,
        max_regions: int | None = None,
    ) -> None:
        task_id = _task_key(task)
        try:
            anns = task.get("annotations") or []
            if not isinstance(anns, list):
                raise ConversionError("task annotations are not a list")
            for a in anns:
                _check_annotation(a)
            if not isinstance(task.get("data") or {}, dict):
                raise ConversionError("task data is not an object")
            live = [a for a in anns if not a.get("was_cancelled")]
            if not live:
                if anns:
                    out.skipped_task_ids.append(task_id)
                return
            check_image_url((task.get("data") or {}).get("image"), document_root)
            out.labels.append(self._to_label(task, live, class_names, users, max_regions))
        except _TASK_ERRORS as exc:
            rejected = TaskRejectedError(task_id, f"{type(exc).__name__}: {exc}")
            rejected.__cause__ = exc
            out.rejected.append(rejected)
        except _MALFORMED as exc:
            rejected = TaskRejectedError(
                task_id,
                f"malformed annotation data ({type(exc).__name__}: {exc}); fix or delete the "
                "annotation in Label Studio",
            )
            rejected.__cause__ = exc
            out.rejected.append(rejected)

    @staticmethod
    def _annotator(ann: dict[str, Any], users: dict[int, str]) -> str:
        completed_by = ann.get("completed_by")
        if isinstance(completed_by, dict):
            return str(completed_by.get("email") or completed_by.get("id"))
        uid = _whole(completed_by)
        if uid is not None:
            return users.get(uid, str(uid))
        return "unknown" if completed_by is None else str(completed_by)

    @staticmethod
    def _annotation_detections(
        ann: dict[str, Any],
        class_names: list[str],
        data_wh: tuple[int, int] | None,
        max_regions: int | None = None,
    ) -> Detections:
        raw = ann.get("result") or []
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise ConversionError(f"annotation {ann.get('id')}: result must be a list of objects")
        n_regions = sum(1 for r in raw if r.get("type") in (RECTANGLE, POLYGON))
        if max_regions is not None and n_regions > max_regions:
            raise ConversionError(
                f"annotation {ann.get('id')} has {n_regions} regions, more than "
                f"labelstudio.max_regions ({max_regions}); split the image or raise the limit"
            )
        results = _region_results(raw)
        defect_free = _marked_defect_free(raw)  # also validates the verdict choice
        if results and defect_free:
            raise ConversionError(
                f"annotation {ann.get('id')} is marked {DEFECT_FREE!r} but has {len(results)} "
                "regions; remove the regions or untick the choice in Label Studio"
            )
        if data_wh is None and not results:
            raise ConversionError(
                "image size unknown: the annotation has no regions and the task data no "
                "width/height; push the image again through defect-loop"
            )
        sized = any("original_width" in r or "original_height" in r for r in results)
        det = ls_results_to_detections(results, class_names, image_wh=None if sized else data_wh)
        if data_wh is not None and det.image_wh != data_wh:
            w, h = det.image_wh
            raise ConversionError(
                f"annotation was drawn on a {w}x{h} image but the task's image is "
                f"{data_wh[0]}x{data_wh[1]} px; re-annotate the task"
            )
        return det

    @classmethod
    def _to_label(
        cls,
        task: dict[str, Any],
        live: list[dict[str, Any]],
        class_names: list[str],
        users: dict[int, str],
        max_regions: int | None = None,
    ) -> PulledLabel:
        task_id = _task_key(task)
        data = task.get("data") or {}
        sha = data.get("sha256")
        if not sha:
            raise ConversionError(
                "task data has no sha256: it was not created by defect-loop push; delete it or "
                "import images through defect-loop"
            )
        if not isinstance(sha, str) or len(sha) > 128:
            raise ConversionError(f"task data sha256 is not a digest: {str(sha)[:80]!r}")
        data_wh = _task_size(data)
        ann = max(live, key=_sort_key)
        det = cls._annotation_detections(ann, class_names, data_wh, max_regions)

        # Several annotators: keep each one's latest annotation and measure their agreement.
        latest: dict[str, dict[str, Any]] = {}
        for a in sorted(live, key=_recency):
            latest[cls._annotator(a, users)] = a
        per_annotator: dict[str, Detections] = {}
        agreement: float | None = None
        if len(latest) > 1:
            for name, a in latest.items():
                if a is ann:
                    per_annotator[name] = det
                    continue
                # Only the chosen annotation makes the label: another annotator's unusable
                # annotation just leaves the agreement without it.
                with contextlib.suppress(*_TASK_ERRORS, *_MALFORMED):
                    per_annotator[name] = cls._annotation_detections(
                        a, class_names, data_wh or det.image_wh, max_regions
                    )
            agreement = mean_pairwise_f1(list(per_annotator.values()))

        pred_det: Detections | None = None
        pred_mv: str | None = None
        pred = ann.get("prediction")
        if isinstance(pred, dict) and isinstance(pred.get("result"), list):
            mv = pred.get("model_version")
            pred_mv = mv if isinstance(mv, str) else None
            pred_det = _prediction_detections(pred["result"], class_names, data_wh or det.image_wh)

        lead = ann.get("lead_time")
        return PulledLabel(
            task_id=task_id,
            sha256=str(sha),
            detections=det,
            annotation_id=int(_whole(ann["id"]) or 0),
            annotator=cls._annotator(ann, users),
            lead_time=float(lead) if lead is not None else None,
            updated_at=_parse_time(ann.get("updated_at") or ann.get("created_at")),
            ground_truth=bool(ann.get("ground_truth")),
            prediction=pred_det,
            prediction_model_version=pred_mv,
            annotators=tuple(latest),
            agreement=agreement,
            per_annotator=per_annotator,
            image_url=data.get("image") if isinstance(data.get("image"), str) else None,
        )


def _prediction_detections(
    results: Iterable[dict[str, Any]], class_names: list[str], wh: tuple[int, int]
) -> Detections | None:
    """Prediction regions -> `Detections` with confidences from region scores (None if unusable)."""
    rects = [r for r in results if isinstance(r, dict) and r.get("type") == RECTANGLE]
    try:
        det = ls_results_to_detections(rects, class_names, image_wh=wh)
    except (*_TASK_ERRORS, *_MALFORMED):
        return None
    scores = [r.get("score") for r in rects]
    ok = all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
    if rects and ok and np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        conf = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        return Detections(det.xyxy, det.class_id, det.image_wh, confidence=conf)
    return det
