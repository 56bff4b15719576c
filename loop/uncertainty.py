"""Uncertainty strategies: pure functions from model outputs to per-image scores.

Higher score = more worth labeling. Each strategy takes a sequence of `Detections` (one per image,
with ``class_probs`` for the model-based ones) and returns a float64 array of shape ``(n_images,)``.
Per-box measures are reduced to one number per image by an explicit ``reduction``
(``max``, ``mean``, ``sum``, ``topk_mean``). Strategies are registered by name in `STRATEGIES`;
`NEEDS` says which model outputs each one reads, so a caller (the real loop, the oracle replay)
computes only those.

Strategies that need more than one model output per image stay pure functions of arrays: they
read a `ScoringInputs` (alternative views of each image from test-time augmentation or from a
committee of checkpoints, image embeddings, labeled-set class counts). Selection-type strategies
(core-set diversity, hybrid) choose a set rather than score images one by one: they live in
`loop.selection`.

YOLO class scores are independent sigmoids (a row need not sum to 1), so the per-box entropy is
the sum over classes of the binary entropy ``H(p) = -p ln p - (1-p) ln(1-p)`` (nats): a box whose
every class score is near 0 or 1 is certain, a score near 0.5 in any class is not. Committee
disagreement likewise treats each class as a Bernoulli variable.

Images with no box at all (even at the low candidate threshold; `loop.model.predict` with
``min_candidates`` keeps the strongest sub-threshold candidates, so this is rare) get the explicit
``empty_score``: never a silent zero that depends on how a reduction treats an empty list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from loop.detections import Detections, box_iou
from loop.errors import StrategyError

FloatArray = npt.NDArray[np.float64]
Reduction = Literal["max", "mean", "sum", "topk_mean"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
# What a strategy reads besides the image count: "predictions" (Detections with class_probs from
# loop.model.predict), "tta" (views under flips/scales), "committee" (views from other
# checkpoints), "embeddings" ((n, d) image vectors), "class_counts" (labeled boxes per class),
# "class_difficulty" (per-class weights from the current model's validation AP).
Need = Literal["predictions", "tta", "committee", "embeddings", "class_counts", "class_difficulty"]
_EPS = 1e-12
# A committee member "sees" a reference box when one of its boxes overlaps it at least this much.
COMMITTEE_IOU = 0.5


@dataclass(frozen=True, eq=False)
class ScoringInputs:
    """The arrays strategies may read, for ``n`` images (parallel, in the same order).

    ``detections``: ``n`` `Detections`, the reference prediction of each image (pixel ``xyxy``).
    ``views``: optional, ``n`` sequences of `Detections` in the SAME image's pixel coordinates:
    predictions under test-time augmentations mapped back (localization stability) or the
    predictions of other checkpoints (committee).
    ``embeddings``: optional ``(n, d)`` float image vectors (diversity, hybrid).
    ``labeled_class_counts``: optional ``(C,)`` number of labeled boxes per class id.
    ``class_difficulty``: optional ``(C,)`` weights in ``(0, 1]`` per class id, higher for a class
    the current model detects worse (`class_difficulty`).
    """

    detections: Sequence[Detections]
    views: Sequence[Sequence[Detections]] | None = None
    embeddings: FloatArray | None = None
    labeled_class_counts: FloatArray | None = None
    class_difficulty: FloatArray | None = None

    def __post_init__(self) -> None:
        n = len(self.detections)
        if self.views is not None and len(self.views) != n:
            raise StrategyError(f"got {n} images but views for {len(self.views)}")
        if self.embeddings is not None:
            emb = np.asarray(self.embeddings, dtype=np.float64)
            if emb.ndim != 2 or emb.shape[0] != n:
                raise StrategyError(f"embeddings must have shape ({n}, d), got {emb.shape}")
            if not np.all(np.isfinite(emb)):
                raise StrategyError(
                    "embeddings contain NaN or infinite values: the model output is broken"
                )
            object.__setattr__(self, "embeddings", emb)
        if self.labeled_class_counts is not None:
            counts = np.asarray(self.labeled_class_counts, dtype=np.float64)
            if counts.ndim != 1 or counts.size == 0:
                raise StrategyError(f"labeled_class_counts must be (C,), got {counts.shape}")
            if not np.all(np.isfinite(counts)) or np.any(counts < 0):
                raise StrategyError("labeled_class_counts must be finite and >= 0 (NaN given?)")
            object.__setattr__(self, "labeled_class_counts", counts)
        if self.class_difficulty is not None:
            w = np.asarray(self.class_difficulty, dtype=np.float64)
            if w.ndim != 1 or w.size == 0 or not np.all((w > 0) & (w <= 1)):
                raise StrategyError(f"class_difficulty must be (C,) values in (0, 1], got {w}")
            object.__setattr__(self, "class_difficulty", w)

    def __len__(self) -> int:
        return len(self.detections)


class Strategy(Protocol):
    def __call__(
        self,
        detections: Sequence[Detections],
        *,
        reduction: Reduction,
        rng: np.random.Generator | None,
        empty_score: float,
        k: int,
        inputs: ScoringInputs | None = None,
    ) -> FloatArray: ...


STRATEGIES: dict[str, Strategy] = {}
NEEDS: dict[str, frozenset[Need]] = {}
# Strategies that read instance outlines (Detections.polygons): segment projects only.
MASK_STRATEGIES: frozenset[str] = frozenset({"mask_stability"})


def register(name: str, needs: Sequence[Need] = ("predictions",)) -> Callable[[Strategy], Strategy]:
    """Register a strategy under ``name``; ``needs`` lists the model outputs it reads."""

    def deco(fn: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise StrategyError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = fn
        NEEDS[name] = frozenset(needs)
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise StrategyError(
            f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        ) from None


# ------------------------------------------------------------------------------------------
# per-box measures (pure, array in, array out)
# ------------------------------------------------------------------------------------------


def _probs(class_probs: npt.ArrayLike) -> FloatArray:
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise StrategyError(f"class_probs must be 2-D (n, C), got shape {probs.shape}")
    if np.isnan(probs).any():
        raise StrategyError(
            "class_probs contain NaN: the model output is broken, retrain or check it"
        )
    return probs


def binary_entropy(p: npt.ArrayLike) -> FloatArray:
    """Element-wise binary entropy in nats; ``p`` in ``[0, 1]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def box_entropy(class_probs: npt.ArrayLike) -> FloatArray:
    """``(n, C)`` independent class scores -> ``(n,)`` summed binary entropy (nats)."""
    return binary_entropy(_probs(class_probs)).sum(axis=1)


