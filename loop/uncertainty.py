"""Uncertainty strategies: pure functions from detections to per-image scores.

Higher score = more worth labeling. Each strategy takes a sequence of `Detections` (one per image,
with ``class_probs`` for the model-based ones) and returns a float64 array of shape ``(n_images,)``.
Per-box measures are reduced to one number per image by an explicit ``reduction``
(``max``, ``mean``, ``sum``, ``topk_mean``). Strategies are registered by name in `STRATEGIES`.

YOLO class scores are independent sigmoids (a row need not sum to 1), so the per-box entropy is
the sum over classes of the binary entropy ``H(p) = -p ln p - (1-p) ln(1-p)`` (nats): a box whose
every class score is near 0 or 1 is certain, a score near 0.5 in any class is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from loop.detections import Detections
from loop.errors import StrategyError

Reduction = Literal["max", "mean", "sum", "topk_mean"]
REDUCTIONS: tuple[str, ...] = ("max", "mean", "sum", "topk_mean")
_EPS = 1e-12


class Strategy(Protocol):
    def __call__(
        self,
        detections: Sequence[Detections],
        *,
        reduction: Reduction,
        rng: np.random.Generator | None,
        empty_score: float,
        k: int,
    ) -> npt.NDArray[np.float64]: ...


STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise StrategyError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = fn
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise StrategyError(
            f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        ) from None


def binary_entropy(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Element-wise binary entropy in nats; ``p`` in ``[0, 1]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def box_entropy(class_probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``(n, C)`` independent class scores -> ``(n,)`` summed binary entropy (nats)."""
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise StrategyError(f"class_probs must be 2-D (n, C), got shape {probs.shape}")
    if np.isnan(probs).any():
        raise StrategyError(
            "class_probs contain NaN: the model output is broken, retrain or check it"
        )
    return binary_entropy(probs).sum(axis=1)


def reduce_boxes(values: npt.ArrayLike, reduction: Reduction, k: int = 3) -> float:
    """Reduce per-box values ``(n,)`` with n >= 1 to one image score."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise StrategyError("reduce_boxes needs at least one box; handle empty images explicitly")
    if reduction == "max":
        return float(v.max())
    if reduction == "mean":
        return float(v.mean())
    if reduction == "sum":
        return float(v.sum())
    if reduction == "topk_mean":
        if k < 1:
            raise StrategyError(f"topk_mean needs k >= 1, got {k}")
        return float(np.sort(v)[::-1][:k].mean())
    raise StrategyError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def _per_box(
    detections: Sequence[Detections],
    box_fn: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
    reduction: Reduction,
    empty_score: float,
    k: int,
) -> npt.NDArray[np.float64]:
    scores = np.empty(len(detections), dtype=np.float64)
    for i, det in enumerate(detections):
        if len(det) == 0:
            # No candidate box even at the low candidate threshold: the model sees nothing at all.
            scores[i] = empty_score
            continue
        if det.class_probs is None:
            raise StrategyError(
                "this strategy needs per-box class probabilities; predict with loop.model.predict"
            )
        scores[i] = reduce_boxes(box_fn(det.class_probs), reduction, k)
    return scores


@register("entropy")
def entropy(
    detections: Sequence[Detections],
    *,
    reduction: Reduction = "max",
    rng: np.random.Generator | None = None,
    empty_score: float = 0.0,
    k: int = 3,
) -> npt.NDArray[np.float64]:
    """Per-box summed binary entropy of the class scores, reduced per image.

    ``empty_score`` is the score of an image with no candidate box at all (explicit, default 0:
    nothing the model considers even faintly a defect).
    """
    return _per_box(detections, box_entropy, reduction, empty_score, k)


@register("random")
def random(
    detections: Sequence[Detections],
    *,
    reduction: Reduction = "max",
    rng: np.random.Generator | None = None,
    empty_score: float = 0.0,
    k: int = 3,
) -> npt.NDArray[np.float64]:
    """Uniform random scores in ``[0, 1)``: the baseline. Needs a seeded ``rng``."""
    if rng is None:
        raise StrategyError("the random strategy needs a seeded numpy Generator (rng=...)")
    return rng.random(len(detections))


def score_images(
    name: str,
    detections: Sequence[Detections],
    *,
    reduction: Reduction = "max",
    rng: np.random.Generator,
    empty_score: float = 0.0,
    k: int = 3,
) -> npt.NDArray[np.float64]:
    """Look up strategy ``name`` and score ``detections``; result shape ``(len(detections),)``."""
    if reduction not in REDUCTIONS:
        raise StrategyError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    scores = get_strategy(name)(
        detections, reduction=reduction, rng=rng, empty_score=empty_score, k=k
    )
    if np.isnan(scores).any():
        raise StrategyError(f"strategy {name!r} produced NaN scores")
    return scores
