"""`Detections`: the one detection type passed between defect-loop's modules.

Parallel numpy arrays for the boxes of ONE image:

- ``xyxy``: ``(n, 4)`` float64, pixel coordinates ``x1, y1, x2, y2``, top-left origin,
  ``x1 <= x2`` and ``y1 <= y2``.
- ``class_id``: ``(n,)`` int64, indices into the project's fixed class list.
- ``confidence``: ``(n,)`` float64 in ``[0, 1]`` or ``None`` (ground truth has none).
- ``class_probs``: ``(n, C)`` float64 in ``[0, 1]`` or ``None``. For YOLO these are independent
  per-class sigmoid scores (rows need not sum to 1); ``class_probs[i, class_id[i]] == confidence[i]``.
- ``image_wh``: ``(width, height)`` of the image in pixels.
- ``meta``: where the boxes came from (e.g. ``path``, ``augmentation``), set on construction.
- ``polygons``: ``None`` (boxes only) or one instance outline per box, parallel to ``xyxy``:
  a tuple of rings, each a ``(k, 2)`` float64 array of pixel ``x, y`` vertices (k >= 3, even-odd
  fill, as in `loop.polygons`); ``()`` for a box without an outline. A segmentation model's
  predictions carry them (`loop.model.predict`); pre-annotations send them as polygons.

Instances are immutable (frozen fields, arrays made read-only) and validated on construction;
make a changed copy with `dataclasses.replace`, never mutate ``meta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loop.errors import InvalidDetectionsError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Detections:
    """Boxes of one image. See the module docstring for shapes, units and coordinates."""

    xyxy: FloatArray
    class_id: IntArray
    image_wh: tuple[int, int]
    confidence: FloatArray | None = None
    class_probs: FloatArray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    polygons: tuple[tuple[FloatArray, ...], ...] | None = None

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float64)
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise InvalidDetectionsError(f"xyxy must have shape (n, 4), got {xyxy.shape}")
        n = xyxy.shape[0]
        raw_ids = np.asarray(self.class_id)
        if raw_ids.size and not np.all(np.equal(np.mod(raw_ids, 1), 0)):
            raise InvalidDetectionsError("class_id must hold whole numbers")
        class_id = raw_ids.astype(np.int64).reshape(-1)
        if class_id.shape != (n,):
            raise InvalidDetectionsError(f"class_id must have shape ({n},), got {class_id.shape}")
        if np.any(class_id < 0):
            raise InvalidDetectionsError("class_id must be >= 0")
        if not np.all(np.isfinite(xyxy)):
            raise InvalidDetectionsError("xyxy contains NaN or infinite values")
        if np.any(xyxy[:, 2] < xyxy[:, 0]) or np.any(xyxy[:, 3] < xyxy[:, 1]):
            raise InvalidDetectionsError("boxes must satisfy x1 <= x2 and y1 <= y2")
        w, h = self.image_wh
        if int(w) <= 0 or int(h) <= 0:
            raise InvalidDetectionsError(f"image_wh must be positive, got {self.image_wh}")
        object.__setattr__(self, "image_wh", (int(w), int(h)))
        object.__setattr__(self, "xyxy", _readonly(xyxy))
        object.__setattr__(self, "class_id", _readonly(class_id))
        if self.confidence is not None:
            conf = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
            if conf.shape != (n,):
                raise InvalidDetectionsError(f"confidence must have shape ({n},), got {conf.shape}")
            if not np.all(np.isfinite(conf)) or np.any((conf < 0) | (conf > 1)):
                raise InvalidDetectionsError("confidence must be finite and within [0, 1]")
            object.__setattr__(self, "confidence", _readonly(conf))
        if self.class_probs is not None:
            probs = np.asarray(self.class_probs, dtype=np.float64)
            if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] < 1:
                raise InvalidDetectionsError(
                    f"class_probs must have shape ({n}, C) with C >= 1, got {probs.shape}"
                )
            if not np.all(np.isfinite(probs)) or np.any((probs < 0) | (probs > 1)):
                raise InvalidDetectionsError("class_probs must be finite and within [0, 1]")
            if n and np.any(class_id >= probs.shape[1]):
                raise InvalidDetectionsError("class_id out of range of class_probs columns")
            object.__setattr__(self, "class_probs", _readonly(probs))
        if self.polygons is not None:
            object.__setattr__(self, "polygons", _checked_polygons(self.polygons, n))

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    @classmethod
    def empty(cls, image_wh: tuple[int, int], num_classes: int | None = None) -> Detections:
        """No boxes. With ``num_classes`` the result carries empty confidence/probabilities."""
        if num_classes is None:
            return cls(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), image_wh)
        return cls(
            np.zeros((0, 4)),
            np.zeros(0, dtype=np.int64),
            image_wh,
            confidence=np.zeros(0),
            class_probs=np.zeros((0, num_classes)),
        )

    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> Detections:
        """Subset by boolean mask, integer indices or slice; keeps every parallel array aligned."""
        idx = index if isinstance(index, slice) else np.asarray(index)
        return Detections(
            xyxy=self.xyxy[idx],
            class_id=self.class_id[idx],
            image_wh=self.image_wh,
            confidence=None if self.confidence is None else self.confidence[idx],
            class_probs=None if self.class_probs is None else self.class_probs[idx],
            meta=dict(self.meta),
            polygons=None
            if self.polygons is None
            else tuple(self.polygons[int(i)] for i in np.arange(len(self))[idx].reshape(-1)),
        )

    def with_min_confidence(self, threshold: float) -> Detections:
        """Boxes whose confidence is >= ``threshold``; ground truth (no confidence) is returned as is."""
        if self.confidence is None:
            return self
        return self[self.confidence >= threshold]

    @property
    def area(self) -> FloatArray:
        """``(n,)`` box areas in square pixels."""
        return (self.xyxy[:, 2] - self.xyxy[:, 0]) * (self.xyxy[:, 3] - self.xyxy[:, 1])

    def same_boxes(self, other: Detections, atol: float = 1e-6) -> bool:
        """True when both hold the same boxes and classes in the same order (scores ignored)."""
        return (
            self.image_wh == other.image_wh
            and len(self) == len(other)
            and bool(np.array_equal(self.class_id, other.class_id))
            and bool(np.allclose(self.xyxy, other.xyxy, atol=atol))
        )


def _checked_polygons(
    polygons: Sequence[Sequence[npt.ArrayLike]], n: int
) -> tuple[tuple[FloatArray, ...], ...]:
    """``polygons`` as read-only rings, one tuple per box; raises `InvalidDetectionsError`."""
    if len(polygons) != n:
        raise InvalidDetectionsError(
            f"polygons must hold one entry per box ({n}), got {len(polygons)}"
        )
    out = []
    for rings in polygons:
        checked = []
        for ring in rings:
            r = np.asarray(ring, dtype=np.float64)
            if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] < 3:
                raise InvalidDetectionsError(
                    f"a polygon ring must have shape (k >= 3, 2), got {r.shape}"
                )
            if not np.all(np.isfinite(r)):
                raise InvalidDetectionsError("a polygon ring contains NaN or infinite values")
            checked.append(r if not r.flags.writeable else _readonly(r))
        out.append(tuple(checked))
    return tuple(out)


def box_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """Pairwise IoU of pixel ``xyxy`` boxes: ``(n, 4)`` x ``(m, 4)`` -> ``(n, m)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou.astype(np.float64)
