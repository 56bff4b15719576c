"""Seeded synthetic surface-defect images for fast tests and the demo.

Each sample is a ``(size, size, 3)`` uint8 image of a brushed/rolled metal-like surface (three
identical channels) with 0..``max_defects`` drawn defects of the classes in `SYNTH_CLASSES`,
plus ground-truth `Detections` whose pixel ``xyxy`` boxes (top-left origin, pixel edges, so a
defect covering pixel columns 3..7 has ``x1 = 3, x2 = 8``) are computed from the drawn defect
masks, not from the geometry that was intended.

Sample ``i`` depends only on ``(seed, i)`` and the size/fraction/max-defects settings, so any
prefix of a longer run equals a shorter run. Output is bit-identical across runs on the same
platform and library versions (OpenCV and NumPy float kernels are not promised to round
identically on every CPU).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from loop.detections import Detections, box_iou
from loop.formats.yolo import detections_to_yolo_lines, polygons_to_yolo_seg_lines

SYNTH_CLASSES: tuple[str, ...] = ("scratch", "pit", "crack", "patch")

F32 = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

# OpenCV draws with sub-pixel precision when points are fixed-point with this many fraction bits.
_SHIFT = 4
_ONE = 1 << _SHIFT
# A canvas pixel (0..255) counts as part of the defect for its box above this value; low enough
# to include anti-aliased edges that are still visibly changed, high enough to skip faint halos.
_MASK_LEVEL = 64
# Defects whose visible part is smaller than this (pixels) are redrawn, so every box is learnable.
_MIN_PIXELS = 4
# New defects are re-placed when they overlap an earlier one this much (boxes would be ambiguous).
_MAX_IOU = 0.3
_PLACEMENT_TRIES = 8


@dataclass(frozen=True)
class SynthSample:
    """One synthetic image: ``image`` is ``(H, W, 3)`` uint8 (identical channels), ``labels`` the
    ground-truth pixel boxes (no confidences) with ``class_id`` indexing `SYNTH_CLASSES`;
    ``masks``: the ``(H, W)`` bool mask each box was computed from, parallel to ``labels``."""

    name: str
    image: np.ndarray
    labels: Detections
    masks: tuple[BoolArray, ...] = ()

    def polygons(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """Per defect the pixel-edge rings of its mask (`loop.formats.masks.mask_to_polygons`,
        every part of it, however small): exact under `loop.polygons.rings_to_mask`."""
        from loop.formats.masks import mask_to_polygons

        return tuple(
            tuple(
                r for inst in mask_to_polygons(m, threshold=1, min_area=1).instances for r in inst
            )
            for m in self.masks
        )


def _fixed(xy: np.ndarray) -> npt.NDArray[np.int32]:
    """``(k, 2)`` float pixel points -> OpenCV fixed-point ``(k, 1, 2)`` int32 (see `_SHIFT`)."""
    return np.round(np.asarray(xy, dtype=np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> F32:
    """``(size, size)`` float32 smooth random field, roughly unit std, ``cells`` bumps per side."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), np.float32)


def _surface(rng: np.random.Generator, size: int) -> F32:
    """``(size, size)`` float32 grey levels (0..255 scale) of a defect-free metal surface."""
    base = rng.uniform(75.0, 185.0)
    shading = _smooth_field(rng, size, int(rng.integers(2, 5))) * rng.uniform(5.0, 15.0)
    # A broad lighting gradient, as from an off-axis lamp.
    ang = rng.uniform(0.0, 2 * np.pi)
    coords = (np.arange(size, dtype=np.float32) / size - 0.5)[None, :]
    gradient = (np.cos(ang) * coords + np.sin(ang) * coords.T) * rng.uniform(0.0, 30.0)
    # Grain: noise smeared along the rolling direction (rows), then the rolling lines themselves:
    # per-row offsets plus a faint periodic ripple from the rolls.
    k = int(rng.integers(7, 25)) | 1
    noise = rng.standard_normal((size, size)).astype(np.float32)
    grain = np.asarray(cv2.GaussianBlur(noise, (k, 1), sigmaX=k / 4, sigmaY=0), np.float32)
    grain *= rng.uniform(2.5, 7.0) / max(float(grain.std()), 1e-6)
    rows = rng.standard_normal(size).astype(np.float32) * rng.uniform(0.5, 2.5)
    period = rng.uniform(5.0, 20.0)
    ripple = np.sin(2 * np.pi * np.arange(size) / period + rng.uniform(0, 2 * np.pi))
    rows += (ripple * rng.uniform(0.3, 2.0)).astype(np.float32)
    fine = rng.standard_normal((size, size)).astype(np.float32) * rng.uniform(1.0, 3.0)
    surf = base + shading + gradient + grain + rows[:, None] + fine
    if rng.random() < 0.5:
        # Vertical rolling direction on half the images.
        surf = surf.T
    return np.ascontiguousarray(surf, dtype=np.float32)