def box_least_confidence(class_probs: npt.ArrayLike) -> FloatArray:
    """``(n, C)`` -> ``(n,)`` ``1 - max_c p``: 0 for a sure box, 1 for a box no class claims."""
    probs = _probs(class_probs)
    if probs.shape[1] == 0:
        raise StrategyError("class_probs need at least one class column")
    return 1.0 - probs.max(axis=1)


def box_margin(class_probs: npt.ArrayLike) -> FloatArray:
    """``(n, C)`` -> ``(n,)`` ``1 - (p_top1 - p_top2)``; high when two outcomes are close.

    With one class (C = 1) the runner-up is the complementary outcome "not this class" with
    probability ``1 - p``, so the margin is ``|2p - 1|`` (0.5 -> score 1, 0 or 1 -> score 0).
    """
    probs = _probs(class_probs)
    if probs.shape[1] == 0:
        raise StrategyError("class_probs need at least one class column")
    if probs.shape[1] == 1:
        return 1.0 - np.abs(2.0 * probs[:, 0] - 1.0)
    top2 = -np.sort(-probs, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def box_stability(reference: Detections, views: Sequence[Detections]) -> FloatArray:
    """``(n,)`` localization stability of each reference box, in ``[0, 1]`` (Kao et al. 2018).

    For every view the box's best IoU with any box of that view (class-agnostic; 0 when the view
    has no box), averaged over views: 1 = every augmentation finds the same box.
    """
    if len(views) == 0:
        raise StrategyError(
            "localization stability needs at least one augmented view per image "
            "(predict with loop.model.predict_tta)"
        )
    n = len(reference)
    total = np.zeros(n, dtype=np.float64)
    for view in views:
        if view.image_wh != reference.image_wh:
            raise StrategyError(
                f"a view of size {view.image_wh} does not match its image {reference.image_wh}: "
                "map augmented boxes back to the original image first"
            )
        if len(view) and n:
            total += box_iou(reference.xyxy, view.xyxy).max(axis=1)
    return total / len(views)


def _window_masks(
    polygons: Sequence[Sequence[FloatArray]],
) -> list[tuple[int, int, npt.NDArray[np.bool_]] | None]:
    """Each instance's even-odd fill (`loop.polygons.rings_to_mask`, pixel centres) over its own
    integer window: ``(x0, y0, mask)``, or None for an instance without rings or pixels."""
    from loop.polygons import rings_to_mask

    out: list[tuple[int, int, npt.NDArray[np.bool_]] | None] = []
    for rings in polygons:
        if not rings:
            out.append(None)
            continue
        pts = np.concatenate([np.asarray(r, dtype=np.float64) for r in rings])
        x0, y0 = np.floor(pts.min(axis=0)).astype(int)
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
        shift = np.array([x0, y0], dtype=np.float64)
        mask = rings_to_mask(
            [np.asarray(r) - shift for r in rings], (max(x1 - x0, 1), max(y1 - y0, 1))
        )
        out.append((int(x0), int(y0), mask) if mask.any() else None)
    return out


def _window_iou(
    a: tuple[int, int, npt.NDArray[np.bool_]], b: tuple[int, int, npt.NDArray[np.bool_]]
) -> float:
    """IoU of two window masks placed in the same image."""
    (ax, ay, am), (bx, by, bm) = a, b
    x0, y0 = max(ax, bx), max(ay, by)
    x1 = min(ax + am.shape[1], bx + bm.shape[1])
    y1 = min(ay + am.shape[0], by + bm.shape[0])
    inter = 0
    if x1 > x0 and y1 > y0:
        inter = int(
            np.count_nonzero(
                am[y0 - ay : y1 - ay, x0 - ax : x1 - ax] & bm[y0 - by : y1 - by, x0 - bx : x1 - bx]
            )
        )
    union = int(am.sum()) + int(bm.sum()) - inter
    return inter / union if union else 0.0


def instance_mask_iou(a: Sequence[FloatArray], b: Sequence[FloatArray]) -> float:
    """Mask IoU of two instances given as rings (pixels): their even-odd fills sampled at pixel
    centres (`loop.polygons.rings_to_mask`). 0.0 when either covers no pixel centre."""
    wa, wb = _window_masks([a, b])
    return 0.0 if wa is None or wb is None else _window_iou(wa, wb)


def box_mask_stability(reference: Detections, views: Sequence[Detections]) -> FloatArray:
    """``(n,)`` mask stability of each reference instance, in ``[0, 1]``: for every view the
    instance's best mask IoU (`instance_mask_iou`, class-agnostic) with any instance of that
    view whose box overlaps its box, 0 when none does, averaged over views. 1 = every
    augmentation outlines the same pixels. An instance whose own mask covers no pixel centre
    scores 0 (nothing stable to outline).

    ``reference`` and ``views`` must carry ``polygons`` (a segmentation model's predictions,
    `loop.model.predict` / ``predict_tta``, in the original image's pixels).
    """
    if len(views) == 0:
        raise StrategyError(
            "mask stability needs at least one augmented view per image "
            "(predict with loop.model.predict_tta)"
        )
    outlines = [v.polygons for v in views]
    if reference.polygons is None or any(p is None for p in outlines):
        raise StrategyError(
            "mask stability needs instance outlines (Detections.polygons): score a segment "
            "project with its segmentation model, or choose a box strategy"
        )
    n = len(reference)
    ref = _window_masks(reference.polygons)
    total = np.zeros(n, dtype=np.float64)
    for view, polys in zip(views, outlines, strict=True):
        if view.image_wh != reference.image_wh:
            raise StrategyError(
                f"a view of size {view.image_wh} does not match its image {reference.image_wh}: "
                "map augmented outlines back to the original image first"
            )
        if not (n and len(view)) or polys is None:
            continue
        overlap = box_iou(reference.xyxy, view.xyxy) > 0
        cand = _window_masks(polys)
        for i in range(n):
            wi = ref[i]
            if wi is None:
                continue
            best = 0.0
            for j in np.flatnonzero(overlap[i]):
                wj = cand[int(j)]
                if wj is not None:
                    best = max(best, _window_iou(wi, wj))
            total[i] += best
    return total / len(views)


def bernoulli_js(probs: npt.ArrayLike) -> FloatArray:
    """Committee disagreement of ``(M, n, C)`` member class scores -> ``(n,)`` nats.

    Each class is a Bernoulli variable; the disagreement is the generalised Jensen-Shannon
    divergence ``H(mean_m p) - mean_m H(p)`` summed over classes: 0 when all ``M`` members agree,
    at most ``C ln 2``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise StrategyError(f"committee scores must be (M, n, C), got shape {p.shape}")
    if np.isnan(p).any():
        raise StrategyError("committee class scores contain NaN: a member's output is broken")
    js = binary_entropy(p.mean(axis=0)) - binary_entropy(p).mean(axis=0)
    return np.clip(js, 0.0, None).sum(axis=1)


def box_committee(reference: Detections, members: Sequence[Detections]) -> FloatArray:
    """``(n,)`` disagreement about each reference box between the reference and ``members``.

    A member's opinion of a box is the class-score row of its best-overlapping box (class-agnostic
    IoU >= `COMMITTEE_IOU`), or all zeros when it has no such box (it sees no defect there).
    """
    if len(members) == 0:
        raise StrategyError("the committee strategy needs at least one other checkpoint's view")
    if reference.class_probs is None:
        raise StrategyError("committee needs class probabilities; predict with loop.model.predict")
    n, c = reference.class_probs.shape
    stacked = np.zeros((len(members) + 1, n, c), dtype=np.float64)
    stacked[0] = reference.class_probs
    for m, member in enumerate(members, start=1):
        if len(member) == 0 or n == 0:
            continue
        if member.class_probs is None or member.class_probs.shape[1] != c:
            raise StrategyError(
                f"committee member {m} has no class probabilities for {c} classes; "
                "predict every checkpoint with loop.model.predict on the same class list"
            )
        iou = box_iou(reference.xyxy, member.xyxy)
        best = iou.argmax(axis=1)
        seen = iou[np.arange(n), best] >= COMMITTEE_IOU
        stacked[m, seen] = member.class_probs[best[seen]]
    return bernoulli_js(stacked)


def class_rarity(counts: npt.ArrayLike) -> FloatArray:
    """``(C,)`` labeled boxes per class -> ``(C,)`` weights in ``(0, 1]``; the rarest class gets 1.

    ``w_c = (1 + min count) / (1 + count_c)``: a class with no labels yet weighs as much as the
    rarest, a class with 10x the labels ~1/10.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise StrategyError(f"class counts must be a non-empty (C,) array >= 0, got {c}")
    return (1.0 + c.min()) / (1.0 + c)


