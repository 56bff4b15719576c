"""Label Studio rectangle results (percent of the image) <-> `Detections` (pixel xyxy).

A Label Studio rectangle region: ``value.x, value.y`` top-left corner and ``value.width,
value.height``, all in percent (0-100) of ``original_width`` / ``original_height``, top-left origin,
with ``value.rotation`` in degrees and ``value.rectanglelabels`` a one-element list of class names.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError

RECTANGLE = "rectanglelabels"
FROM_NAME = "label"
TO_NAME = "image"
_PCT_TOLERANCE = 1e-6


def _region_id(i: int, box: np.ndarray, cls: int) -> str:
    # Stable ids keep re-pushed predictions identical for identical boxes.
    digest = hashlib.sha1(f"{i}:{cls}:{box.round(3).tolist()}".encode()).hexdigest()
    return digest[:10]


def detections_to_ls_results(
    det: Detections,
    class_names: list[str],
    from_name: str = FROM_NAME,
    to_name: str = TO_NAME,
) -> list[dict[str, Any]]:
    """Pixel boxes -> Label Studio ``rectanglelabels`` results (percent coordinates).

    Each result carries ``score`` when the detections have confidences.
    """
    w, h = det.image_wh
    results: list[dict[str, Any]] = []
    for i, (box, cls) in enumerate(zip(det.xyxy, det.class_id, strict=True)):
        if not 0 <= int(cls) < len(class_names):
            raise UnknownLabelError(f"class id {int(cls)} has no name in {class_names}")
        x1, y1, x2, y2 = (float(v) for v in box)
        result: dict[str, Any] = {
            "id": _region_id(i, box, int(cls)),
            "type": RECTANGLE,
            "from_name": from_name,
            "to_name": to_name,
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {
                "x": x1 / w * 100.0,
                "y": y1 / h * 100.0,
                "width": (x2 - x1) / w * 100.0,
                "height": (y2 - y1) / h * 100.0,
                "rotation": 0,
                RECTANGLE: [class_names[int(cls)]],
            },
        }
        if det.confidence is not None:
            result["score"] = float(det.confidence[i])
        results.append(result)
    return results


def ls_results_to_detections(
    results: list[dict[str, Any]],
    class_names: list[str],
    image_wh: tuple[int, int] | None = None,
) -> Detections:
    """Label Studio results -> pixel `Detections` (ground truth: no confidences).

    Only ``rectanglelabels`` results are read; other result types (choices, text) are ignored.
    ``image_wh`` is taken from the results' ``original_width/height`` when not given.
    Raises `UnknownLabelError` for a label outside ``class_names`` and `ConversionError` for a
    rotated box, coordinates outside 0-100 %, or a missing image size.
    """
    boxes: list[list[float]] = []
    ids: list[int] = []
    wh = image_wh
    for r in results:
        if r.get("type") != RECTANGLE:
            continue
        value = r.get("value") or {}
        labels = value.get(RECTANGLE) or []
        if len(labels) != 1:
            raise ConversionError(
                f"region {r.get('id')!r} must carry exactly one label, got {labels}"
            )
        if labels[0] not in class_names:
            raise UnknownLabelError(
                f"label {labels[0]!r} is not one of the project's classes {class_names}"
            )
        if abs(float(value.get("rotation", 0) or 0)) > 1e-6:
            raise ConversionError(
                f"region {r.get('id')!r} is rotated by {value.get('rotation')} degrees; "
                "only axis-aligned boxes are supported: remove the rotation in Label Studio"
            )
        try:
            x, y = float(value["x"]), float(value["y"])
            bw, bh = float(value["width"]), float(value["height"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"region {r.get('id')!r} lacks numeric x/y/width/height"
            ) from None
        lo, hi = -_PCT_TOLERANCE, 100.0 + _PCT_TOLERANCE
        if not (
            lo <= x <= hi
            and lo <= y <= hi
            and bw >= 0
            and bh >= 0
            and x + bw <= hi
            and y + bh <= hi
        ):
            raise ConversionError(
                f"region {r.get('id')!r} lies outside the image (x={x}, y={y}, w={bw}, h={bh} %)"
            )
        if wh is None and "original_width" in r and "original_height" in r:
            wh = (int(r["original_width"]), int(r["original_height"]))
        boxes.append([x, y, x + bw, y + bh])
        ids.append(class_names.index(labels[0]))
    if wh is None:
        if boxes:
            raise ConversionError("results carry no original_width/height and no image size given")
        raise ConversionError("image size unknown: pass image_wh for results without regions")
    w, h = wh
    pct = np.clip(np.array(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 100.0)
    xyxy = pct / 100.0 * np.array([w, h, w, h], dtype=np.float64)
    return Detections(xyxy, np.array(ids, dtype=np.int64), (w, h))
