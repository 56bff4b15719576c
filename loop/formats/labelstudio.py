"""Label Studio JSON <-> `Detections` for rectangles, and the fields of an exported task.

Pure: dicts in, dicts or `Detections` out (only `check_image_url` looks at the file system, to
resolve a path under the document root). The Label Studio gateway (`loop.labelstudio`) moves
the JSON; what it means is decided here and in `loop.formats.labelstudio_regions` (polygons,
brush masks, keypoints) and `loop.formats.labelstudio_pull` (what a pulled task means), so table
tests reach every rule without a server.

A Label Studio rectangle region: ``value.x, value.y`` top-left corner and ``value.width,
value.height``, all in percent (0-100) of ``original_width`` / ``original_height``, top-left origin,
with ``value.rotation`` in degrees and ``value.rectanglelabels`` a one-element list of class names.
`Detections` hold pixel ``xyxy``.

Task data pushed by defect-loop: ``{"image": url, "sha256": hex digest, "priority": float,
"width": px, "height": px}``; ``url`` is ``/data/local-files/?d=<path relative to the document
root>``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import numpy.typing as npt

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError

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
PCT_TOLERANCE = 1e-6
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


def region_result(
    region_id: str,
    kind: str,
    value: dict[str, Any],
    image_wh: tuple[int, int],
    from_name: str,
    to_name: str = TO_NAME,
) -> dict[str, Any]:
    """One Label Studio result region of type ``kind`` (``rectanglelabels``, ...) with its
    ``value`` (percent coordinates and the label list), drawn on an image of ``image_wh`` px."""
    w, h = image_wh
    return {
        "id": region_id,
        "type": kind,
        "from_name": from_name,
        "to_name": to_name,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
    }


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
        value = {
            "x": x1 / w * 100.0,
            "y": y1 / h * 100.0,
            "width": (x2 - x1) / w * 100.0,
            "height": (y2 - y1) / h * 100.0,
            "rotation": 0,
            RECTANGLE: [class_names[int(cls)]],
        }
        result = region_result(
            _region_id(i, box, int(cls)), RECTANGLE, value, (w, h), from_name, to_name
        )
        if det.confidence is not None:
            result["score"] = float(det.confidence[i])
        results.append(result)
    return results


def number_field(value: Any, what: str, region: Any) -> float:
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


def size_field(value: Any, what: str, region: Any) -> int:
    """A positive whole pixel count (``original_width`` / ``original_height``)."""
    v = number_field(value, what, region)
    if v != int(v) or v < 1:
        raise ConversionError(
            f"region {region!r}: {what} must be a whole number of pixels >= 1, got {value!r}"
        )
    return int(v)


def region_value_label(r: dict[str, Any], kind: str, rid: Any) -> tuple[dict[str, Any], Any]:
    """A region's ``value`` object and its one label (``value[kind]``, a one-element list;
    ``kind`` the result type, e.g. ``rectanglelabels``); the label is not checked against a
    class map. Raises `ConversionError` naming the region ``rid``."""
    what = "keypoint" if kind == KEYPOINT else "region"
    value = r.get("value")
    if not isinstance(value, dict):
        raise ConversionError(
            f"{what} {rid!r}: value must be an object, got {type(value).__name__}"
        )
    labels = value.get(kind)
    if not isinstance(labels, list) or len(labels) != 1:
        raise ConversionError(f"{what} {rid!r} must carry exactly one label, got {labels!r}")
    return value, labels[0]


def region_size(r: dict[str, Any], rid: Any) -> tuple[int, int] | None:
    """The ``(original_width, original_height)`` a region was drawn on (pixels), None when it
    names neither; `ConversionError` when one is missing or not a whole number >= 1."""
    if "original_width" not in r and "original_height" not in r:
        return None
    return (
        size_field(r.get("original_width"), "original_width", rid),
        size_field(r.get("original_height"), "original_height", rid),
    )


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
        value, label = region_value_label(r, RECTANGLE, rid)
        if not isinstance(label, str) or label not in class_names:
            raise UnknownLabelError(
                f"label {label!r} is not one of the project's classes {class_names}"
            )
        rotation = value.get("rotation")
        if rotation is not None and abs(number_field(rotation, "rotation", rid)) > 1e-6:
            raise ConversionError(
                f"region {rid!r} is rotated by {rotation} degrees; "
                "only axis-aligned boxes are supported: remove the rotation in Label Studio"
            )
        for key in ("x", "y", "width", "height"):
            if key not in value:
                raise ConversionError(f"region {rid!r} lacks numeric x/y/width/height")
        x, y = number_field(value["x"], "x", rid), number_field(value["y"], "y", rid)
        bw, bh = (
            number_field(value["width"], "width", rid),
            number_field(value["height"], "height", rid),
        )
        lo, hi = -PCT_TOLERANCE, 100.0 + PCT_TOLERANCE
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
        r_wh = region_size(r, rid)
        if r_wh is not None:
            if seen_wh is not None and r_wh != seen_wh:
                raise ConversionError(
                    f"region {rid!r} was drawn on a {r_wh[0]}x{r_wh[1]} image, another region "
                    f"on {seen_wh[0]}x{seen_wh[1]}; re-annotate the task"
                )
            seen_wh = r_wh
            if wh is None:
                wh = r_wh
        boxes.append([x, y, x + bw, y + bh])
        ids.append(class_names.index(label))
    if wh is None:
        if boxes:
            raise ConversionError("results carry no original_width/height and no image size given")
        raise ConversionError("image size unknown: pass image_wh for results without regions")
    w, h = wh
    pct = np.clip(np.array(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 100.0)
    xyxy = pct / 100.0 * np.array([w, h, w, h], dtype=np.float64)
    return Detections(xyxy, np.array(ids, dtype=np.int64), (w, h))


def without_scores(det: Detections) -> Detections:
    """``det``'s boxes and classes without confidences (what a labeler submits)."""
    return Detections(det.xyxy, det.class_id, det.image_wh)


