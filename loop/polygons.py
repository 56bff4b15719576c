"""Instance polygons: the lossless form of a segmentation label.

An instance is one or more **rings**, each a ``(k, 2)`` float64 array of pixel ``x, y`` vertices
(top-left origin, ``k >= 3``, the closing edge implied: the last vertex is not repeated). The
instance's pixels are the rings' **even-odd** fill: a ring inside another is a hole, rings apart
from each other are parts. The instance's box (in `loop.detections.Detections`) is the bounding
box of all its vertices (`rings_bbox`).

A `loop.datasets.LabeledImage` holds one such tuple of rings per box (the instances parallel to
its boxes); an instance with no rings is a box without a polygon.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from loop.detections import Detections, FloatArray
from loop.errors import ConversionError

# One instance: its rings (see the module docstring).
Rings = tuple[FloatArray, ...]
BoolArray = npt.NDArray[np.bool_]


def as_ring(points: Sequence[Sequence[float]] | FloatArray) -> FloatArray:
    """``points`` as a read-only ``(k, 2)`` float64 ring; a repeated closing vertex is dropped.

    Raises `ConversionError` for another shape, fewer than 3 distinct vertices, NaN or infinity,
    or zero area (all vertices on one line). A ring that crosses itself passes: see
    `ring_self_intersects`.
    """
    ring = np.array(points, dtype=np.float64, copy=True)
    if ring.ndim != 2 or ring.shape[1] != 2:
        raise ConversionError(f"a polygon ring must be a list of (x, y) points, got {ring.shape}")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if not np.all(np.isfinite(ring)):
        raise ConversionError("a polygon ring holds NaN or infinite coordinates")
    if len(np.unique(ring, axis=0)) < 3:
        raise ConversionError(f"a polygon needs at least 3 distinct points, got {len(ring)}")
    centred = ring - ring.mean(axis=0)
    if np.linalg.matrix_rank(centred, tol=1e-12 * max(1.0, float(np.abs(ring).max()))) < 2:
        raise ConversionError("a polygon ring has zero area (its points lie on one line)")
    ring.setflags(write=False)
    return ring


def ring_area(ring: FloatArray) -> float:
    """Absolute area (pixels squared) of one ring by the shoelace formula."""
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def ring_self_intersects(ring: FloatArray) -> bool:
    """Whether two edges of one ring cross or touch, other than neighbours at their shared
    vertex (a bow-tie, a loop, a repeated vertex). O(k**2) edge pairs, vectorised per edge."""
    a = ring
    b = np.roll(ring, -1, axis=0)
    k = len(ring)

    def orient(p: FloatArray, q: FloatArray, r: FloatArray) -> FloatArray:
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
            - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    def on_segment(p: FloatArray, q: FloatArray, r: FloatArray) -> BoolArray:
        # r collinear with p-q lies within the box of p-q
        return (
            (np.minimum(p[..., 0], q[..., 0]) <= r[..., 0])
            & (r[..., 0] <= np.maximum(p[..., 0], q[..., 0]))
            & (np.minimum(p[..., 1], q[..., 1]) <= r[..., 1])
            & (r[..., 1] <= np.maximum(p[..., 1], q[..., 1]))
        )

    for i in range(k):
        # edges j > i that are not i's neighbours (j == i + 1, and the last edge for i == 0)
        js = np.arange(i + 2, k - 1 if i == 0 else k)
        if len(js) == 0:
            continue
        p1, p2 = a[i], b[i]
        q1, q2 = a[js], b[js]
        o1, o2 = orient(p1, p2, q1), orient(p1, p2, q2)
        o3, o4 = orient(q1, q2, p1), orient(q1, q2, p2)
        crossing = (o1 * o2 < 0) & (o3 * o4 < 0)
        touching = (
            ((o1 == 0) & on_segment(p1, p2, q1))
            | ((o2 == 0) & on_segment(p1, p2, q2))
            | ((o3 == 0) & on_segment(q1, q2, p1))
            | ((o4 == 0) & on_segment(q1, q2, p2))
        )
        if np.any(crossing | touching):
            return True
    # neighbouring edges folding back onto each other (a spike of zero width)
    prev = np.roll(ring, 1, axis=0)
    nxt = b
    d1, d2 = prev - ring, nxt - ring
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    dot = (d1 * d2).sum(axis=1)
    return bool(np.any((cross == 0) & (dot > 0)))


def rings_bbox(rings: Rings) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` pixels: the bounding box of every vertex of ``rings`` (not empty)."""
    if not rings:
        raise ConversionError("an instance without rings has no polygon box")
    pts = np.concatenate(rings)
    x1, y1 = pts.min(axis=0)
    x2, y2 = pts.max(axis=0)
    return float(x1), float(y1), float(x2), float(y2)


def ring_key(ring: FloatArray) -> str:
    """``"x,y x,y ..."`` with 3 decimals, vertices in their stored order (the digest's form)."""
    return " ".join(f"{x:.3f},{y:.3f}" for x, y in ring.tolist())


def instance_key(rings: Rings) -> str:
    """The rings of one instance as text: their `ring_key`s sorted and joined by ``/``."""
    return "/".join(sorted(ring_key(r) for r in rings))


def polygons_to_detections(
    instances: Sequence[tuple[int, Rings]], image_wh: tuple[int, int]
) -> tuple[Detections, tuple[Rings, ...]]:
    """``(class id, rings)`` per instance -> the boxes (each its rings' bounding box) and the
    rings in the same order: the two parallel halves of a `LabeledImage`'s labels."""
    boxes = [rings_bbox(r) for _, r in instances]
    det = Detections(
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array([c for c, _ in instances], dtype=np.int64),
        image_wh,
    )
    return det, tuple(tuple(r) for _, r in instances)


def rings_to_mask(rings: Iterable[FloatArray], image_wh: tuple[int, int]) -> BoolArray:
    """The even-odd fill of ``rings`` sampled at pixel centres: ``(height, width)`` bool.

    A pixel ``(row j, column i)`` is inside when a ray from ``(i + 0.5, j + 0.5)`` crosses the
    rings' edges an odd number of times. Pure numpy; cost grows with edges x pixels.
    """
    w, h = image_wh
    xs = np.arange(w, dtype=np.float64) + 0.5
    ys = np.arange(h, dtype=np.float64) + 0.5
    inside = np.zeros((h, w), dtype=bool)
    for ring in rings:
        x0, y0 = ring[:, 0], ring[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):
            if ay == by:
                continue  # a horizontal edge never crosses a horizontal ray
            rows = (ys >= min(ay, by)) & (ys < max(ay, by))
            if not rows.any():
                continue
            yy = ys[rows]
            x_cross = ax + (yy - ay) * (bx - ax) / (by - ay)
            # every pixel left of the crossing flips (ray towards +x from the pixel)
            inside[rows] ^= xs[None, :] < x_cross[:, None]
    return inside


def mask_iou(a: BoolArray, b: BoolArray) -> float:
    """Intersection over union of two same-shape masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
