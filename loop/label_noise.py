"""Seeded label noise with a record of every injected error, for measuring error finders.

`inject_label_noise` corrupts a set of labeled images the way labelers err: it drops boxes
(a missed defect), shifts boxes by a large offset (a badly placed box) and swaps classes (a pit
labeled as a patch). The corrupted boxes are chosen among ALL boxes of the set by one seeded
permutation, so the rates are exact shares of the boxes (``round(rate * n_boxes)``), and the
three sets are disjoint. A shifted box moves by ``shift_fraction`` (0.5-1.0 by default) of its
own width and height in a random diagonal direction, clipped to the image; it is then re-drawn
until its IoU with the original is below ``max_shift_iou`` (the error must be one that the
correction analytics' matching at IoU 0.5 counts as a different box), else it is left as the
error that it is and recorded.

`simulate_annotator` draws one annotator's labels of an image from its true boxes with known
per-box miss, shift and swap rates (independent per box) for recovering those rates from the
per-annotator quality figures (`loop.annotator_quality`).

Boxes are pixel xyxy (`loop.detections`); images keyed by sha256. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from loop.detections import Detections, box_iou
from loop.errors import ConfigError

NOISE_KINDS = ("dropped", "shifted", "swapped")
_SHIFT_TRIES = 20


@dataclass(frozen=True)
class InjectedError:
    """One injected error: its ``kind`` (`NOISE_KINDS`) and the index of the box in the
    image's CLEAN labels."""

    kind: str
    box: int


@dataclass(frozen=True)
class NoisyLabels:
    """The corrupted labels (sha256 -> boxes) and the errors injected per image (images without
    an error are absent from ``errors``)."""

    labels: dict[str, Detections]
    errors: dict[str, tuple[InjectedError, ...]]

    @property
    def corrupted(self) -> set[str]:
        """The images with at least one injected error."""
        return set(self.errors)

    def counts(self) -> dict[str, int]:
        """Errors per kind."""
        out = dict.fromkeys(NOISE_KINDS, 0)
        for errs in self.errors.values():
            for e in errs:
                out[e.kind] += 1
        return out


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value}")


def _shift(
    box: np.ndarray,
    image_wh: tuple[int, int],
    rng: np.random.Generator,
    fraction: tuple[float, float],
    max_iou: float,
) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    out = box
    for _ in range(_SHIFT_TRIES):
        f = rng.uniform(*fraction, size=2)
        sign = rng.choice([-1.0, 1.0], size=2)
        dx, dy = sign * f * np.array([w, h])
        # Keep the box's size: slide it back inside the image instead of cutting it.
        x1 = float(np.clip(box[0] + dx, 0.0, image_wh[0] - w))
        y1 = float(np.clip(box[1] + dy, 0.0, image_wh[1] - h))
        out = np.array([x1, y1, x1 + w, y1 + h])
        if float(box_iou(box[None], out[None])[0, 0]) < max_iou:
            return out
    return out


def inject_label_noise(
    labels: Mapping[str, Detections],
    num_classes: int,
    rng: np.random.Generator,
    drop: float = 0.10,
    shift: float = 0.10,
    swap: float = 0.05,
    shift_fraction: tuple[float, float] = (0.5, 1.0),
    max_shift_iou: float = 0.3,
) -> NoisyLabels:
    """Corrupt ``labels`` (sha256 -> clean boxes, no scores) as the module docstring says.

    ``drop``/``shift``/``swap``: shares of all boxes, disjoint (their sum must be <= 1).
    Swapping needs ``num_classes`` >= 2. Images are visited in sha256 order, so the result
    depends only on the labels and ``rng``'s state.
    """
    for name, value in (("drop", drop), ("shift", shift), ("swap", swap)):
        _check_rate(name, value)
    if drop + shift + swap > 1.0:
        raise ConfigError(f"drop + shift + swap must be <= 1, got {drop + shift + swap:g}")
    if swap > 0 and num_classes < 2:
        raise ConfigError("swapping classes needs at least two classes")
    order = sorted(labels)
    index = [(sha, i) for sha in order for i in range(len(labels[sha]))]
    n = len(index)
    perm = rng.permutation(n)
    n_drop, n_shift, n_swap = (round(r * n) for r in (drop, shift, swap))
    kind_of: dict[tuple[str, int], str] = {}
    for j, k in enumerate(perm[: n_drop + n_shift + n_swap]):
        kind_of[index[int(k)]] = (
            "dropped" if j < n_drop else "shifted" if j < n_drop + n_shift else "swapped"
        )
    out: dict[str, Detections] = {}
    errors: dict[str, tuple[InjectedError, ...]] = {}
    for sha in order:
        det = labels[sha]
        xyxy = det.xyxy.copy()
        ids = det.class_id.copy()
        keep: list[int] = []
        errs: list[InjectedError] = []
        for i in range(len(det)):
            kind = kind_of.get((sha, i))
            if kind == "dropped":
                errs.append(InjectedError(kind, i))
                continue
            if kind == "shifted":
                xyxy[i] = _shift(xyxy[i], det.image_wh, rng, shift_fraction, max_shift_iou)
            elif kind == "swapped":
                others = [c for c in range(num_classes) if c != int(ids[i])]
                ids[i] = int(rng.choice(others))
            if kind is not None:
                errs.append(InjectedError(kind, i))
            keep.append(i)
        out[sha] = Detections(xyxy[keep].reshape(-1, 4), ids[keep], det.image_wh)
        if errs:
            errors[sha] = tuple(errs)
    return NoisyLabels(out, errors)


@dataclass(frozen=True)
class AnnotatorRates:
    """One simulated annotator's per-box error rates (independent per box; a box is missed,
    else shifted, else swapped, with these probabilities in that order)."""

    name: str
    miss: float
    shift: float
    swap: float

    def __post_init__(self) -> None:
        for n, v in (("miss", self.miss), ("shift", self.shift), ("swap", self.swap)):
            _check_rate(f"{self.name}.{n}", v)


def simulate_annotator(
    truth: Detections,
    rates: AnnotatorRates,
    num_classes: int,
    rng: np.random.Generator,
    shift_fraction: tuple[float, float] = (0.5, 1.0),
    max_shift_iou: float = 0.3,
) -> Detections:
    """What an annotator with ``rates`` draws on an image whose true boxes are ``truth``."""
    keep: list[int] = []
    xyxy = truth.xyxy.copy()
    ids = truth.class_id.copy()
    for i in range(len(truth)):
        u = rng.uniform(size=3)
        if u[0] < rates.miss:
            continue
        if u[1] < rates.shift:
            xyxy[i] = _shift(xyxy[i], truth.image_wh, rng, shift_fraction, max_shift_iou)
        elif u[2] < rates.swap and num_classes >= 2:
            ids[i] = int(rng.choice([c for c in range(num_classes) if c != int(ids[i])]))
        keep.append(i)
    return Detections(xyxy[keep].reshape(-1, 4), ids[keep], truth.image_wh)
