"""Label Studio polygon, brush and keypoint regions <-> pixel instances (pure).

A polygon region (``polygonlabels``, ``value.points`` a list of ``[x, y]`` in percent) becomes its
bounding box, or, when a pull keeps polygons (``segment`` projects), a polygon instance: its ring
in pixels (`ls_points_to_ring`) with the box derived from it (`ls_results_to_instances`). Rings
are `loop.polygons` pixel arrays.

A brush region (``brushlabels``, ``value.rle`` Label Studio's run-length code of the painted
pixels) is decoded by the `BrushDecoder` the gateway hands in (label-studio-sdk's, in
`loop.labelstudio.brush`) and traced into pixel-edge rings (`loop.formats.masks`), one instance
per region (`ls_brush_to_rings`). A keypoint region (``keypointlabels``, ``value.x, value.y`` in
percent, one label ``<class>/<name>``) belongs to the region named by its ``parentID`` or, without
one, to the instance `loop.keypoints.assign_to_instance` picks (`ls_results_to_keypoints`).

Pre-annotations of a segmentation model are polygon regions, one per outer ring
(`instances_to_ls_results`, `prediction_to_ls_results`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from loop.detections import Detections, FloatArray
from loop.errors import (
    ConversionError,
    UnknownLabelError,
)
from loop.formats.labelstudio import (
    BRUSH,
    BRUSH_NAME,
    FROM_NAME,
    KEYPOINT,
    KEYPOINT_NAME,
    PCT_TOLERANCE,
    POLYGON,
    POLYGON_NAME,
    RECTANGLE,
    TO_NAME,
    BrushDecoder,
    detections_to_ls_results,
    ls_results_to_detections,
    number_field,
    region_result,
    region_size,
    region_value_label,
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
from loop.polygons import Rings, as_ring, ring_self_intersects, rings_bbox


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
    if np.any(pts < -PCT_TOLERANCE) or np.any(pts > 100 + PCT_TOLERANCE):
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
    det = ls_results_to_detections(region_results(results), class_names, image_wh)
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
        wh = region_size(r, rid) or image_wh
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
    value = {"format": "rle", "rle": list(rle), BRUSH: [class_name]}
    return region_result(region_id, BRUSH, value, image_wh, from_name, to_name)


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
    value = {
        "x": kp.x / w * 100.0,
        "y": kp.y / h * 100.0,
        "width": 0.5,
        KEYPOINT: [keypoint_label(class_name, kp.name)],
    }
    result = region_result(region_id, KEYPOINT, value, image_wh, from_name, to_name)
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
        value, label = region_value_label(r, KEYPOINT, rid)
        if not isinstance(label, str) or label not in table:
            raise UnknownLabelError(
                f"keypoint label {str(label)[:80]!r} is not one of the configured keypoints "
                f"{list(table)}"
            )
        if "x" not in value or "y" not in value:
            raise ConversionError(f"keypoint {rid!r} lacks numeric x/y")
        x, y = number_field(value["x"], "x", rid), number_field(value["y"], "y", rid)
        lo, hi = -PCT_TOLERANCE, 100.0 + PCT_TOLERANCE
        if not (lo <= x <= hi and lo <= y <= hi):
            raise ConversionError(
                f"keypoint {rid!r} ({label}) lies outside the image (x={x}, y={y} %)"
            )
        r_wh = region_size(r, rid)
        if r_wh is not None and r_wh != (w, h):
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


def region_results(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rectangle results, with polygons turned into their bounding rectangles."""
    out = []
    for r in results:
        if r.get("type") == RECTANGLE:
            out.append(r)
        elif r.get("type") == POLYGON:
            out.append(_polygon_to_rect(r))
    return out


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
            value = {
                "points": ring_to_ls_points(ring, (w, h)),
                "closed": True,
                POLYGON: [class_names[int(cls)]],
            }
            result = region_result(digest[:10], POLYGON, value, (w, h), from_name, to_name)
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
