"""What a simulated labeler does in Label Studio: list tasks, annotate, delete annotations
(`Labeler`, part of `LabelStudioGateway`; the demo and the tests use it)."""

from __future__ import annotations

from typing import Any

from loop.detections import Detections
from loop.errors import LabelStudioError
from loop.formats.labelstudio import detections_to_ls_results, without_scores
from loop.labelstudio.transport import PAGE_SIZE, Transport


class Labeler(Transport):
    """Annotate tasks like a labeler would."""

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks, by ascending id: ``{"id", "data", "predictions": [{"model_version",
        "score", "result"}], "annotations": [{"id", "result", "was_cancelled", "ground_truth",
        "completed_by"}]}`` (``result`` in Label Studio's percent coordinates; predictions in
        creation order)."""
        tasks: list[Any] = self._call(
            "list tasks",
            lambda: list(
                self._client.tasks.list(project=project_id, fields="all", page_size=PAGE_SIZE)
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
        results = detections_to_ls_results(without_scores(detections), class_names)
        return self.annotate_results(task_id, results, lead_time, ground_truth)

    def delete_annotation(self, annotation_id: int) -> None:
        """Delete one annotation (its task goes back to the labeling queue)."""
        self._call(
            f"delete annotation {annotation_id}",
            lambda: self._client.annotations.delete(int(annotation_id)),
        )