def _scratch(rng: np.random.Generator, size: int) -> tuple[F32, BoolArray]:
    """Long thin bright or dark line, slightly curved (quadratic Bezier), of uneven depth."""
    s = size / 128
    centre = rng.uniform(0.15, 0.85, 2) * size
    length = rng.uniform(0.25, 0.7) * size
    ang = rng.uniform(0.0, np.pi)
    d = np.array([np.cos(ang), np.sin(ang)])
    perp = np.array([-d[1], d[0]])
    p0, p2 = centre - d * length / 2, centre + d * length / 2
    p1 = centre + perp * rng.uniform(-0.12, 0.12) * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    canvas = np.zeros((size, size), np.uint8)
    thickness = max(1, round((1 if rng.random() < 0.75 else 2) * s))
    # Real scratches vary in depth; give each segment its own intensity.
    levels = np.clip(np.cumsum(rng.normal(0.0, 25.0, len(curve))) + 220.0, 120.0, 255.0)
    pts = [(int(x), int(y)) for x, y in _fixed(curve)[:, 0]]
    for j in range(len(pts) - 1):
        cv2.line(canvas, pts[j], pts[j + 1], float(levels[j]), thickness, cv2.LINE_AA, _SHIFT)
    mask = canvas > _MASK_LEVEL
    sign = 1.0 if rng.random() < 0.6 else -1.0
    line = canvas.astype(np.float32) / 255.0
    # A faint blurred halo reads as the burr along the scratch; it stays below the mask level.
    halo = cv2.GaussianBlur(line, (0, 0), 1.2) * 0.3
    return (sign * rng.uniform(40.0, 75.0) * (line + halo)).astype(np.float32), mask