# --- fields of an exported task --------------------------------------------------------------
def whole_number(value: Any) -> int | None:
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
    tid = whole_number(task.get("id")) if isinstance(task, dict) else None
    return -1 if tid is None else tid


def annotation_order(annotation: dict[str, Any]) -> tuple[bool, datetime, int]:
    """Sort key of an exported annotation: the one a pull chooses sorts last (ground truth,
    then the most recently updated, then the highest id)."""
    when = parse_time(annotation.get("updated_at") or annotation.get("created_at")) or _EPOCH
    return (bool(annotation.get("ground_truth")), when, whole_number(annotation.get("id")) or 0)


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


def check_annotation(ann: Any) -> None:
    """Validate the fields of one exported annotation that pull reads to choose and attribute
    it (not its regions: see `ls_results_to_detections`). Raises `ConversionError`."""
    if not isinstance(ann, dict):
        raise ConversionError(f"an annotation is not an object: {type(ann).__name__}")
    aid = ann.get("id")
    if whole_number(aid) is None:
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
    if who is not None and not isinstance(who, dict) and whole_number(who) is None:
        raise ConversionError(f"{where}: completed_by must be a user id, got {who!r}")
    lead = ann.get("lead_time")
    if lead is not None:
        ok = isinstance(lead, int | float) and not isinstance(lead, bool)
        if not ok or not math.isfinite(float(lead)) or float(lead) < 0:
            raise ConversionError(f"{where}: lead_time must be seconds >= 0, got {lead!r}")


def task_size(data: dict[str, Any]) -> tuple[int, int] | None:
    """The task's ``width``/``height`` (pixels), None when absent; `ConversionError` if bad."""
    w, h = data.get("width"), data.get("height")
    if w in (None, "", 0) and h in (None, "", 0):
        return None
    ww, hh = whole_number(w), whole_number(h)
    if ww is None or hh is None or ww < 1 or hh < 1:
        raise ConversionError(
            f"task data width/height must be whole numbers of pixels >= 1, got {w!r} x {h!r}"
        )
    return (ww, hh)
