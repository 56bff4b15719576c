"""Simulated labelers: ground truth plays the labeler (demo, tests, oracle replay).

`truth_from_yolo_dir` + `answer_open_tasks` annotate tasks of a real Label Studio server;
`OracleGateway` replaces the server altogether (the oracle replay in `loop.replay`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.detections import Detections
from loop.errors import DatasetError
from loop.formats.yolo import yolo_lines_to_detections
from loop.images import ImagePool
from loop.labeling import PulledLabel, PullResult, PushItem, PushSummary
from loop.polygons import Rings

if TYPE_CHECKING:
    from loop.labelstudio import LabelStudioGateway


def truth_from_yolo_dir(
    pool: ImagePool, labels_dir: Path, num_classes: int
) -> dict[str, Detections]:
    """Ground truth per pool image (sha256 -> pixel boxes), matched by the ingested file's stem."""
    truth: dict[str, Detections] = {}
    for entry in pool:
        txt = labels_dir / f"{Path(entry.source).stem}.txt"
        if txt.exists():
            truth[entry.sha256] = yolo_lines_to_detections(
                txt.read_text(), (entry.width, entry.height), num_classes
            )
    return truth


def truth_to_json(truth: Mapping[str, Detections]) -> str:
    """Ground truth (sha256 -> pixel boxes, with their ``polygons`` when they have them) as JSON
    text; `truth_from_json` reads it back exactly (floats keep their repr)."""
    rows = []
    for sha in sorted(truth):
        det = truth[sha]
        rows.append(
            {
                "sha256": sha,
                "image_wh": list(det.image_wh),
                "class_id": [int(c) for c in det.class_id],
                "xyxy": det.xyxy.tolist(),
                "polygons": None
                if det.polygons is None
                else [[ring.tolist() for ring in rings] for rings in det.polygons],
            }
        )
    return json.dumps({"truth": rows})


def truth_from_json(text: str) -> dict[str, Detections]:
    """`truth_to_json`'s text -> sha256 -> pixel boxes (with pixel polygon rings when stored)."""
    out: dict[str, Detections] = {}
    for row in json.loads(text)["truth"]:
        polys = row.get("polygons")
        out[row["sha256"]] = Detections(
            np.asarray(row["xyxy"], dtype=np.float64).reshape(-1, 4),
            np.asarray(row["class_id"], dtype=np.int64),
            (int(row["image_wh"][0]), int(row["image_wh"][1])),
            polygons=None
            if polys is None
            else tuple(
                tuple(np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings)
                for rings in polys
            ),
        )
    return out


def boxes_and_polygons(det: Detections) -> tuple[Detections, tuple[Rings, ...]]:
    """Split ground truth into its boxes (without outlines) and the rings parallel to them, as a
    dataset version stores them (`loop.datasets.LabeledImage`): ``()`` when it has none."""
    if det.polygons is None:
        return det, ()
    return Detections(det.xyxy, det.class_id, det.image_wh), tuple(det.polygons)


def answer_open_tasks(
    gateway: LabelStudioGateway,
    project_id: int,
    truth: dict[str, Detections],
    class_names: list[str],
    limit: int | None = None,
) -> int:
    """Annotate every task that has no annotation yet with its ground truth, in task-id order
    (the order the queue serves them). Returns how many tasks were answered."""
    answered = 0
    for task in sorted(gateway.list_tasks(project_id), key=lambda t: int(t["id"])):
        if limit is not None and answered >= limit:
            break
        if task.get("annotations"):
            continue
        sha = task["data"].get("sha256")
        if sha not in truth:
            continue
        gateway.annotate(int(task["id"]), truth[sha], class_names)
        answered += 1
    return answered


class OracleGateway:
    """A `loop.labeling.LabelingBackend` where ground truth is the labeler (a stand-in for
    `loop.labelstudio.LabelStudioGateway`).

    `loop.project.Project.push` hands it tasks and `Project.pull` gets every pushed task back,
    annotated with its ground truth, exactly once: the oracle replay runs the real loop's
    push -> pull -> dataset-version code without a Label Studio server. Each answer carries the
    pre-annotation the task was pushed with as its ``prediction``, as Label Studio's does, so
    `Project.pull` writes the same correction analytics (what a labeler would have accepted,
    adjusted, relabeled, removed and added). ``truth``: sha256 -> pixel boxes; ground truth with
    ``polygons`` (a ``segment`` replay) is answered as polygon instances, the way a pull from
    Label Studio hands a segment project its polygons. A pushed image without ground truth is a
    programming error (`DatasetError`).
    """

    def __init__(self, truth: Mapping[str, Detections], annotator: str = "oracle") -> None:
        self.truth = truth
        self.annotator = annotator
        self.project_id = 1
        self.model_version: str | None = None
        self._tasks: dict[str, int] = {}  # sha256 -> task id, every task ever pushed
        self._open: list[str] = []  # pushed, not yet pulled (push order)
        self._shown: dict[str, tuple[Detections, str]] = {}  # sha256 -> (pre-annotation, model)

    # Keyword options of the real gateway (polygons, progress, since, ...) mean nothing here;
    # accepting them keeps the oracle working as the real gateway grows options.
    def ensure_project(
        self, title: str, class_names: list[str], instructions: str = "", **_: Any
    ) -> int:
        return self.project_id

    def ensure_local_storage(self, project_id: int, path: Path, **_: Any) -> int:
        return 1

    def push(
        self,
        project_id: int,
        items: list[PushItem],
        model_version: str,
        class_names: list[str],
        batch_size: int = 500,
        **_: Any,
    ) -> PushSummary:
        """Accept ``items`` as tasks; an image pushed before is skipped, like Label Studio's
        gateway does."""
        summary = PushSummary()
        for item in items:
            if item.sha256 in self._tasks:
                summary.skipped += 1
                summary.task_ids[item.sha256] = self._tasks[item.sha256]
                continue
            if item.sha256 not in self.truth:
                raise DatasetError(
                    f"image {item.sha256[:12]} was selected but has no ground truth; "
                    "the replay must only offer images of the labeled dataset"
                )
            task_id = len(self._tasks) + 1
            self._tasks[item.sha256] = task_id
            self._open.append(item.sha256)
            self._shown[item.sha256] = (item.detections, model_version)
            summary.created += 1
            summary.task_ids[item.sha256] = task_id
        if items:
            self.model_version = model_version
        return summary

    def pull(self, project_id: int, class_names: list[str], **_: Any) -> PullResult:
        """Every task pushed since the last pull, answered with its ground truth."""
        now = datetime.now(UTC)
        labels = []
        for sha in self._open:
            boxes, polygons = boxes_and_polygons(self.truth[sha])
            labels.append(self._answer(sha, boxes, polygons, now))
        self._open = []
        return PullResult(labels=labels)

    def _answer(
        self, sha: str, boxes: Detections, polygons: tuple[Rings, ...], now: datetime
    ) -> PulledLabel:
        return PulledLabel(
            task_id=self._tasks[sha],
            sha256=sha,
            detections=boxes,
            annotation_id=self._tasks[sha],
            annotator=self.annotator,
            lead_time=None,
            updated_at=now,
            ground_truth=True,
            prediction=self._shown[sha][0],
            prediction_model_version=self._shown[sha][1],
            polygons=polygons,
        )
