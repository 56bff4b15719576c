"""Label Studio result regions as plain dicts, for the tests of the pull rules (percent
coordinates of a 200 x 100 px image unless told)."""

from __future__ import annotations

from typing import Any


def rect(
    x: Any, y: Any, w: Any, h: Any, label: str = "dent", ow: int = 200, oh: int = 100, **value: Any
) -> dict[str, Any]:
    """A ``rectanglelabels`` region; ``value`` adds or overrides fields of its value."""
    return {
        "id": "r",
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": ow,
        "original_height": oh,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": 0,
            "rectanglelabels": [label],
            **value,
        },
    }


def poly(points: list[list[float]], label: str = "dent") -> dict[str, Any]:
    """A ``polygonlabels`` region (points in percent)."""
    return {
        "id": "p",
        "type": "polygonlabels",
        "from_name": "polygon",
        "to_name": "image",
        "original_width": 200,
        "original_height": 100,
        "value": {"points": points, "polygonlabels": [label]},
    }


def verdict(choice: str = "defect-free") -> dict[str, Any]:
    """The ``verdict`` choice of the labeling config."""
    return {
        "type": "choices",
        "from_name": "verdict",
        "to_name": "image",
        "value": {"choices": [choice]},
    }


def task_data(width: int = 200, height: int = 100) -> dict[str, Any]:
    """The task data defect-loop pushes (image URL, sha256, size in pixels)."""
    return {
        "image": "/data/local-files/?d=images/a.png",
        "sha256": "a" * 64,
        "width": width,
        "height": height,
    }


def one_annotation_task(
    result: list[Any],
    tid: int = 7,
    data: dict[str, Any] | None = None,
    **annotation: Any,
) -> dict[str, Any]:
    """An exported task with one submitted annotation (id 1, user 1) whose regions are
    ``result``; ``annotation`` adds or overrides the annotation's fields."""
    ann = {
        "id": 1,
        "result": result,
        "was_cancelled": False,
        "ground_truth": False,
        "updated_at": "2026-01-01T00:00:00Z",
        "completed_by": 1,
        **annotation,
    }
    return {"id": tid, "data": dict(data or task_data()), "annotations": [ann]}
