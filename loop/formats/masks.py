"""Pixel masks -> instance polygons (`loop.polygons`), without losing a pixel.

A mask is a ``(height, width)`` array (8-bit grayscale, anti-aliased edges allowed); a pixel is
defect where its value is at least ``threshold`` (default 128). Each connected region (8-connected:
a thin diagonal crack stays one region) becomes one instance. Its rings run along the pixel
**edges** (vertices on the integer pixel-corner grid, straight runs merged), outer outline and the
outline of every hole, so the even-odd fill of the rings sampled at pixel centres
(`loop.polygons.rings_to_mask`) gives back exactly the region's pixels: holes and 1-pixel-wide
cracks included. Where a region touches itself only at a pixel corner its ring passes that
corner twice (it touches, it never crosses itself).

Regions smaller than ``min_area`` pixels are dropped and reported with the reason
(`DroppedRegion`), never silently. Pure: arrays in, rings out (`mask_to_polygons`); reading
files is `loop.mask_import`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from loop.errors import ConversionError
from loop.polygons import Rings, as_ring

# Directions on the pixel-corner grid, x right and y down: east, south, west, north.
_E, _S, _W, _N = (1, 0), (0, 1), (-1, 0), (0, -1)


@dataclass(frozen=True)
class DroppedRegion:
    """A connected region that did not become an instance: its pixel count, its box
    ``(x1, y1, x2, y2)`` in pixel-corner coordinates and why."""

    area_px: int
    bbox: tuple[int, int, int, int]
    reason: str


@dataclass(frozen=True)
class MaskPolygons:
    """The instances of one mask: ``instances`` (one `Rings` each, largest region first, ties by
    position) and the ``dropped`` regions with their reasons."""

    instances: tuple[Rings, ...]
    dropped: tuple[DroppedRegion, ...]


def _left(d: tuple[int, int]) -> tuple[int, int]:
    # Counter-clockwise on screen (y down): east -> north -> west -> south -> east.
    return (d[1], -d[0])


def region_to_rings(region: npt.NDArray[np.bool_]) -> Rings:
    """The boundary of the ``True`` pixels of ``region`` (``(h, w)`` bool) as pixel-edge rings.

    Each boundary edge is directed with the region on its right (on screen), so outer outlines
    run clockwise and holes counter-clockwise; at a corner where two region pixels touch only
    diagonally the trace turns left, keeping them on one ring (8-connectivity). Collinear
    vertices are merged. Returns ``()`` for an empty region.
    """
    b = np.pad(np.asarray(region, dtype=bool), 1)
    inside = b[1:-1, 1:-1]
    # (row, col) of inside pixels whose neighbour on each side is outside
    sides = {
        _E: inside & ~b[:-2, 1:-1],  # top side, walked east from the top-left corner
        _S: inside & ~b[1:-1, 2:],  # right side, walked south from the top-right corner
        _W: inside & ~b[2:, 1:-1],  # bottom side, walked west from the bottom-right corner
        _N: inside & ~b[1:-1, :-2],  # left side, walked north from the bottom-left corner
    }
    start_offset = {_E: (0, 0), _S: (1, 0), _W: (1, 1), _N: (0, 1)}  # (dx, dy) of the start corner
    outs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for d, mask in sides.items():
        rows, cols = np.nonzero(mask)
        ox, oy = start_offset[d]
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            outs.setdefault((c + ox, r + oy), []).append(d)

    def successor(
        v: tuple[int, int], d: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        # The edge after (v, d): from its end corner, the only way on, or at a saddle corner
        # (two ways on) the left turn, which is always one of them. A bijection on edges, so
        # following it from any edge comes back to that edge.
        w = (v[0] + d[0], v[1] + d[1])
        ways = outs[w]
        return w, ways[0] if len(ways) == 1 else _left(d)

    used: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    rings: list[np.ndarray] = []
    for v0 in sorted(outs):  # deterministic: rings start at their top-most, left-most corner
        for d0 in outs[v0]:
            if (v0, d0) in used:
                continue
            edges = [(v0, d0)]
            e = successor(v0, d0)
            while e != (v0, d0):
                edges.append(e)
                e = successor(*e)
            used.update(edges)
            # a vertex wherever the direction changes (straight runs merged)
            vertices = [v for i, (v, d) in enumerate(edges) if d != edges[i - 1][1]]
            rings.append(np.array(vertices, dtype=np.float64))
    return tuple(rings)


def mask_to_polygons(
    mask: npt.NDArray[np.generic], threshold: float = 128, min_area: int = 4
) -> MaskPolygons:
    """Instances of ``mask`` (``(h, w)``; defect where ``mask >= threshold``): one per
    8-connected region of at least ``min_area`` pixels, as pixel-edge rings (module docstring).

    Raises `ConversionError` for a mask that is not 2-D or holds NaN.
    """
    import cv2  # opencv is a project dependency; imported where it is needed

    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ConversionError(f"a mask must be a 2-D (height, width) array, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ConversionError("the mask holds NaN")
    binary = (arr >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    found: list[tuple[int, int, int, Rings]] = []
    dropped: list[DroppedRegion] = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        bbox = (x, y, x + w, y + h)
        if area < min_area:
            dropped.append(
                DroppedRegion(area, bbox, f"{area} px, smaller than the minimum of {min_area} px")
            )
            continue
        crop = labels[y : y + h, x : x + w] == i
        try:
            rings = tuple(
                as_ring(r + np.array([x, y], dtype=np.float64)) for r in region_to_rings(crop)
            )
        except ConversionError as exc:  # pixel-edge rings are never degenerate; kept as a guard
            dropped.append(DroppedRegion(area, bbox, f"degenerate outline: {exc}"))
            continue
        found.append((-area, y, x, rings))
    found.sort(key=lambda f: f[:3])
    return MaskPolygons(tuple(f[3] for f in found), tuple(dropped))


# Pre-annotation outlines: vertices may move this far (pixels) from the exact pixel-edge outline.
SIMPLIFY_TOLERANCE_PX = 1.0


def simplify_ring(ring: npt.NDArray[np.float64], tolerance: float) -> npt.NDArray[np.float64]:
    """``ring`` simplified to a SIMPLE outline (no edges crossing or touching, as Label Studio
    polygons must be on pull): Douglas-Peucker (``cv2.approxPolyDP``, closed) with ``tolerance``
    pixels, so every dropped vertex lies within ``tolerance`` of the result; where that leaves a
    ring that touches itself (a pixel-edge outline passing a corner twice) or fewer than 3 points,
    ``2 x`` and ``4 x`` the tolerance, and last the ring's convex hull (rare: 1-pixel-wide
    parts)."""
    import cv2

    from loop.polygons import ring_self_intersects

    if tolerance < 0 or not np.isfinite(tolerance):
        raise ConversionError(f"tolerance must be a finite number >= 0, got {tolerance}")
    pts = np.asarray(ring, dtype=np.float32).reshape(-1, 1, 2)
    candidates = [np.asarray(ring, dtype=np.float64)] if tolerance == 0 else []
    candidates += [
        cv2.approxPolyDP(pts, float(t), True).reshape(-1, 2).astype(np.float64)
        for t in (tolerance, 2 * tolerance, 4 * tolerance)
        if t > 0
    ]
    candidates.append(cv2.convexHull(pts).reshape(-1, 2).astype(np.float64))
    for cand in candidates:
        try:
            out = as_ring(cand)
        except ConversionError:
            continue
        if not ring_self_intersects(out):
            return out
    raise ConversionError("the outline has no simple polygon with 3 or more corners")


def mask_to_instance_rings(
    mask: npt.NDArray[np.generic],
    tolerance: float = SIMPLIFY_TOLERANCE_PX,
    min_area: int = 4,
    min_part_fraction: float = 0.1,
) -> Rings:
    """One predicted instance mask (``(h, w)``, nonzero = inside) -> its rings in pixels: the
    pixel-edge outline of every 8-connected part of at least ``min_area`` pixels and at least
    ``min_part_fraction`` of the largest part (a model's mask of a faint candidate is often
    speckled: those specks are no outline worth suggesting), holes included (as
    `mask_to_polygons`), each simplified by `simplify_ring` with ``tolerance`` pixels (so each
    ring is simple). ``()`` when no part is large enough."""
    import cv2

    binary = (np.asarray(mask) > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return ()
    areas = stats[1:, cv2.CC_STAT_AREA]
    floor = max(float(min_area), min_part_fraction * float(areas.max()))
    keep = np.flatnonzero(areas >= floor) + 1
    binary = np.isin(labels, keep).astype(np.uint8)
    found = mask_to_polygons(binary, threshold=1, min_area=min_area)
    out = []
    for rings in found.instances:
        for r in rings:
            try:
                out.append(simplify_ring(r, tolerance))
            except ConversionError:
                continue  # a degenerate outline: nothing to suggest for that part
    return tuple(out)
