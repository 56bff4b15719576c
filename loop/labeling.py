"""The seam between the loop and whoever labels its images: `LabelingBackend` and its types.

`Project.push` hands a backend the images to label (`PushItem`) and `Project.pull` takes back what
was labeled (`PullResult` of `PulledLabel`). Two backends implement it: the Label Studio gateway
(`loop.labelstudio.LabelStudioGateway`, a real server) and the oracle (`loop.simulate.
OracleGateway`, ground truth answers every task: the oracle replay). Boxes are pixel ``xyxy``
`Detections` on both sides; tasks are keyed by the backend's task id, images by sha256.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from loop.annotation_log import AnnotationRecord
from loop.detections import Detections
from loop.errors import TaskRejectedError
from loop.keypoints import InstanceKeypoints, KeypointNames
from loop.polygons import Rings


@dataclass(frozen=True)
class PushItem:
    """One image to label.

    ``image_url``: as Label Studio should load it, e.g. ``/data/local-files/?d=images/ab.png``
    (path relative to the document root). ``detections``: pixel boxes already filtered to what
    labelers should see (confidences become region scores). ``priority``: >= 0, higher = more
    worth labeling. ``overlap``: how many different annotators must label it (1: one;
    more: chosen for overlap, `loop.consensus.choose_overlap`).
    """

    sha256: str
    image_url: str
    detections: Detections
    priority: float
    overlap: int = 1


@dataclass
class PushSummary:
    """Outcome of a push.

    ``created``: new tasks. ``refreshed``: tasks already waiting in Label Studio that got a
    prediction of the new model version (and their new priority). ``skipped``: already present
    with this model version, already labeled, or repeated in the input. ``failed``: could not be
    converted (listed in ``failures``, sha256 -> reason). ``task_ids`` maps sha256 -> task id
    for every created, refreshed and skipped item. ``overlap``: sha256 -> annotators of the
    new tasks chosen for overlap (`loop.consensus.choose_overlap`). ``batch``: sha256 of the
    new images this push sent, in the order it sent them (images the production monitor
    queued first); set by `loop.sync.push`, empty from a backend alone.
    """

    created: int = 0
    skipped: int = 0
    failed: int = 0
    task_ids: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    refreshed: int = 0
    overlap: dict[str, int] = field(default_factory=dict)  # sha256 -> annotators (> 1 only)
    batch: list[str] = field(default_factory=list)


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
    ``polygons``: empty, or one `loop.polygons.Rings` per box of ``detections`` (pixels; ``()``
    for a rectangle), when the pull kept polygons (``segment`` projects; brush masks too).
    ``keypoints``: empty, or one `loop.keypoints.InstanceKeypoints` per box (pixels), when the
    pull was given the config's keypoints and the annotation holds some.
    ``prediction_polygons``: empty, or one `loop.polygons.Rings` per box of ``prediction``
    (pixels; ``()`` for a rectangle), when the pull kept polygons and the prediction had some.
    ``annotations``: every annotator's latest submitted, usable annotation (one per annotator,
    boxes in pixels; the chosen one included), for consensus and the annotation log;
    ``unusable``: annotator -> why their latest annotation could not be read (it is left out of
    the agreement and the log; only the chosen annotation's problems reject the task).
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
    polygons: tuple[Rings, ...] = ()
    keypoints: tuple[InstanceKeypoints, ...] = ()
    annotations: tuple[AnnotationRecord, ...] = ()
    unusable: dict[str, str] = field(default_factory=dict)
    prediction_polygons: tuple[Rings, ...] = ()


@dataclass
class PullResult:
    """Outcome of a pull.

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


class LabelingBackend(Protocol):
    """What `Project` needs from a labeling tool (see the module docstring). A backend may also
    offer ``task_ids(project_id) -> set[int]`` (every task it holds), which lets a pull forget
    rejections of deleted tasks."""

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
        """Get or create the labeling project; its id (``brush``: offer brush masks;
        ``keypoints``: the config's keypoint names per class)."""
        ...

    def ensure_local_storage(self, project_id: int, path: Path) -> int:
        """Make the images under ``path`` loadable by the labelers; the storage's id."""
        ...

    def push(
        self,
        project_id: int,
        items: list[PushItem],
        *,
        model_version: str,
        class_names: list[str],
        batch_size: int = 500,
        progress: bool | None = None,
    ) -> PushSummary:
        """Create (or refresh) one pre-annotated task per item, in the given order."""
        ...

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
        """The labels of the tasks annotated (or un-annotated) since the cursor ``since``;
        ``polygons``: keep polygon (and brush) regions as polygons (else each becomes its
        bounding box); ``keypoints``: keep keypoints (the config's names per class)."""
        ...
