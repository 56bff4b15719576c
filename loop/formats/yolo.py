"""YOLO label lines <-> `Detections`, and Ultralytics segmentation lines <-> polygons.

A YOLO line is ``class_id cx cy w h`` with centre and size normalised to ``[0, 1]`` by the
image width and height. `Detections` hold pixel ``xyxy``.

An Ultralytics segmentation line is ``class_id x1 y1 x2 y2 ...``: one polygon per instance,
vertices normalised to ``[0, 1]`` like the boxes. Our instances (`loop.polygons`) are pixel rings,
possibly several per instance (parts, holes by the even-odd rule); an instance with several rings
is written as one ring joined by zero-width bridges (`merge_rings`), which fills the same pixels.

An Ultralytics pose line is ``class_id cx cy w h`` followed by ``K`` keypoint triples
``x y v`` (normalised; ``v`` 0 not labeled, 1 occluded, 2 visible); which name each slot holds
comes from the config's keypoint lists (`pose_slots`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from loop.detections import Detections, FloatArray
from loop.errors import ConversionError, UnknownLabelError
from loop.keypoints import InstanceKeypoints, Keypoint, KeypointNames, check_instance_keypoints
from loop.polygons import Rings, as_ring, polygons_to_detections


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


def merge_rings(rings: Rings) -> FloatArray:
    """The rings of one instance as one ``(k, 2)`` ring: each further ring is joined to the path
    so far at their closest pair of vertices, walked round once and left by the same bridge.

    Each bridge is traversed twice in opposite directions, so the even-odd fill (and Ultralytics'
    polygon fill) of the result covers the same pixels as the rings: holes stay holes and parts
    stay parts. One ring is returned unchanged.
    """
    if not rings:
        raise ConversionError("an instance without rings has no polygon to write")
    merged = np.asarray(rings[0], dtype=np.float64)
    for ring in rings[1:]:
        r = np.asarray(ring, dtype=np.float64)
        d = ((merged[:, None, :] - r[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        loop_r = np.concatenate([r[j:], r[: j + 1]])  # from r[j] round to r[j] again
        merged = np.concatenate([merged[: i + 1], loop_r, merged[i:]])
    return merged


def polygons_to_yolo_seg_lines(
    det: Detections, polygons: tuple[Rings, ...], precision: int = 6
) -> list[str]:
    """Pixel instances -> Ultralytics segmentation lines ``cls x1 y1 x2 y2 ...`` (normalised,
    fixed ``precision`` decimals, one line per box in ``det``'s order).

    ``polygons``: one `Rings` per box (`loop.datasets.LabeledImage.polygons`), or ``()`` for
    boxes only. A box without rings is written as its 4-corner rectangle, since Ultralytics reads
    a label file as all boxes or all polygons. Several rings are joined by `merge_rings`.
    """
    if polygons and len(polygons) != len(det):
        raise ConversionError(f"{len(det)} boxes but {len(polygons)} polygon instances")
    w, h = det.image_wh
    scale = np.array([w, h], dtype=np.float64)
    out = []
    for i, ((x1, y1, x2, y2), cls) in enumerate(zip(det.xyxy, det.class_id, strict=True)):
        rings = polygons[i] if polygons else ()
        if rings:
            ring = merge_rings(rings)
        else:
            ring = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
        norm = np.clip(ring / scale, 0.0, 1.0)
        coords = " ".join(f"{x:.{precision}f} {y:.{precision}f}" for x, y in norm.tolist())
        out.append(f"{int(cls)} {coords}")
    return out


def yolo_seg_lines_to_polygons(
    lines: list[str] | str, image_wh: tuple[int, int], num_classes: int
) -> tuple[Detections, tuple[Rings, ...]]:
    """Ultralytics segmentation text (one polygon per line; blank lines ignored) -> pixel boxes
    and one ring per box, each box its ring's bounding box.

    Raises `ConversionError` for an odd number of coordinates, fewer than 3 points, values
    outside ``[0, 1]`` or a degenerate ring, and `UnknownLabelError` for class ids outside
    ``[0, num_classes)``.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    scale = np.array(image_wh, dtype=np.float64)
    instances: list[tuple[int, Rings]] = []
    for lineno, raw in enumerate(lines, start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) < 7 or len(parts) % 2 == 0:
            raise ConversionError(
                f"line {lineno}: expected 'cls x1 y1 x2 y2 x3 y3 ...' (3 or more points), "
                f"got {raw[:80]!r}"
            )
        try:
            cls_f = float(parts[0])
            xy = np.array([float(p) for p in parts[1:]], dtype=np.float64).reshape(-1, 2)
        except ValueError:
            raise ConversionError(f"line {lineno}: non-numeric field in {raw[:80]!r}") from None
        if not math.isfinite(cls_f) or cls_f != int(cls_f) or not 0 <= int(cls_f) < num_classes:
            raise UnknownLabelError(
                f"line {lineno}: class id {parts[0]} is not a whole number in [0, {num_classes}); "
                "the class map is fixed by the project config"
            )
        if not np.all(np.isfinite(xy)) or np.any(xy < 0) or np.any(xy > 1):
            raise ConversionError(f"line {lineno}: coordinates must lie in [0, 1]")
        try:
            ring = as_ring(xy * scale)
        except ConversionError as exc:
            raise ConversionError(f"line {lineno}: {exc}") from None
        instances.append((int(cls_f), (ring,)))
    return polygons_to_detections(instances, image_wh)


def yolo_lines_to_instances(
    lines: list[str] | str, image_wh: tuple[int, int], num_classes: int
) -> tuple[Detections, tuple[Rings, ...]]:
    """A label file that may mix box lines (``cls cx cy w h``) and segmentation lines
    (``cls x1 y1 x2 y2 x3 y3 ...``) -> pixel boxes and, parallel to them, the rings (``()`` for a
    box line); ``()`` altogether when every line is a box. Errors name the line as
    `yolo_lines_to_detections` and `yolo_seg_lines_to_polygons` do."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    # Blank the other kind's lines, so that each parser numbers lines as in the file.
    is_box = [len(raw.split()) == 5 for raw in lines]
    boxes = yolo_lines_to_detections(
        [raw if box else "" for raw, box in zip(lines, is_box, strict=True)], image_wh, num_classes
    )
    segs, rings = yolo_seg_lines_to_polygons(
        ["" if box else raw for raw, box in zip(lines, is_box, strict=True)], image_wh, num_classes
    )
    if not len(segs):
        return boxes, ()
    det = Detections(
        np.concatenate([boxes.xyxy, segs.xyxy]),
        np.concatenate([boxes.class_id, segs.class_id]),
        image_wh,
    )
    return det, tuple(() for _ in range(len(boxes))) + rings


# --- Ultralytics pose lines ------------------------------------------------------------------
def pose_slots(classes: Sequence[str], keypoints: KeypointNames) -> tuple[tuple[str, ...], ...]:
    """Per class id, its keypoint names in slot order (`loop.keypoints`): the layout of a pose
    export. Every class must name its keypoints; the slot count ``K`` of the export is the
    largest list (a class with fewer keypoints leaves its last slots at visibility 0).

    Raises `ConversionError` naming the first class without keypoints.
    """
    missing = [c for c in classes if not keypoints.get(c)]
    if missing:
        raise ConversionError(
            f"class {missing[0]!r} has no keypoints in the config, so the pose export has no "
            f"fixed keypoint count for it; list its keypoints under keypoints: {missing[0]}: "
            "[...] (every class needs them)"
        )
    return tuple(tuple(keypoints[c]) for c in classes)


def instances_to_yolo_pose_lines(
    det: Detections,
    keypoints: Sequence[InstanceKeypoints],
    slots: Sequence[Sequence[str]],
    precision: int = 6,
) -> list[str]:
    """Pixel boxes and their keypoints -> Ultralytics pose lines
    ``cls cx cy w h x1 y1 v1 ... xK yK vK`` (normalised; ``K`` = the longest list of ``slots``;
    a keypoint that is not labeled, or a slot the class does not have, is ``0 0 0``).

    ``keypoints``: one `InstanceKeypoints` per box, or ``()`` for none. ``slots``: per class id,
    its names (`pose_slots`). Raises `ConversionError` for a keypoint name its class does not
    have.
    """
    if keypoints and len(keypoints) != len(det):
        raise ConversionError(f"{len(det)} boxes but {len(keypoints)} keypoint instances")
    k = max(len(s) for s in slots)
    w, h = det.image_wh
    boxes = detections_to_yolo_lines(det, precision)
    out = []
    for i, (line, cls) in enumerate(zip(boxes, det.class_id.tolist(), strict=True)):
        names = list(slots[int(cls)])
        values = [[0.0, 0.0, 0] for _ in range(k)]
        for kp in keypoints[i] if keypoints else ():
            if kp.name not in names:
                raise ConversionError(
                    f"keypoint {kp.name!r} of a class-{int(cls)} instance is not one of its "
                    f"configured keypoints {names}; add it to the config or relabel it"
                )
            values[names.index(kp.name)] = [kp.x / w, kp.y / h, kp.visibility]
        coords = " ".join(
            f"{min(max(x, 0.0), 1.0):.{precision}f} {min(max(y, 0.0), 1.0):.{precision}f} {v}"
            for x, y, v in values
        )
        out.append(f"{line} {coords}")
    return out


def yolo_pose_lines_to_instances(
    lines: list[str] | str, image_wh: tuple[int, int], slots: Sequence[Sequence[str]]
) -> tuple[Detections, tuple[InstanceKeypoints, ...]]:
    """Ultralytics pose text (``cls cx cy w h`` then ``K`` triples ``x y v``, normalised; blank
    lines ignored) -> pixel boxes and, parallel to them, their keypoints (visibility 0 = not
    labeled: left out); ``()`` altogether when no line holds a keypoint.

    Raises `ConversionError` for a wrong field count, values outside ``[0, 1]``, a visibility
    other than 0, 1 or 2, or a labeled keypoint in a slot its class does not have, and
    `UnknownLabelError` for a class id outside ``slots``.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    k = max(len(s) for s in slots)
    w, h = image_wh
    box_lines: list[str] = []
    triples: list[tuple[int, list[list[float]]]] = []
    for lineno, raw in enumerate(lines, start=1):
        parts = raw.split()
        if not parts:
            box_lines.append("")
            continue
        if len(parts) != 5 + 3 * k:
            raise ConversionError(
                f"line {lineno}: expected {5 + 3 * k} fields 'cls cx cy w h' + {k} x 'x y v', "
                f"got {len(parts)}"
            )
        box_lines.append(" ".join(parts[:5]))
        try:
            vals = np.array([float(p) for p in parts[5:]], dtype=np.float64).reshape(k, 3)
        except ValueError:
            raise ConversionError(f"line {lineno}: non-numeric field in {raw[:80]!r}") from None
        triples.append((lineno, vals.tolist()))
    det = yolo_lines_to_detections(box_lines, image_wh, len(slots))
    out: list[InstanceKeypoints] = []
    for (lineno, slot_values), cls in zip(triples, det.class_id.tolist(), strict=True):
        names = slots[int(cls)]
        points = []
        for slot, (x, y, v) in enumerate(slot_values):
            if v not in (0.0, 1.0, 2.0):
                raise ConversionError(f"line {lineno}: keypoint visibility {v} is not 0, 1 or 2")
            if v == 0:
                continue
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise ConversionError(f"line {lineno}: keypoint {slot} lies outside [0, 1]")
            if slot >= len(names):
                raise ConversionError(
                    f"line {lineno}: keypoint slot {slot} is labeled, but class {int(cls)} has "
                    f"only {len(names)} keypoints"
                )
            points.append(Keypoint(names[slot], x * w, y * h, int(v)))
        out.append(check_instance_keypoints(points, image_wh, f"line {lineno}"))
    return det, tuple(out) if any(out) else ()
