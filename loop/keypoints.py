"""Keypoints of instances (crack tips, pit centres): the lossless form, the config's names and
the rule that gives a free-standing point its instance.

A `Keypoint` is one named point of one instance, in **pixels** (``x`` right, ``y`` down,
top-left origin of the image, continuous: the centre of pixel ``(0, 0)`` is ``(0.5, 0.5)``)
with a ``visibility``: 2 labeled and visible, 1 labeled but occluded (Ultralytics' and COCO's
flags; a keypoint that is not labeled is simply absent, never stored with visibility 0).
`InstanceKeypoints` are the keypoints of one instance, at most one per name.

The config names them per class (``keypoints: {crack: [tip_a, tip_b], pit: [centre]}``,
`check_keypoint_config`): the order is the slot order of the Ultralytics pose export. In Label
Studio each keypoint name is one ``KeyPointLabels`` label, written ``<class>/<name>``
(`keypoint_label`).

Pure: numbers and names in, checked values out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from loop.detections import Detections
from loop.errors import ConfigError, ConversionError
from loop.polygons import Rings

VISIBLE = 2
OCCLUDED = 1
# What a pulled Label Studio keypoint is: Label Studio draws no visibility flag.
DEFAULT_VISIBILITY = VISIBLE


@dataclass(frozen=True)
class Keypoint:
    """One named point of an instance: pixels ``x, y`` (see the module docstring) and its
    ``visibility`` (2 visible, 1 occluded)."""

    name: str
    x: float
    y: float
    visibility: int = DEFAULT_VISIBILITY

    def key(self) -> str:
        """``name@x,y,v`` with 3 decimals (the digest's form)."""
        return f"{self.name}@{self.x:.3f},{self.y:.3f},{self.visibility}"


InstanceKeypoints = tuple[Keypoint, ...]


def check_instance_keypoints(
    points: Iterable[Keypoint], image_wh: tuple[int, int], where: str = "instance"
) -> InstanceKeypoints:
    """``points`` sorted by name, checked: a non-empty name, finite coordinates inside the image
    (``0 <= x <= width``, ``0 <= y <= height``), visibility 1 or 2, no name twice.

    Raises `ConversionError` naming ``where`` and the keypoint.
    """
    w, h = image_wh
    out: list[Keypoint] = []
    for kp in points:
        if not isinstance(kp, Keypoint):
            raise ConversionError(f"{where}: a keypoint must be a Keypoint, got {kp!r}")
        if not isinstance(kp.name, str) or not kp.name.strip():
            raise ConversionError(f"{where}: a keypoint has no name")
        x, y = float(kp.x), float(kp.y)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ConversionError(f"{where}: keypoint {kp.name!r} is not finite ({kp.x}, {kp.y})")
        if not (0.0 <= x <= w and 0.0 <= y <= h):
            raise ConversionError(
                f"{where}: keypoint {kp.name!r} at ({x:.3f}, {y:.3f}) px lies outside the "
                f"{w}x{h} image"
            )
        if kp.visibility not in (OCCLUDED, VISIBLE) or isinstance(kp.visibility, bool):
            raise ConversionError(
                f"{where}: keypoint {kp.name!r} has visibility {kp.visibility!r}; use 2 "
                "(visible) or 1 (occluded); leave a keypoint that is not labeled out"
            )
        out.append(Keypoint(kp.name, x, y, int(kp.visibility)))
    out.sort(key=lambda k: k.name)
    names = [k.name for k in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConversionError(f"{where}: keypoint {dup[0]!r} is given twice; keep one")
    return tuple(out)


def instance_keypoints_key(points: InstanceKeypoints) -> str:
    """The keypoints of one instance as text: their `Keypoint.key` sorted, joined by ``+``."""
    return "+".join(sorted(k.key() for k in points))


# --- the config ------------------------------------------------------------------------------
KeypointNames = Mapping[str, Sequence[str]]


def check_keypoint_config(keypoints: KeypointNames, classes: Sequence[str]) -> None:
    """Raise `ConfigError` unless every key of ``keypoints`` is a class of ``classes`` and each
    list holds distinct, non-blank names without ``/`` (the Label Studio label separator)."""
    for cls, names in keypoints.items():
        if cls not in classes:
            raise ConfigError(
                f"keypoints: {cls!r} is not one of the classes {list(classes)}; name the "
                "keypoints of a class from the class list"
            )
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ConfigError(
                f"keypoints: {cls!r} must list its keypoint names in order, e.g. "
                f"[tip_a, tip_b], got {names!r}"
            )
        for n in names:
            if not isinstance(n, str) or not n.strip() or n != n.strip() or "/" in n:
                raise ConfigError(
                    f"keypoints: {cls!r} has the name {n!r}; names must be non-empty, without "
                    "surrounding spaces or '/'"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"keypoints: {cls!r} names a keypoint twice: {list(names)}")


def keypoint_label(cls: str, name: str) -> str:
    """The Label Studio ``KeyPointLabels`` label of keypoint ``name`` of class ``cls``."""
    return f"{cls}/{name}"


def keypoint_labels(keypoints: KeypointNames, classes: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Label -> ``(class, name)`` for every configured keypoint, in class order, then name order
    of the config (the order of the labels in the labeling config)."""
    out: dict[str, tuple[str, str]] = {}
    for cls in classes:
        for name in keypoints.get(cls, ()):
            out[keypoint_label(cls, name)] = (cls, name)
    return out


# --- which instance a keypoint belongs to ----------------------------------------------------
def _box_distance(x: float, y: float, box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    dx = max(x1 - x, 0.0, x - x2)
    dy = max(y1 - y, 0.0, y - y2)
    return math.hypot(dx, dy)


def _inside_rings(x: float, y: float, rings: Rings, box: Sequence[float]) -> bool:
    """Whether the pixel holding ``(x, y)`` is in the even-odd fill of ``rings`` sampled at its
    centre, as `loop.polygons.rings_to_mask` samples it (a point on the box's right or bottom
    edge counts as the last pixel inside)."""
    if _box_distance(x, y, box) > 0:
        return False
    cx = min(math.floor(x), math.ceil(box[2]) - 1) + 0.5
    cy = min(math.floor(y), math.ceil(box[3]) - 1) + 0.5
    inside = False
    for ring in rings:
        ax, ay = ring[:, 0], ring[:, 1]
        bx, by = np.roll(ax, -1), np.roll(ay, -1)
        spans = (np.minimum(ay, by) <= cy) & (cy < np.maximum(ay, by))
        if not spans.any():
            continue
        ax, ay, bx, by = ax[spans], ay[spans], bx[spans], by[spans]
        x_cross = ax + (cy - ay) * (bx - ax) / (by - ay)
        inside ^= bool(np.count_nonzero(cx < x_cross) % 2)
    return inside


def assign_to_instance(
    x: float,
    y: float,
    class_id: int,
    det: Detections,
    polygons: Sequence[Rings] = (),
) -> int | None:
    """The instance (index into ``det``) a keypoint at pixel ``(x, y)`` of class ``class_id``
    belongs to when nothing links it (no ``parentID``), or None when ``det`` has no instance of
    that class.

    The rule: among the instances of ``class_id``, those that contain the point (their polygon's
    even-odd fill at the point's pixel when they have one, else their box, edges included); of
    these the one with the smallest box area. When none contains it, the instance whose box is
    nearest to the point (ties: the smaller box, then the lower index).
    """
    best: tuple[int, float, float, int] | None = None
    for i, (box, c) in enumerate(zip(det.xyxy.tolist(), det.class_id.tolist(), strict=True)):
        if int(c) != class_id:
            continue
        rings = polygons[i] if polygons else ()
        inside = _inside_rings(x, y, rings, box) if rings else _box_distance(x, y, box) == 0
        area = (box[2] - box[0]) * (box[3] - box[1])
        key = (0 if inside else 1, 0.0 if inside else _box_distance(x, y, box), area, i)
        if best is None or key < best:
            best = key
    return None if best is None else best[3]