def class_difficulty(
    ap50: npt.ArrayLike,
    n_instances: npt.ArrayLike,
    prior_boxes: float = 10.0,
    floor: float = 0.05,
) -> FloatArray:
    """``(C,)`` per-class AP50 of the current model on the labeled validation images and the
    ``(C,)`` number of validation boxes behind each -> ``(C,)`` difficulty weights in
    ``[floor, 1]``: ``1 - AP`` after shrinking each AP towards the box-weighted mean AP.

    ``AP~_c = (n_c AP_c + m mean) / (n_c + m)`` with ``m = prior_boxes``: a class measured on two
    validation boxes says little about itself, so it stays near the mean; a class without
    validation boxes gets the mean. ``floor`` keeps a nearly solved class from weighing 0.
    """
    ap = np.asarray(ap50, dtype=np.float64)
    n = np.asarray(n_instances, dtype=np.float64)
    if ap.ndim != 1 or ap.size == 0 or ap.shape != n.shape:
        raise StrategyError(f"ap50 and n_instances must be (C,) arrays, got {ap.shape}, {n.shape}")
    if not np.all(np.isfinite(ap)) or np.any((ap < 0) | (ap > 1)):
        raise StrategyError(f"per-class AP50 must lie in [0, 1], got {ap}")
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise StrategyError(f"validation box counts must be >= 0, got {n}")
    if prior_boxes < 0 or not 0 < floor <= 1:
        raise StrategyError(f"need prior_boxes >= 0 and 0 < floor <= 1, got {prior_boxes}, {floor}")
    mean = float((n * ap).sum() / n.sum()) if n.sum() > 0 else 0.0
    denom = n + prior_boxes
    shrunk = np.where(
        denom > 0, (n * ap + prior_boxes * mean) / np.where(denom > 0, denom, 1), mean
    )
    return np.clip(1.0 - shrunk, floor, 1.0)


