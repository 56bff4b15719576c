"""Label Studio JSON <-> `Detections`, and the rules that turn an exported task into a label.

Pure: dicts in, dicts or `Detections` out (only `check_image_url` looks at the file system, to
resolve a path under the document root). The Label Studio gateway (`loop.labelstudio`) moves
the JSON; what it means is decided here, so table tests reach every rule without a server.

A Label Studio rectangle region: ``value.x, value.y`` top-left corner and ``value.width,
value.height``, all in percent (0-100) of ``original_width`` / ``original_height``, top-left origin,
with ``value.rotation`` in degrees and ``value.rectanglelabels`` a one-element list of class names.
A polygon region (``polygonlabels``, ``value.points`` a list of ``[x, y]`` in percent) becomes its
bounding box, or, when a pull keeps polygons (``segment`` projects), a polygon instance: its ring
in pixels (`ls_points_to_ring`) with the box derived from it (`ls_results_to_instances`).
`Detections` hold pixel ``xyxy``; rings are `loop.polygons` pixel arrays.

A brush region (``brushlabels``, ``value.rle`` Label Studio's run-length code of the painted
pixels) is decoded by the `BrushDecoder` the gateway hands in (label-studio-sdk's, in
`loop.labelstudio.brush`) and traced into pixel-edge rings (`loop.formats.masks`), one instance
per region (`ls_brush_to_rings`). A keypoint region (``keypointlabels``, ``value.x, value.y`` in
percent, one label ``<class>/<name>``) belongs to the region named by its ``parentID`` or, without
one, to the instance `loop.keypoints.assign_to_instance` picks (`ls_results_to_keypoints`).

Task data pushed by defect-loop: ``{"image": url, "sha256": hex digest, "priority": float,
"width": px, "height": px}``; ``url`` is ``/data/local-files/?d=<path relative to the document
root>``. The rules of a pull (`judge_task`): among a task's non-cancelled annotations, one marked
ground_truth wins, else the most recently updated; no regions is a defect-free image (sized by the
task data), with or without the ``defect-free`` choice; a task whose annotations were all
cancelled was skipped by the labeler (not a negative); several annotators' latest annotations are
kept with their agreement; anything malformed rejects that one task with the reason.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import numpy.typing as npt

from loop.annotation_log import AnnotationRecord
from loop.corrections import mean_pairwise_f1
from loop.detections import Detections, FloatArray
from loop.errors import (
    ConversionError,
    InvalidDetectionsError,
    TaskRejectedError,
    UnknownLabelError,
)
from loop.keypoints import (
    DEFAULT_VISIBILITY,
    InstanceKeypoints,
    Keypoint,
    KeypointNames,
    assign_to_instance,
    check_instance_keypoints,
    keypoint_label,
    keypoint_labels,
)
from loop.labeling import PulledLabel
from loop.polygons import Rings, as_ring, ring_self_intersects, rings_bbox

RECTANGLE = "rectanglelabels"
POLYGON = "polygonlabels"
BRUSH = "brushlabels"
KEYPOINT = "keypointlabels"
FROM_NAME = "label"
POLYGON_NAME = "polygon"
BRUSH_NAME = "brush"
KEYPOINT_NAME = "keypoint"
TO_NAME = "image"
VERDICT_NAME = "verdict"
DEFECT_FREE = "defect-free"
LOCAL_FILES_PREFIX = "/data/local-files/"
_PCT_TOLERANCE = 1e-6
_DM_DATETIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the Data Manager's Datetime filter format (UTC)


# Decodes a brush region's ``value.rle`` for an image of ``(width, height)`` pixels into its
# ``(height, width)`` bool mask; raises `ConversionError` when it cannot. The gateway passes
# label-studio-sdk's (`loop.labelstudio.brush.rle_to_mask`), so this module needs no SDK.
BrushDecoder = Callable[[Any, tuple[int, int]], npt.NDArray[np.bool_]]


class UnsafeImagePathError(ConversionError):
    """A task's image path points outside Label Studio's document root (``..`` or absolute)."""


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


# --- regions -------------------------------------------------------------------------------
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


def ls_points_to_ring(points: Any, image_wh: tuple[int, int], region: Any = None) -> FloatArray:
    """Label Studio polygon ``points`` (``[[x, y], ...]`` in percent of width / height) -> a
    pixel ring (`loop.polygons.as_ring`). Points within 1e-6 % outside the image are clipped.

    Raises `ConversionError` for non-numeric points, fewer than 3 distinct points, points outside
    0-100 %, zero area, or a ring that crosses or touches itself.
    """
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ConversionError(f"polygon {region!r} has non-numeric points") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.all(np.isfinite(pts)):
        raise ConversionError(f"polygon {region!r} needs at least 3 [x, y] points")
    if np.any(pts < -_PCT_TOLERANCE) or np.any(pts > 100 + _PCT_TOLERANCE):
        raise ConversionError(
            f"polygon {region!r} has points outside the image (coordinates must be 0-100 %)"
        )
    w, h = image_wh
    try:
        ring = as_ring(np.clip(pts, 0.0, 100.0) / 100.0 * np.array([w, h], dtype=np.float64))
    except ConversionError as exc:
        raise ConversionError(f"polygon {region!r}: {exc}; redraw it") from None
    if ring_self_intersects(ring):
        raise ConversionError(
            f"polygon {region!r} crosses or touches itself; redraw it as a simple outline "
            "(one polygon per part)"
        )
    return ring


def ring_to_ls_points(ring: FloatArray, image_wh: tuple[int, int]) -> list[list[float]]:
    """A pixel ring -> Label Studio polygon ``points`` in percent (the inverse of
    `ls_points_to_ring` for points inside the image)."""
    w, h = image_wh
    pct = np.asarray(ring, dtype=np.float64) / np.array([w, h], dtype=np.float64) * 100.0
    return [[float(x), float(y)] for x, y in pct]


def ls_results_to_instances(
    results: list[dict[str, Any]],
    class_names: list[str],
    image_wh: tuple[int, int] | None = None,
    *,
    brush: BrushDecoder | None = None,
) -> tuple[Detections, tuple[Rings, ...]]:
    """Label Studio results -> pixel boxes and, parallel to them, each region's rings: a polygon
    region gives one ring and its box is the ring's bounding box; a rectangle gives ``()`` (and
    without any polygon region the whole tuple is ``()``: boxes only). With ``brush`` (a
    `BrushDecoder`) a brush region gives the rings of its painted pixels (`ls_brush_to_rings`)
    and their bounding box; without it brush regions are ignored.

    Validates every region as `ls_results_to_detections` does (polygons: also as
    `ls_points_to_ring`); other result types are ignored.
    """
    if not isinstance(results, list):
        raise ConversionError(f"results must be a list of regions, got {type(results).__name__}")
    brush_rings: dict[int, Rings] = {}
    if brush is not None:
        results, brush_rings = _brushes_as_rectangles(results, image_wh, brush)
    regions = [r for r in results if isinstance(r, dict) and r.get("type") in (RECTANGLE, POLYGON)]
    det = ls_results_to_detections(_region_results(results), class_names, image_wh)
    xyxy = det.xyxy.copy()
    polygons: list[Rings] = []
    for i, r in enumerate(regions):
        if i in brush_rings:
            xyxy[i] = rings_bbox(brush_rings[i])
            polygons.append(brush_rings[i])
            continue
        if r.get("type") != POLYGON:
            polygons.append(())
            continue
        ring = ls_points_to_ring(r["value"].get("points"), det.image_wh, r.get("id", f"#{i}"))
        xyxy[i] = rings_bbox((ring,))
        polygons.append((ring,))
    # Rectangles only: boxes only (the same labels as without polygons).
    return Detections(xyxy, det.class_id, det.image_wh), tuple(polygons) if any(polygons) else ()


def ls_brush_to_rings(
    value: Any, image_wh: tuple[int, int], decode: BrushDecoder, region: Any = None
) -> Rings:
    """A brush region's ``value`` (``{"format": "rle", "rle": [...], "brushlabels": [...]}``)
    -> the pixel-edge rings of its painted pixels (`loop.formats.masks.mask_to_polygons`, every
    8-connected part kept, however small; holes as inner rings): one instance, whose even-odd
    fill at pixel centres is exactly the painted pixels.

    Raises `ConversionError` for a format other than ``rle``, an RLE that ``decode`` refuses,
    or an empty mask.
    """
    from loop.formats.masks import mask_to_polygons

    if not isinstance(value, dict):
        raise ConversionError(
            f"brush {region!r}: value must be an object, got {type(value).__name__}"
        )
    if value.get("format", "rle") != "rle":
        raise ConversionError(
            f"brush {region!r}: format {value.get('format')!r} is not 'rle'; repaint it"
        )
    try:
        mask = decode(value.get("rle"), image_wh)
    except ConversionError as exc:
        raise ConversionError(f"brush {region!r}: {exc}") from None
    if not mask.any():
        raise ConversionError(
            f"brush {region!r} is empty (no painted pixel); paint the defect or delete the region"
        )
    found = mask_to_polygons(mask.astype(np.uint8), threshold=1, min_area=1)
    return tuple(ring for rings in found.instances for ring in rings)


def _brushes_as_rectangles(
    results: list[Any], image_wh: tuple[int, int] | None, decode: BrushDecoder
) -> tuple[list[Any], dict[int, Rings]]:
    """``results`` with each brush region replaced by the rectangle result of its rings' box
    (so labels and sizes are checked like any region), and region index -> its rings."""
    out: list[Any] = []
    rings_at: dict[int, Rings] = {}
    n_regions = 0
    for i, r in enumerate(results):
        kind = r.get("type") if isinstance(r, dict) else None
        if kind != BRUSH:
            out.append(r)
            n_regions += kind in (RECTANGLE, POLYGON)
            continue
        rid = r.get("id", f"#{i}")
        wh = image_wh
        if "original_width" in r or "original_height" in r:
            wh = (
                _size(r.get("original_width"), "original_width", rid),
                _size(r.get("original_height"), "original_height", rid),
            )
        if wh is None:
            raise ConversionError(f"brush {rid!r} carries no original_width/height")
        value = r.get("value")
        rings = ls_brush_to_rings(value, wh, decode, rid)
        x1, y1, x2, y2 = rings_bbox(rings)
        w, h = wh
        rect = {k: v for k, v in r.items() if k != "value"}
        rect["type"] = RECTANGLE
        rect["value"] = {
            "x": x1 / w * 100.0,
            "y": y1 / h * 100.0,
            "width": (x2 - x1) / w * 100.0,
            "height": (y2 - y1) / h * 100.0,
            "rotation": 0,
            RECTANGLE: value.get(BRUSH),
        }
        out.append(rect)
        rings_at[n_regions] = rings
        n_regions += 1
    return out, rings_at


def mask_to_ls_brush_result(
    rle: list[int],
    class_name: str,
    image_wh: tuple[int, int],
    region_id: str,
    from_name: str = BRUSH_NAME,
    to_name: str = TO_NAME,
) -> dict[str, Any]:
    """A brush region result from an already encoded ``rle`` (`loop.labelstudio.brush.
    mask_to_rle`) of class ``class_name`` on an image of ``image_wh`` pixels."""
    w, h = image_wh
    return {
        "id": region_id,
        "type": BRUSH,
        "from_name": from_name,
        "to_name": to_name,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": list(rle), BRUSH: [class_name]},
    }


def keypoint_to_ls_result(
    kp: Keypoint,
    class_name: str,
    image_wh: tuple[int, int],
    region_id: str,
    parent_id: str | None = None,
    from_name: str = KEYPOINT_NAME,
    to_name: str = TO_NAME,
) -> dict[str, Any]:
    """A pixel keypoint of an instance of ``class_name`` -> a ``keypointlabels`` result (percent
    coordinates, label ``<class>/<name>``), linked to the region ``parent_id`` when given."""
    w, h = image_wh
    result: dict[str, Any] = {
        "id": region_id,
        "type": KEYPOINT,
        "from_name": from_name,
        "to_name": to_name,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "x": kp.x / w * 100.0,
            "y": kp.y / h * 100.0,
            "width": 0.5,
            KEYPOINT: [keypoint_label(class_name, kp.name)],
        },
    }
    if parent_id is not None:
        result["parentID"] = parent_id
    return result


def ls_results_to_keypoints(
    results: list[dict[str, Any]],
    det: Detections,
    polygons: Sequence[Rings],
    class_names: list[str],
    keypoints: KeypointNames,
    *,
    brush: bool = False,
) -> tuple[InstanceKeypoints, ...]:
    """The ``keypointlabels`` regions of ``results`` -> keypoints (pixels) per instance of
    ``det`` (the instances made from the same ``results``: rectangles and polygons, and brush
    regions when ``brush``, in result order; ``polygons`` their rings or ``()``). ``()`` when
    there is no keypoint.

    Each keypoint belongs to the region its ``parentID`` names (which must be one of those
    instances, of the keypoint's class), else to `loop.keypoints.assign_to_instance`'s choice
    among the instances of its class. Raises `UnknownLabelError` for a label that is not a
    configured ``<class>/<name>``, and `ConversionError` for coordinates outside 0-100 %, a
    size other than the image's, a parent that is missing or of another class, no instance of
    the class, or one name twice on one instance.
    """
    table = keypoint_labels(keypoints, class_names)
    kinds = (RECTANGLE, POLYGON, BRUSH) if brush else (RECTANGLE, POLYGON)
    region_ids = [r.get("id") for r in results if isinstance(r, dict) and r.get("type") in kinds]
    if len(region_ids) != len(det):
        raise ConversionError(
            f"{len(region_ids)} regions but {len(det)} instances: keypoints cannot be placed"
        )
    w, h = det.image_wh
    per: list[dict[str, Keypoint]] = [{} for _ in range(len(det))]
    for i, r in enumerate(results):
        if not isinstance(r, dict) or r.get("type") != KEYPOINT:
            continue
        rid = r.get("id", f"#{i}")
        value = r.get("value")
        if not isinstance(value, dict):
            raise ConversionError(
                f"keypoint {rid!r}: value must be an object, got {type(value).__name__}"
            )
        labels = value.get(KEYPOINT)
        if not isinstance(labels, list) or len(labels) != 1:
            raise ConversionError(f"keypoint {rid!r} must carry exactly one label, got {labels!r}")
        label = labels[0]
        if not isinstance(label, str) or label not in table:
            raise UnknownLabelError(
                f"keypoint label {str(label)[:80]!r} is not one of the configured keypoints "
                f"{list(table)}"
            )
        if "x" not in value or "y" not in value:
            raise ConversionError(f"keypoint {rid!r} lacks numeric x/y")
        x, y = _number(value["x"], "x", rid), _number(value["y"], "y", rid)
        lo, hi = -_PCT_TOLERANCE, 100.0 + _PCT_TOLERANCE
        if not (lo <= x <= hi and lo <= y <= hi):
            raise ConversionError(
                f"keypoint {rid!r} ({label}) lies outside the image (x={x}, y={y} %)"
            )
        if "original_width" in r or "original_height" in r:
            r_wh = (
                _size(r.get("original_width"), "original_width", rid),
                _size(r.get("original_height"), "original_height", rid),
            )
            if r_wh != (w, h):
                raise ConversionError(
                    f"keypoint {rid!r} was placed on a {r_wh[0]}x{r_wh[1]} image, the regions "
                    f"on {w}x{h}; re-annotate the task"
                )
        px = min(max(x, 0.0), 100.0) / 100.0 * w
        py = min(max(y, 0.0), 100.0) / 100.0 * h
        cls, name = table[label]
        cid = class_names.index(cls)
        parent = r.get("parentID")
        if parent not in (None, ""):
            owners = [j for j, pid in enumerate(region_ids) if pid == parent]
            if len(owners) != 1:
                raise ConversionError(
                    f"keypoint {rid!r} ({label}) is linked to region {str(parent)[:40]!r}, "
                    f"which the annotation holds {len(owners)} times; link it to one region"
                )
            j = owners[0]
            if int(det.class_id[j]) != cid:
                raise ConversionError(
                    f"keypoint {rid!r} ({label}) is linked to a "
                    f"{class_names[int(det.class_id[j])]!r} region; a {cls!r} keypoint belongs "
                    f"to a {cls!r} region"
                )
        else:
            found = assign_to_instance(px, py, cid, det, polygons)
            if found is None:
                raise ConversionError(
                    f"keypoint {rid!r} ({label}) has no {cls!r} region to belong to; draw the "
                    "region or delete the keypoint"
                )
            j = found
        if name in per[j]:
            raise ConversionError(
                f"two {label!r} keypoints belong to one {cls!r} region (the second is "
                f"{rid!r}); delete one"
            )
        per[j][name] = Keypoint(name, px, py, DEFAULT_VISIBILITY)
    out = tuple(
        check_instance_keypoints(d.values(), (w, h), f"instance {j}") for j, d in enumerate(per)
    )
    return out if any(out) else ()


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


def without_scores(det: Detections) -> Detections:
    """``det``'s boxes and classes without confidences (what a labeler submits)."""
    return Detections(det.xyxy, det.class_id, det.image_wh)


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


def _prediction_instances(
    results: Iterable[dict[str, Any]],
    class_names: list[str],
    wh: tuple[int, int],
    polygons: bool,
) -> tuple[Detections | None, tuple[Rings, ...]]:
    """Prediction regions -> `Detections` (confidences from region scores) and, with
    ``polygons`` (``segment`` projects), one `Rings` per region parallel to it (a polygon
    region's ring in pixels, ``()`` for a rectangle; ``()`` overall without any polygon).
    Without ``polygons`` it is `_prediction_detections` (rectangles only). ``(None, ())`` when
    the prediction is unusable."""
    if not polygons:
        return _prediction_detections(results, class_names, wh), ()
    regions = [r for r in results if isinstance(r, dict) and r.get("type") in (RECTANGLE, POLYGON)]
    try:
        det, rings = ls_results_to_instances(regions, class_names, image_wh=wh)
    except (*_TASK_ERRORS, *_MALFORMED):
        return None, ()
    scores = [r.get("score") for r in regions]
    ok = all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
    if regions and ok and np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        conf = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        det = Detections(det.xyxy, det.class_id, det.image_wh, confidence=conf)
    return det, rings


# --- fields of an exported task --------------------------------------------------------------
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


def parse_time(value: Any) -> datetime | None:
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def task_key(task: Any) -> int:
    """A task's id, or -1 when it has none usable (never raises)."""
    tid = _whole(task.get("id")) if isinstance(task, dict) else None
    return -1 if tid is None else tid


def _sort_key(annotation: dict[str, Any]) -> tuple[bool, datetime, int]:
    # Ground truth first, then the most recently updated, then the highest id.
    when = parse_time(annotation.get("updated_at") or annotation.get("created_at")) or _EPOCH
    return (bool(annotation.get("ground_truth")), when, _whole(annotation.get("id")) or 0)


def local_file_url(rel: str) -> str:
    """The task image URL of the file at POSIX path ``rel`` below Label Studio's document root
    (``/data/local-files/?d=<rel>``, percent-quoted)."""
    return f"{LOCAL_FILES_PREFIX}?d={quote(rel, safe='/')}"


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
        if when not in (None, "") and (not isinstance(when, str) or parse_time(when) is None):
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


# --- the pull rules ------------------------------------------------------------------------
# Errors a malformed task can raise on its way through the converters. The named ones carry a
# message of their own; the others are a last line of defence (a field of an unexpected type
# that no check foresaw) and still become a rejection of that one task.
_TASK_ERRORS = (UnknownLabelError, ConversionError, InvalidDetectionsError)

_MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


@dataclass(frozen=True)
class TaskVerdict:
    """What a pull makes of one exported task: a usable ``label``, a ``rejected`` task (with the
    reason; ``__cause__`` holds the named error), ``skipped`` (every annotation was cancelled:
    the labeler skipped it, it is not a negative), or none of these (no annotation at all)."""

    task_id: int
    label: PulledLabel | None = None
    rejected: TaskRejectedError | None = None
    skipped: bool = False


def judge_task(
    task: dict[str, Any],
    class_names: list[str],
    users: Mapping[int, str],
    document_root: Path | None = None,
    max_regions: int | None = None,
    *,
    polygons: bool = False,
    keypoints: KeypointNames | None = None,
    brush: BrushDecoder | None = None,
) -> TaskVerdict:
    """The verdict on one task of Label Studio's JSON export (see the module docstring).

    ``users``: user id -> e-mail (names the annotators). ``document_root``: refuse image paths
    that resolve outside it. Rejected: an unknown label, a rotated box, coordinates outside
    0-100 %, a zero-area box, more than ``max_regions`` regions, an image path escaping the
    document root, defect-free with regions, a missing size or sha256, or any field of any
    annotation malformed. With ``polygons`` (``segment`` projects) a polygon region is kept as
    a polygon instance (`ls_results_to_instances`), and a polygon that crosses itself also
    rejects the task; with ``brush`` too (the gateway's `BrushDecoder`) a brush region is kept
    as a polygon instance, and an empty or undecodable one rejects the task. ``keypoints`` (the
    config's names per class): keypoint regions are kept per instance
    (`ls_results_to_keypoints`); an unknown keypoint label, one outside the image or one without
    a region of its class rejects the task. Never raises for bad input.
    """
    task_id = task_key(task)
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
            return TaskVerdict(task_id, skipped=bool(anns))
        check_image_url((task.get("data") or {}).get("image"), document_root)
        label = _to_label(
            task, live, class_names, users, max_regions, polygons, keypoints=keypoints, brush=brush
        )
        return TaskVerdict(task_id, label=label)
    except _TASK_ERRORS as exc:
        rejected = TaskRejectedError(task_id, f"{type(exc).__name__}: {exc}")
        rejected.__cause__ = exc
        return TaskVerdict(task_id, rejected=rejected)
    except _MALFORMED as exc:
        rejected = TaskRejectedError(
            task_id,
            f"malformed annotation data ({type(exc).__name__}: {exc}); fix or delete the "
            "annotation in Label Studio",
        )
        rejected.__cause__ = exc
        return TaskVerdict(task_id, rejected=rejected)


def _annotator(ann: dict[str, Any], users: Mapping[int, str]) -> str:
    completed_by = ann.get("completed_by")
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id"))
    uid = _whole(completed_by)
    if uid is not None:
        return users.get(uid, str(uid))
    return "unknown" if completed_by is None else str(completed_by)


def _annotation_labels(
    ann: dict[str, Any],
    class_names: list[str],
    data_wh: tuple[int, int] | None,
    max_regions: int | None = None,
    polygons: bool = False,
    keypoints: KeypointNames | None = None,
    brush: BrushDecoder | None = None,
) -> tuple[Detections, tuple[Rings, ...], tuple[InstanceKeypoints, ...]]:
    """One annotation's boxes, with ``polygons`` their rings (brush regions too with
    ``brush``; else ``()``) and with ``keypoints`` their keypoints (else ``()``)."""
    raw = ann.get("result") or []
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConversionError(f"annotation {ann.get('id')}: result must be a list of objects")
    n_regions = sum(1 for r in raw if r.get("type") in (RECTANGLE, POLYGON, BRUSH, KEYPOINT))
    if max_regions is not None and n_regions > max_regions:
        raise ConversionError(
            f"annotation {ann.get('id')} has {n_regions} regions, more than "
            f"labelstudio.max_regions ({max_regions}); split the image or raise the limit"
        )
    results = _region_results(raw)
    if polygons and brush is not None:
        brushes = [r for r in raw if r.get("type") == BRUSH]
        for r in brushes:
            # Checked before decoding: the decoder allocates the whole image the region claims.
            if data_wh is None:
                raise ConversionError(
                    f"brush {r.get('id')!r}: the task data has no width/height to decode it "
                    "against; push the image again through defect-loop"
                )
            claimed = (r.get("original_width", data_wh[0]), r.get("original_height", data_wh[1]))
            if claimed != data_wh:
                raise ConversionError(
                    f"brush {r.get('id')!r} was painted on a {claimed[0]}x{claimed[1]} image but "
                    f"the task's image is {data_wh[0]}x{data_wh[1]} px; repaint it"
                )
        results += brushes
    points = [r for r in raw if r.get("type") == KEYPOINT] if keypoints else []
    defect_free = _marked_defect_free(raw)  # also validates the verdict choice
    if (results or points) and defect_free:
        raise ConversionError(
            f"annotation {ann.get('id')} is marked {DEFECT_FREE!r} but has "
            f"{len(results) + len(points)} regions; remove the regions or untick the choice in "
            "Label Studio"
        )
    if data_wh is None and not results:
        raise ConversionError(
            "image size unknown: the annotation has no regions and the task data no "
            "width/height; push the image again through defect-loop"
        )
    sized = any("original_width" in r or "original_height" in r for r in results)
    wh = None if sized else data_wh
    rings: tuple[Rings, ...] = ()
    if polygons:
        det, rings = ls_results_to_instances(raw, class_names, image_wh=wh, brush=brush)
    else:
        det = ls_results_to_detections(results, class_names, image_wh=wh)
    if data_wh is not None and det.image_wh != data_wh:
        w, h = det.image_wh
        raise ConversionError(
            f"annotation was drawn on a {w}x{h} image but the task's image is "
            f"{data_wh[0]}x{data_wh[1]} px; re-annotate the task"
        )
    kps: tuple[InstanceKeypoints, ...] = ()
    if points and keypoints:
        kps = ls_results_to_keypoints(
            raw, det, rings, class_names, keypoints, brush=polygons and brush is not None
        )
    return det, rings, kps


def _to_label(
    task: dict[str, Any],
    live: list[dict[str, Any]],
    class_names: list[str],
    users: Mapping[int, str],
    max_regions: int | None = None,
    polygons: bool = False,
    *,
    keypoints: KeypointNames | None = None,
    brush: BrushDecoder | None = None,
) -> PulledLabel:
    task_id = task_key(task)
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
    det, rings, kps = _annotation_labels(
        ann, class_names, data_wh, max_regions, polygons, keypoints, brush
    )

    # Every annotator's latest annotation is kept (annotation log, consensus) and, with
    # several, their agreement is measured.
    # Per annotator: their ground-truth annotation, else their most recent one (as for the task).
    latest: dict[str, dict[str, Any]] = {}
    for a in sorted(live, key=_sort_key):
        latest[_annotator(a, users)] = a
    per_annotator: dict[str, Detections] = {}
    unusable: dict[str, str] = {}
    records: list[AnnotationRecord] = []
    for name, a in latest.items():
        if a is ann:
            boxes, a_rings, a_kps = det, rings, kps
        else:
            # Only the chosen annotation makes the label: another annotator's unusable
            # annotation just leaves the agreement (and the log) without it, with the reason.
            try:
                boxes, a_rings, a_kps = _annotation_labels(
                    a, class_names, data_wh or det.image_wh, max_regions, polygons, keypoints, brush
                )
            except (*_TASK_ERRORS, *_MALFORMED) as exc:
                unusable[name] = f"annotation {a.get('id')}: {type(exc).__name__}: {exc}"
                continue
        per_annotator[name] = boxes
        a_lead = a.get("lead_time")
        records.append(
            AnnotationRecord(
                annotator=name,
                annotation_id=int(_whole(a["id"]) or 0),
                boxes=boxes,
                lead_time=float(a_lead) if a_lead is not None else None,
                updated_at=parse_time(a.get("updated_at") or a.get("created_at")),
                ground_truth=bool(a.get("ground_truth")),
                polygons=a_rings,
                keypoints=a_kps,
            )
        )
    agreement: float | None = None
    if len(latest) > 1:
        agreement = mean_pairwise_f1(list(per_annotator.values()))
    else:
        per_annotator = {}

    pred_det: Detections | None = None
    pred_rings: tuple[Rings, ...] = ()
    pred_mv: str | None = None
    pred = ann.get("prediction")
    if isinstance(pred, dict) and isinstance(pred.get("result"), list):
        mv = pred.get("model_version")
        pred_mv = mv if isinstance(mv, str) else None
        pred_det, pred_rings = _prediction_instances(
            pred["result"], class_names, data_wh or det.image_wh, polygons
        )

    lead = ann.get("lead_time")
    return PulledLabel(
        task_id=task_id,
        sha256=str(sha),
        detections=det,
        annotation_id=int(_whole(ann["id"]) or 0),
        annotator=_annotator(ann, users),
        lead_time=float(lead) if lead is not None else None,
        updated_at=parse_time(ann.get("updated_at") or ann.get("created_at")),
        ground_truth=bool(ann.get("ground_truth")),
        prediction=pred_det,
        prediction_model_version=pred_mv,
        prediction_polygons=pred_rings,
        annotators=tuple(latest),
        agreement=agreement,
        per_annotator=per_annotator,
        image_url=data.get("image") if isinstance(data.get("image"), str) else None,
        polygons=rings,
        keypoints=kps,
        annotations=tuple(records),
        unusable=unusable,
    )


# --- polygon pre-annotations ----------------------------------------------------------------
def _point_in_ring(point: FloatArray, ring: FloatArray) -> bool:
    """Whether ``point`` (x, y) lies inside ``ring`` by the even-odd rule (ray towards +x)."""
    x, y = float(point[0]), float(point[1])
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    spans = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(spans & (x < xc)) % 2)


