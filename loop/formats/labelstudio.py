"""Label Studio rectangle results (percent of the image) <-> `Detections` (pixel xyxy).

A Label Studio rectangle region: ``value.x, value.y`` top-left corner and ``value.width,
value.height``, all in percent (0-100) of ``original_width`` / ``original_height``, top-left origin,
with ``value.rotation`` in degrees and ``value.rectanglelabels`` a one-element list of class names.
"""

from __future__ import annotations

import hashlib
import math
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


def _number(value: Any, what: str, region: Any) -> float:
    """``value`` as a finite float, else `ConversionError` naming the field and the region."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConversionError(
            f"region {region!r}: {what} must be a number, got {type(value).__name__} {value!r}"
        )
    try:
        out = float(value)
    except ValueError:
        raise ConversionError(
            f"region {region!r}: {what} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(out):
        raise ConversionError(f"region {region!r}: {what} must be finite, got {value!r}")
    return out


def _size(value: Any, what: str, region: Any) -> int:
    """A positive whole pixel count (``original_width`` / ``original_height``)."""
    v = _number(value, what, region)
    if v != int(v) or v < 1:
        raise ConversionError(
            f"region {region!r}: {what} must be a whole number of pixels >= 1, got {value!r}"
        )
    return int(v)


def ls_results_to_detections(
    results: list[dict[str, Any]],
    class_names: list[str],
    image_wh: tuple[int, int] | None = None,
) -> Detections:
    """Label Studio results -> pixel `Detections` (ground truth: no confidences).

    Only ``rectanglelabels`` results are read; other result types (choices, text) are ignored.
    ``image_wh`` is taken from the results' ``original_width/height`` when not given.
    Every field that is read is validated: raises `UnknownLabelError` for a label outside
    ``class_names`` and `ConversionError` for anything malformed (a region or ``value`` that is not
    an object, non-numeric or non-finite numbers, a rotated box, a box of zero width or height,
    coordinates outside 0-100 %, image sizes that are not positive whole numbers or that differ
    between regions, a missing image size). Never raises anything else for bad input.
    """
    if not isinstance(results, list):
        raise ConversionError(f"results must be a list of regions, got {type(results).__name__}")
    boxes: list[list[float]] = []
    ids: list[int] = []
    wh = image_wh
    seen_wh: tuple[int, int] | None = None
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ConversionError(f"region #{i} is not an object: {type(r).__name__}")
        if r.get("type") != RECTANGLE:
            continue
        rid = r.get("id", f"#{i}")
        value = r.get("value")
        if not isinstance(value, dict):
            raise ConversionError(
                f"region {rid!r}: value must be an object, got {type(value).__name__}"
            )
        labels = value.get(RECTANGLE)
        if not isinstance(labels, list) or len(labels) != 1:
            raise ConversionError(f"region {rid!r} must carry exactly one label, got {labels!r}")
        if not isinstance(labels[0], str) or labels[0] not in class_names:
            raise UnknownLabelError(
                f"label {labels[0]!r} is not one of the project's classes {class_names}"
            )
        rotation = value.get("rotation")
        if rotation is not None and abs(_number(rotation, "rotation", rid)) > 1e-6:
            raise ConversionError(
                f"region {rid!r} is rotated by {rotation} degrees; "
                "only axis-aligned boxes are supported: remove the rotation in Label Studio"
            )
        for key in ("x", "y", "width", "height"):
            if key not in value:
                raise ConversionError(f"region {rid!r} lacks numeric x/y/width/height")
        x, y = _number(value["x"], "x", rid), _number(value["y"], "y", rid)
        bw, bh = _number(value["width"], "width", rid), _number(value["height"], "height", rid)
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
                f"region {rid!r} lies outside the image (x={x}, y={y}, w={bw}, h={bh} %)"
            )
        if bw <= 0 or bh <= 0:
            raise ConversionError(
                f"region {rid!r} has zero area (w={bw}, h={bh} %); delete it or redraw the box"
            )
        if "original_width" in r or "original_height" in r:
            r_wh = (
                _size(r.get("original_width"), "original_width", rid),
                _size(r.get("original_height"), "original_height", rid),
            )
            if seen_wh is not None and r_wh != seen_wh:
                raise ConversionError(
                    f"region {rid!r} was drawn on a {r_wh[0]}x{r_wh[1]} image, another region "
                    f"on {seen_wh[0]}x{seen_wh[1]}; re-annotate the task"
                )
            seen_wh = r_wh
            if wh is None:
                wh = r_wh
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