def reduce_boxes(values: npt.ArrayLike, reduction: Reduction, k: int = 3) -> float:
    """Reduce per-box values ``(n,)`` with n >= 1 to one image score."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise StrategyError("reduce_boxes needs at least one box; handle empty images explicitly")
    if np.isnan(v).any():
        raise StrategyError("per-box values contain NaN; check the strategy's inputs")
    reduce = _REDUCERS.get(reduction)
    if reduce is None:
        raise StrategyError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    return reduce(v, k)


def _topk_mean(v: FloatArray, k: int) -> float:
    if k < 1:
        raise StrategyError(f"topk_mean needs k >= 1, got {k}")
    return float(np.sort(v)[::-1][:k].mean())


# How per-box values ``(n,)`` become one image score, by `Reduction` name (``k``: topk_mean's).
_REDUCERS: dict[str, Callable[[FloatArray, int], float]] = {
    "max": lambda v, k: float(v.max()),
    "mean": lambda v, k: float(v.mean()),
    "sum": lambda v, k: float(v.sum()),
    "topk_mean": _topk_mean,
}


# ------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------

# A per-box measure: (image index, that image's Detections with >= 1 box, all inputs) -> (n_boxes,)
BoxMeasure = Callable[[int, Detections, "ScoringInputs"], FloatArray]


def _per_image(
    detections: Sequence[Detections],
    box_fn: Callable[[int, Detections], FloatArray],
    reduction: Reduction,
    empty_score: float,
    k: int,
) -> FloatArray:
    """Apply ``box_fn(image index, detections) -> (n_boxes,)`` and reduce; empty -> empty_score."""
    scores = np.empty(len(detections), dtype=np.float64)
    for i, det in enumerate(detections):
        if len(det) == 0:
            # No candidate box even at the low candidate threshold: the model sees nothing at all.
            scores[i] = empty_score
            continue
        scores[i] = reduce_boxes(box_fn(i, det), reduction, k)
    return scores


def per_box_strategy(
    name: str, needs: Sequence[Need] = ("predictions",)
) -> Callable[[BoxMeasure], Strategy]:
    """Register a per-box measure as strategy ``name``: the measure of every box of an image,
    reduced by the caller's ``reduction`` (images with no box get ``empty_score``)."""

    def deco(measure: BoxMeasure) -> Strategy:
        def strategy(
            detections: Sequence[Detections],
            *,
            reduction: Reduction = "max",
            rng: np.random.Generator | None = None,
            empty_score: float = 0.0,
            k: int = 3,
            inputs: ScoringInputs | None = None,
        ) -> FloatArray:
            given = inputs if inputs is not None else ScoringInputs(detections)
            return _per_image(
                detections, lambda i, d: measure(i, d, given), reduction, empty_score, k
            )

        strategy.__name__ = strategy.__qualname__ = name
        strategy.__doc__ = measure.__doc__
        return register(name, needs)(strategy)

    return deco