def _pit(rng: np.random.Generator, size: int) -> tuple[F32, BoolArray]:
    """One to three small dark round spots close together, each with a soft bright rim."""
    s = size / 128
    centre = rng.uniform(0.08, 0.92, 2) * size
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    core = np.zeros((size, size), np.uint8)
    rim = np.zeros((size, size), np.uint8)
    for _ in range(count):
        c = centre + rng.normal(0.0, 3.5 * s, 2) if count > 1 else centre
        r = rng.uniform(1.8, 4.0) * s
        cx, cy = _fixed(c)[0, 0]
        cv2.circle(rim, (int(cx), int(cy)), round((r + 1.2) * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(core, (int(cx), int(cy)), round(r * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
    core_f = cv2.GaussianBlur(core.astype(np.float32) / 255.0, (0, 0), 0.7)
    ring = np.clip(rim.astype(np.float32) / 255.0 - core_f, 0.0, 1.0)
    ring = cv2.GaussianBlur(ring, (0, 0), 0.6)
    # The rim counts where it is at least half-strength, so the box hugs the visible ring.
    mask = (core_f * 255 > _MASK_LEVEL) | (ring > 0.5)
    delta = -rng.uniform(60.0, 100.0) * core_f + rng.uniform(8.0, 20.0) * ring
    return delta.astype(np.float32), mask


def _crack(rng: np.random.Generator, size: int) -> tuple[F32, BoolArray]:
    """Dark jagged polyline (random walk around a main direction) with one or two branches."""
    s = size / 128

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        pts = [start]
        for _ in range(steps):
            # Independent sharp turns around a slowly drifting heading: zig-zag, not a curl.
            heading += rng.normal(0.0, 0.15)
            h = heading + rng.normal(0.0, 0.7)
            step = rng.uniform(2.5, 6.0) * s
            pts.append(pts[-1] + step * np.array([np.cos(h), np.sin(h)]))
        return np.array(pts)

    start = rng.uniform(0.15, 0.85, 2) * size
    heading = rng.uniform(0.0, 2 * np.pi)
    main = walk(start, heading, int(rng.integers(8, 17)))
    canvas = np.zeros((size, size), np.uint8)
    thickness = max(1, round((1 if rng.random() < 0.85 else 2) * s))
    cv2.polylines(canvas, [_fixed(main)], False, 255, thickness, cv2.LINE_AA, _SHIFT)
    for _ in range(int(rng.integers(1, 3))):
        at = main[int(rng.integers(2, len(main) - 1))]
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        branch = walk(at, heading + turn, int(rng.integers(3, 8)))
        cv2.polylines(canvas, [_fixed(branch)], False, 200, 1, cv2.LINE_AA, _SHIFT)
    mask = canvas > _MASK_LEVEL
    line = canvas.astype(np.float32) / 255.0
    return (-rng.uniform(55.0, 95.0) * line).astype(np.float32), mask


def _patch(rng: np.random.Generator, size: int) -> tuple[F32, BoolArray]:
    """Irregular blotch (stain/corrosion) of different brightness and rougher texture."""
    s = size / 128
    centre = rng.uniform(0.15, 0.85, 2) * size
    axes = rng.uniform(9.0, 24.0, 2) * s
    blob = np.zeros((size, size), np.uint8)
    cx, cy = _fixed(centre)[0, 0]
    ax = (round(axes[0] * _ONE), round(axes[1] * _ONE))
    cv2.ellipse(
        blob, (int(cx), int(cy)), ax, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, _SHIFT
    )
    soft = cv2.GaussianBlur(blob.astype(np.float32) / 255.0, (0, 0), float(axes.min()) / 3)
    # Modulating by low-frequency noise before thresholding turns the ellipse into a ragged,
    # lobed outline; multiplying (not adding) keeps it from spawning blobs elsewhere.
    ragged = soft * (1.0 + 0.6 * _smooth_field(rng, size, 10))
    region = (ragged > 0.4).astype(np.float32)
    weight = cv2.GaussianBlur(region, (0, 0), 1.2)
    mask = weight > 0.5
    tone = rng.choice([-1.0, 1.0]) * rng.uniform(22.0, 45.0)
    mottle = 1.0 + 0.4 * _smooth_field(rng, size, 16)
    texture = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.8)
    delta = weight * (tone * mottle + rng.uniform(8.0, 18.0) * texture)
    return delta.astype(np.float32), mask


_DRAWERS: tuple[Callable[[np.random.Generator, int], tuple[F32, BoolArray]], ...] = (
    _scratch,
    _pit,
    _crack,
    _patch,
)


def _mask_box(mask: BoolArray) -> np.ndarray:
    """Tight pixel-edge ``(4,)`` float64 xyxy box of a non-empty ``(H, W)`` mask, sides >= 2 px."""
    h, w = mask.shape
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
    for lo, hi, limit in ((0, 2, w), (1, 3, h)):
        if box[hi] - box[lo] < 2:
            # Grow a 1-px box to 2 px, shifting inwards at the border so it stays in the image.
            box[lo] = min(max(box[lo] - 0.5, 0.0), limit - 2.0)
            box[hi] = box[lo] + 2.0
    return box


def _sample(
    seed: int, i: int, size: int, defect_free_fraction: float, max_defects: int
) -> SynthSample:
    """Sample ``i`` of ``seed``; every random draw comes from one generator seeded by both."""
    rng = np.random.default_rng([seed, i])
    image = _surface(rng, size)
    boxes: list[np.ndarray] = []
    ids: list[int] = []
    masks: list[BoolArray] = []
    if rng.random() >= defect_free_fraction:
        for _ in range(int(rng.integers(1, max_defects + 1))):
            cls = int(rng.integers(len(SYNTH_CLASSES)))
            for _try in range(_PLACEMENT_TRIES):
                delta, mask = _DRAWERS[cls](rng, size)
                if mask.sum() < _MIN_PIXELS:
                    continue
                box = _mask_box(mask)
                if boxes and box_iou(box[None], np.array(boxes)).max() > _MAX_IOU:
                    continue
                image += delta
                boxes.append(box)
                ids.append(cls)
                mask.setflags(write=False)
                masks.append(mask)
                break
    gray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgb.setflags(write=False)
    labels = Detections(
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array(ids, dtype=np.int64),
        (size, size),
    )
    return SynthSample(name=f"synth_{seed}_{i:05d}", image=rgb, labels=labels, masks=tuple(masks))


def generate(
    n: int,
    seed: int,
    size: int = 128,
    defect_free_fraction: float = 0.15,
    max_defects: int = 3,
) -> Iterator[SynthSample]:
    """Yield ``n`` synthetic ``size`` x ``size`` samples; sample ``i`` depends only on ``seed, i``.

    About ``defect_free_fraction`` of the images carry no defect; the others carry
    ``1..max_defects`` (a defect that cannot be placed without heavy overlap is dropped, which is
    rare). Arguments are checked here, before the first sample is drawn; bad values raise
    `ValueError`, non-integers where integers are required raise `TypeError`.
    """
    n, seed, size, max_defects = (operator.index(v) for v in (n, seed, size, max_defects))
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy SeedSequence needs it), got {seed}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels so defects fit, got {size}")
    if not 0.0 <= defect_free_fraction <= 1.0:
        raise ValueError(f"defect_free_fraction must lie in [0, 1], got {defect_free_fraction}")
    if max_defects < 1:
        raise ValueError(f"max_defects must be >= 1, got {max_defects}")
    frac = float(defect_free_fraction)
    return (_sample(seed, i, size, frac, max_defects) for i in range(n))


def write_dataset(
    out_dir: Path, n: int, seed: int, size: int = 128, polygons: bool = False, **kw: Any
) -> list[Path]:
    """Write ``n`` samples as a YOLO folder and return the image paths in sample order.

    ``polygons``: the label files hold Ultralytics segmentation lines (each defect's mask outline,
    `SynthSample.polygons`, normalised) instead of boxes: what a ``segment`` project ingests.

    Layout: ``out_dir/images/<name>.png`` (8-bit RGB, no metadata, so bytes and sha256 are stable
    for a seed), ``out_dir/labels/<name>.txt`` (YOLO lines; empty for defect-free images) and
    ``out_dir/classes.txt`` (one `SYNTH_CLASSES` name per line). Existing files of the same
    names are overwritten. ``kw`` goes to `generate` (``defect_free_fraction``, ``max_defects``).
    """
    samples = generate(n, seed, size, **kw)
    out_dir = Path(out_dir)
    images_dir, labels_dir = out_dir / "images", out_dir / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    # newline="\n" keeps label bytes identical on every OS.
    (out_dir / "classes.txt").write_text("".join(f"{c}\n" for c in SYNTH_CLASSES), newline="\n")
    paths: list[Path] = []
    for sample in samples:
        path = images_dir / f"{sample.name}.png"
        # Explicit level, no optimize: PIL emits only IHDR/IDAT/IEND, deterministically; level 1
        # is ~3x faster than the default and only ~10% larger on these noisy surfaces.
        Image.fromarray(sample.image).save(path, format="PNG", compress_level=1)
        lines = (
            polygons_to_yolo_seg_lines(sample.labels, sample.polygons())
            if polygons
            else detections_to_yolo_lines(sample.labels)
        )
        label_text = "".join(f"{ln}\n" for ln in lines)
        (labels_dir / f"{sample.name}.txt").write_text(label_text, newline="\n")
        paths.append(path)
    return paths
