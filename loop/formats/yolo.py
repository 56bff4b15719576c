"""YOLO label lines <-> `Detections`.

A YOLO line is ``class_id cx cy w h`` with centre and size normalised to ``[0, 1]`` by the
image width and height. `Detections` hold pixel ``xyxy``.
"""

from __future__ import annotations

import math

import numpy as np

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError


def yolo_lines_to_detections(
    lines: list[str] | str, image_wh: tuple[int, int], num_classes: int
) -> Detections:
    """Parse YOLO label text (one box per line; blank lines ignored) into pixel boxes.

    Raises `ConversionError` for malformed lines, coordinates outside ``[0, 1]`` or boxes of zero
    width or height (after clipping to the image), and `UnknownLabelError` for class ids that are
    not whole numbers in ``[0, num_classes)`` (``nan`` and ``inf`` included).
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    w, h = image_wh
    boxes: list[list[float]] = []
    ids: list[int] = []
    for lineno, raw in enumerate(lines, start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise ConversionError(f"line {lineno}: expected 5 fields 'cls cx cy w h', got {raw!r}")
        try:
            cls_f = float(parts[0])
            cx, cy, bw, bh = (float(p) for p in parts[1:])
        except ValueError:
            raise ConversionError(f"line {lineno}: non-numeric field in {raw!r}") from None
        if not math.isfinite(cls_f) or cls_f != int(cls_f) or not 0 <= int(cls_f) < num_classes:
            raise UnknownLabelError(
                f"line {lineno}: class id {parts[0]} is not a whole number in [0, {num_classes}); "
                "the class map is fixed by the project config"
            )
        vals = np.array([cx, cy, bw, bh])
        if not np.all(np.isfinite(vals)) or np.any(vals < 0) or np.any(vals > 1):
            raise ConversionError(f"line {lineno}: coordinates must lie in [0, 1], got {raw!r}")
        x1, x2 = max(0.0, (cx - bw / 2) * w), min(float(w), (cx + bw / 2) * w)
        y1, y2 = max(0.0, (cy - bh / 2) * h), min(float(h), (cy + bh / 2) * h)
        if not (x2 > x1 and y2 > y1):
            raise ConversionError(
                f"line {lineno}: box has zero area inside the image, got {raw!r}; delete the line"
            )
        boxes.append([x1, y1, x2, y2])
        ids.append(int(cls_f))
    return Detections(np.array(boxes).reshape(-1, 4), np.array(ids, dtype=np.int64), (w, h))


def detections_to_yolo_lines(det: Detections, precision: int = 6) -> list[str]:
    """Pixel boxes -> YOLO lines with fixed ``precision`` decimals (stable text for digests)."""
    w, h = det.image_wh
    out = []
    for (x1, y1, x2, y2), cls in zip(det.xyxy, det.class_id, strict=True):
        cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
        bw, bh = (x2 - x1) / w, (y2 - y1) / h
        out.append(
            f"{int(cls)} {cx:.{precision}f} {cy:.{precision}f} {bw:.{precision}f} {bh:.{precision}f}"
        )
    return out