def _need_probs(det: Detections) -> FloatArray:
    if det.class_probs is None:
        raise StrategyError(
            "this strategy needs per-box class probabilities; predict with loop.model.predict"
        )
    return det.class_probs


def _need_views(inputs: ScoringInputs, name: str, what: str) -> Sequence[Sequence[Detections]]:
    if inputs.views is None:
        raise StrategyError(f"strategy {name!r} needs ScoringInputs.views ({what})")
    return inputs.views


def _need_weights(
    weights: FloatArray | None, det: Detections, name: str, what: str, field: str
) -> FloatArray:
    """``weights`` (C,) checked against the class count of ``det``'s class scores."""
    if weights is None:
        raise StrategyError(f"strategy {name!r} needs ScoringInputs.{field} ({what})")
    probs = _need_probs(det)
    if probs.shape[1] != weights.shape[0]:
        raise StrategyError(
            f"class_probs have {probs.shape[1]} classes but {field} has {weights.shape[0]}"
        )
    return weights


@per_box_strategy("entropy")
def entropy(_i: int, det: Detections, _inputs: ScoringInputs) -> FloatArray:
    """Per-box summed binary entropy of the class scores (nats), reduced per image."""
    return box_entropy(_need_probs(det))


@per_box_strategy("least_confidence")
def least_confidence(_i: int, det: Detections, _inputs: ScoringInputs) -> FloatArray:
    """Per-box ``1 - max class score`` in ``[0, 1]``, reduced per image."""
    return box_least_confidence(_need_probs(det))


