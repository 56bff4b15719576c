"""Simulated labelers: ground truth plays the labeler (demo, tests, oracle replay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loop.detections import Detections
from loop.formats.yolo import yolo_lines_to_detections
from loop.images import ImagePool


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


def answer_open_tasks(
    gateway: Any,
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