def outer_rings(rings: Rings) -> Rings:
    """The rings of one instance that bound its area from outside: those inside an even number
    (0, 2 ...) of the instance's other rings. The others are holes, which a Label Studio
    polygon cannot carry (one region = one simple outline)."""
    out = []
    for i, ring in enumerate(rings):
        # A vertex nudged towards the ring's centroid tests the ring's inside, not its border.
        probe = ring[0] + 1e-6 * (ring.mean(axis=0) - ring[0])
        depth = sum(_point_in_ring(probe, other) for j, other in enumerate(rings) if j != i)
        if depth % 2 == 0:
            out.append(ring)
    return tuple(out)


def instances_to_ls_results(
    det: Detections,
    class_names: list[str],
    from_name: str = POLYGON_NAME,
    to_name: str = TO_NAME,
    box_from_name: str = FROM_NAME,
) -> list[dict[str, Any]]:
    """Pixel instances (``det.polygons``, one tuple of rings per box) -> Label Studio
    ``polygonlabels`` results, ``points`` in percent of the image (`ring_to_ls_points`).

    Each outer ring of an instance (`outer_rings`) becomes one polygon region of the box's class
    with the box's confidence as its ``score``; holes are left out (Label Studio polygons have
    none), so an instance with a hole comes back from a labeler without it. A box without rings
    becomes a rectangle (``box_from_name``), as `detections_to_ls_results` writes it. The inverse,
    for single-ring instances, is `ls_results_to_instances`. Raises `ConversionError` when
    ``det`` has no polygons and `UnknownLabelError` for a class id without a name.
    """
    if det.polygons is None:
        raise ConversionError("these detections carry no polygons; use detections_to_ls_results")
    w, h = det.image_wh
    results: list[dict[str, Any]] = []
    for i, (cls, rings) in enumerate(zip(det.class_id, det.polygons, strict=True)):
        if not 0 <= int(cls) < len(class_names):
            raise UnknownLabelError(f"class id {int(cls)} has no name in {class_names}")
        score = None if det.confidence is None else float(det.confidence[i])
        if not rings:
            one = det[[i]]
            results.extend(
                detections_to_ls_results(
                    Detections(one.xyxy, one.class_id, one.image_wh, one.confidence),
                    class_names,
                    box_from_name,
                    to_name,
                )
            )
            continue
        for k, ring in enumerate(outer_rings(rings)):
            digest = hashlib.sha1(
                f"{i}:{k}:{int(cls)}:{np.round(ring, 3).tolist()}".encode()
            ).hexdigest()
            result: dict[str, Any] = {
                "id": digest[:10],
                "type": POLYGON,
                "from_name": from_name,
                "to_name": to_name,
                "original_width": w,
                "original_height": h,
                "image_rotation": 0,
                "value": {
                    "points": ring_to_ls_points(ring, (w, h)),
                    "closed": True,
                    POLYGON: [class_names[int(cls)]],
                },
            }
            if score is not None:
                result["score"] = score
            results.append(result)
    return results


def prediction_to_ls_results(det: Detections, class_names: list[str]) -> list[dict[str, Any]]:
    """The regions of a pre-annotation: polygons (`instances_to_ls_results`) when ``det``
    carries a segmentation model's outlines, rectangles (`detections_to_ls_results`) otherwise."""
    if det.polygons is None:
        return detections_to_ls_results(det, class_names)
    return instances_to_ls_results(det, class_names)