@per_box_strategy("margin")
def margin(_i: int, det: Detections, _inputs: ScoringInputs) -> FloatArray:
    """Per-box ``1 - (top-1 - top-2 class score)`` in ``[0, 1]`` (see `box_margin`), reduced."""
    return box_margin(_need_probs(det))


@per_box_strategy("localization_stability", needs=("predictions", "tta"))
def localization_stability(i: int, det: Detections, inputs: ScoringInputs) -> FloatArray:
    """Per-box ``confidence * (1 - stability)`` under test-time augmentation, reduced per image.

    ``inputs.views[i]``: image ``i``'s predictions under flips/scales mapped back to its pixels.
    Weighting by confidence follows Kao et al. (2018), who weight each box's stability by its
    top class score, so that faint candidate boxes (which move a lot but matter little) do not
    dominate; values lie in ``[0, 1]``.
    """
    views = _need_views(inputs, "localization_stability", "test-time augmentation predictions")
    conf = det.confidence if det.confidence is not None else _need_probs(det).max(axis=1)
    return np.asarray(conf, dtype=np.float64) * (1.0 - box_stability(det, views[i]))


@per_box_strategy("mask_stability", needs=("predictions", "tta"))
def mask_stability(i: int, det: Detections, inputs: ScoringInputs) -> FloatArray:
    """Per-instance ``confidence * (1 - mask stability)`` under test-time augmentation, in
    ``[0, 1]``, reduced per image by the caller's ``reduction`` (``select.reduction``).

    The mask counterpart of `localization_stability` (segment projects): ``inputs.views[i]`` are
    image ``i``'s predictions under flips/scales with their outlines mapped back to its pixels,
    and stability is the mean best mask IoU (`box_mask_stability`) instead of box IoU, so an
    instance whose extent the model cannot pin down (a crack's end, a patch's fuzzy border)
    scores high even when its box barely moves.
    """
    views = _need_views(inputs, "mask_stability", "test-time augmentation predictions")
    conf = det.confidence if det.confidence is not None else _need_probs(det).max(axis=1)
    return np.asarray(conf, dtype=np.float64) * (1.0 - box_mask_stability(det, views[i]))


@per_box_strategy("committee", needs=("predictions", "committee"))
def committee(i: int, det: Detections, inputs: ScoringInputs) -> FloatArray:
    """Per-box disagreement (nats, `box_committee`) between the reference checkpoint and the
    others, reduced per image. ``inputs.views[i]``: the other checkpoints' predictions of image
    ``i``."""
    views = _need_views(inputs, "committee", "predictions of the other checkpoints")
    return box_committee(det, views[i])


@per_box_strategy("class_balance", needs=("predictions", "class_counts"))
def class_balance(_i: int, det: Detections, inputs: ScoringInputs) -> FloatArray:
    """Per-box ``max_c p_c * rarity_c`` in ``[0, 1]`` (`class_rarity` of the labeled set's box
    counts), reduced per image: favours images predicted to hold classes that are rare so far."""
    counts = inputs.labeled_class_counts
    rarity = None if counts is None else class_rarity(counts)
    weights = _need_weights(
        rarity, det, "class_balance", "labeled boxes per class", "labeled_class_counts"
    )
    return (_need_probs(det) * weights[None, :]).max(axis=1)


@per_box_strategy("calibrated_entropy", needs=("predictions", "class_difficulty"))
def calibrated_entropy(_i: int, det: Detections, inputs: ScoringInputs) -> FloatArray:
    """Difficulty-calibrated entropy: per-box entropy (nats) times the difficulty of the box's
    predicted class (`class_difficulty`, in ``(0, 1]``), reduced per image.

    The idea of PPAL's difficulty-calibrated uncertainty sampling (Yang et al., CVPR 2024): the
    same doubt about a class the current model handles badly is worth more labels than doubt
    about a class it already detects.
    """
    weights = _need_weights(
        inputs.class_difficulty,
        det,
        "calibrated_entropy",
        "per-class difficulty",
        "class_difficulty",
    )
    return box_entropy(_need_probs(det)) * weights[det.class_id]


@register("random", needs=())
def random(
    detections: Sequence[Detections],
    *,
    reduction: Reduction = "max",
    rng: np.random.Generator | None = None,
    empty_score: float = 0.0,
    k: int = 3,
    inputs: ScoringInputs | None = None,
) -> FloatArray:
    """Uniform random scores in ``[0, 1)``: the baseline. Needs a seeded ``rng``."""
    if rng is None:
        raise StrategyError("the random strategy needs a seeded numpy Generator (rng=...)")
    return rng.random(len(detections))


def score_inputs(
    name: str,
    inputs: ScoringInputs,
    *,
    reduction: Reduction = "max",
    rng: np.random.Generator,
    empty_score: float = 0.0,
    k: int = 3,
) -> FloatArray:
    """Look up strategy ``name`` and score ``inputs``; result shape ``(len(inputs),)``."""
    if reduction not in REDUCTIONS:
        raise StrategyError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if not np.isfinite(empty_score):
        raise StrategyError(f"empty_score must be a finite number, got {empty_score}")
    scores = np.asarray(
        get_strategy(name)(
            inputs.detections,
            reduction=reduction,
            rng=rng,
            empty_score=empty_score,
            k=k,
            inputs=inputs,
        ),
        dtype=np.float64,
    )
    if scores.shape != (len(inputs),):
        raise StrategyError(
            f"strategy {name!r} returned shape {scores.shape}, expected ({len(inputs)},)"
        )
    if np.isnan(scores).any():
        raise StrategyError(f"strategy {name!r} produced NaN scores")
    return scores


def score_images(
    name: str,
    detections: Sequence[Detections],
    *,
    reduction: Reduction = "max",
    rng: np.random.Generator,
    empty_score: float = 0.0,
    k: int = 3,
    views: Sequence[Sequence[Detections]] | None = None,
    embeddings: npt.ArrayLike | None = None,
    labeled_class_counts: npt.ArrayLike | None = None,
    class_difficulty: npt.ArrayLike | None = None,
) -> FloatArray:
    """Score ``detections`` with strategy ``name``; result shape ``(len(detections),)``.

    The single-model strategies need only ``detections``; the others read ``views``,
    ``embeddings`` or ``labeled_class_counts`` (see `ScoringInputs`, `NEEDS`).
    """
    inputs = ScoringInputs(
        detections,
        views=views,
        embeddings=None if embeddings is None else np.asarray(embeddings, dtype=np.float64),
        labeled_class_counts=None
        if labeled_class_counts is None
        else np.asarray(labeled_class_counts, dtype=np.float64),
        class_difficulty=None
        if class_difficulty is None
        else np.asarray(class_difficulty, dtype=np.float64),
    )
    return score_inputs(name, inputs, reduction=reduction, rng=rng, empty_score=empty_score, k=k)
