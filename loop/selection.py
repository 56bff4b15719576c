"""Selection: turn per-image scores (and embeddings, predicted classes) into the batch to label.

Separate from scoring (`loop.uncertainty`): a scorer gives every image a number, a selector
chooses the batch from those numbers and, for the set-type selectors, from image embeddings and
each image's predicted class. Every function takes a seeded `numpy.random.Generator`, so a
selection is reproducible; ties are broken by that generator, never by list position.

A project names ONE strategy (``select.strategy``); `resolve_strategy` turns it into a scorer and
a selector:

- a scorer's name (``entropy``, ``margin``, ``calibrated_entropy``, ``random``, ...): selector
  ``top``, the highest scores;
- ``diversity``: k-center greedy on embeddings (Sener & Savarese 2018), no score;
- ``hybrid``: the top-M images by the base scorer (``select.base_strategy``), then k of them by
  k-center greedy, so a batch is uncertain AND not K near-duplicates;
- ``class_quota``: per-class quotas proportional to the current model's per-class difficulty
  (`loop.uncertainty.class_difficulty`), each filled with the best images predicted to show that
  class, by the base score;
- ``class_diversity``: the same quotas, each filled like ``hybrid`` within the class, with the
  labeled images of that class as centres (class-conditioned diversity).

An image's predicted class is the class of its most confident candidate box (-1: no box); a
labeled image's class is its most frequent labeled class (-1: defect-free).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from loop.detections import Detections
from loop.errors import StrategyError
from loop.uncertainty import NEEDS, STRATEGIES, Need, Reduction, ScoringInputs, score_inputs

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def rank(
    ids: Sequence[str], scores: npt.ArrayLike, rng: np.random.Generator
) -> list[tuple[str, float]]:
    """All ``ids`` ordered by descending score; ties broken by ``rng`` (not by list position)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(ids),):
        raise StrategyError(f"got {len(ids)} ids but scores of shape {s.shape}")
    if np.isnan(s).any():
        raise StrategyError("scores contain NaN; fix the strategy or its inputs")
    tiebreak = rng.random(len(ids))
    order = np.lexsort((tiebreak, -s))
    return [(ids[i], float(s[i])) for i in order]


def top_k(
    ids: Sequence[str], scores: npt.ArrayLike, k: int, rng: np.random.Generator
) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring ``(id, score)`` pairs, most valuable first."""
    if k < 0:
        raise StrategyError(f"k must be >= 0, got {k}")
    return rank(ids, scores, rng)[:k]


def random_k(ids: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` ids drawn uniformly without replacement (all of them when k >= len(ids))."""
    if k < 0:
        raise StrategyError(f"k must be >= 0, got {k}")
    idx = rng.permutation(len(ids))[:k]
    return [ids[i] for i in idx]


def _embeddings(x: npt.ArrayLike, what: str, normalize: bool) -> FloatArray:
    e = np.asarray(x, dtype=np.float64)
    if e.ndim != 2:
        raise StrategyError(f"{what} must be 2-D (n, d), got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise StrategyError(f"{what} contain NaN or infinite values: the model output is broken")
    if normalize and e.size:
        # Pooled detector features have arbitrary scale; compare directions (cosine geometry).
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        e = e / np.where(norms > 0, norms, 1.0)
    return e


def _sq_dist(a: FloatArray, b: FloatArray) -> FloatArray:
    """``(n, d)`` x ``(m, d)`` -> ``(n, m)`` squared Euclidean distances (>= 0)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.clip(d, 0.0, None)


def k_center_greedy(
    embeddings: npt.ArrayLike,
    k: int,
    rng: np.random.Generator,
    labeled: npt.ArrayLike | None = None,
    normalize: bool = False,
) -> tuple[IntArray, FloatArray]:
    """Core-set selection: ``k`` row indices of ``embeddings`` ``(n, d)`` in pick order, and the
    Euclidean distance of each pick to its nearest labeled-or-picked point at pick time.

    Each step picks the candidate farthest from every row of ``labeled`` ``(m, d)`` and every
    earlier pick (ties by ``rng``); the distances are non-increasing after the first pick. With no
    labeled rows the first pick is drawn by ``rng`` and its distance is ``inf``. ``normalize``:
    L2-normalise all rows first. ``k`` is capped at ``n``.
    """
    if k < 0:
        raise StrategyError(f"k must be >= 0, got {k}")
    x = _embeddings(embeddings, "embeddings", normalize)
    n = x.shape[0]
    k = min(k, n)
    min_d = np.full(n, np.inf)
    if labeled is not None:
        lab = _embeddings(labeled, "labeled embeddings", normalize)
        if lab.shape[0] and lab.shape[1] != x.shape[1]:
            raise StrategyError(
                f"labeled embeddings have {lab.shape[1]} dimensions, candidates {x.shape[1]}"
            )
        # Chunked so that 10^5 candidates x 10^4 labeled rows never need one huge matrix.
        for start in range(0, lab.shape[0], 2048):
            chunk = _sq_dist(x, lab[start : start + 2048]).min(axis=1)
            min_d = np.minimum(min_d, chunk)
    picked = np.empty(k, dtype=np.int64)
    dist = np.empty(k, dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    for j in range(k):
        cand = np.where(taken, -1.0, min_d)
        best = cand.max()
        ties = np.flatnonzero(cand == best)
        i = int(ties[0] if len(ties) == 1 else rng.choice(ties))
        picked[j] = i
        dist[j] = math.sqrt(best) if np.isfinite(best) else math.inf
        taken[i] = True
        min_d = np.minimum(min_d, _sq_dist(x, x[i : i + 1])[:, 0])
    return picked, dist


def _pick_priorities(k: int) -> list[float]:
    """Priorities for a picked batch in pick order: ``1, (k-1)/k, ..., 1/k`` (> 0, descending)."""
    return [(k - j) / k for j in range(k)]


def diversity_select(
    ids: Sequence[str],
    embeddings: npt.ArrayLike,
    k: int,
    rng: np.random.Generator,
    labeled_embeddings: npt.ArrayLike | None = None,
    normalize: bool = True,
) -> list[tuple[str, float]]:
    """``k`` ``(id, priority)`` pairs chosen by `k_center_greedy`, in pick order.

    Priorities are rank-based, ``1`` for the first pick down to ``1/k`` (the greedy's distances are
    not comparable across rounds and the first is infinite without labeled images).
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise StrategyError(f"got {len(ids)} ids but embeddings of shape {emb.shape}")
    picked, _ = k_center_greedy(emb, k, rng, labeled_embeddings, normalize)
    return [(ids[int(i)], p) for i, p in zip(picked, _pick_priorities(len(picked)), strict=True)]


def hybrid_select(
    ids: Sequence[str],
    scores: npt.ArrayLike,
    embeddings: npt.ArrayLike,
    k: int,
    rng: np.random.Generator,
    top_m: int,
    labeled_embeddings: npt.ArrayLike | None = None,
    normalize: bool = True,
) -> list[tuple[str, float]]:
    """Pre-filter the ``top_m`` highest ``scores`` (ties by ``rng``), then choose ``k`` of them
    by `k_center_greedy` on ``embeddings`` ``(n, d)`` (labeled rows count as centres).

    Returns ``(id, priority)`` in pick order, priorities as in `diversity_select`. ``top_m`` below
    ``k`` is raised to ``k``; ``top_m == k`` is plain top-k by score.
    """
    if top_m < 1:
        raise StrategyError(f"top_m must be >= 1, got {top_m}")
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise StrategyError(f"got {len(ids)} ids but embeddings of shape {emb.shape}")
    index = {s: i for i, s in enumerate(ids)}
    if len(index) != len(ids):
        raise StrategyError("ids must be unique")
    shortlist = [index[s] for s, _ in top_k(ids, scores, max(top_m, k), rng)]
    picked, _ = k_center_greedy(emb[shortlist], k, rng, labeled_embeddings, normalize)
    return [
        (ids[shortlist[int(i)]], p)
        for i, p in zip(picked, _pick_priorities(len(picked)), strict=True)
    ]


# ------------------------------------------------------------------------------------------
# per-class quotas
# ------------------------------------------------------------------------------------------


def image_class(det: Detections) -> int:
    """The predicted class of an image: the class of its most confident box (-1: no box)."""
    if len(det) == 0:
        return -1
    if det.confidence is not None:
        return int(det.class_id[int(np.argmax(det.confidence))])
    return int(np.bincount(det.class_id).argmax())


def labeled_class(det: Detections) -> int:
    """The class of a labeled image: its most frequent box class, lowest id on a tie (-1: none)."""
    if len(det) == 0:
        return -1
    return int(np.bincount(det.class_id).argmax())


def class_quotas(weights: npt.ArrayLike, available: npt.ArrayLike, k: int) -> IntArray:
    """Split a batch of ``k`` over groups: ``(G,)`` weights > 0 and ``(G,)`` available images ->
    ``(G,)`` quotas, each <= its availability, summing to ``min(k, sum(available))``.

    Proportional to the weights (largest remainder); what a group cannot fill goes to the others,
    again by weight. Known answer: weights (3, 1), plenty available, k = 8 -> (6, 2).
    """
    w = np.asarray(weights, dtype=np.float64)
    avail = np.asarray(available, dtype=np.int64)
    if w.ndim != 1 or w.shape != avail.shape:
        raise StrategyError(f"weights and available must be (G,), got {w.shape}, {avail.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0) or np.any(avail < 0):
        raise StrategyError(f"need weights > 0 and available >= 0, got {w}, {avail}")
    if k < 0:
        raise StrategyError(f"k must be >= 0, got {k}")
    quota = np.zeros(w.shape, dtype=np.int64)
    left = min(k, int(avail.sum()))
    while left > 0:
        open_ = quota < avail
        share = np.where(open_, w, 0.0)
        ideal = left * share / share.sum()
        add = np.minimum(np.floor(ideal).astype(np.int64), avail - quota)
        if add.sum() == 0:
            # Fewer seats than open groups: one seat to the largest remainder (then weight).
            order = np.lexsort((-share, -(ideal - np.floor(ideal))))
            add[next(int(g) for g in order if open_[g])] = 1
        quota += add
        left -= int(add.sum())
    return quota


# ------------------------------------------------------------------------------------------
# selectors on precomputed per-image outputs
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CandidateSet:
    """What the selectors read for ``n`` candidate images (parallel arrays, same order).

    ``scores``: ``(n,)`` the scorer's per-image scores (higher = more worth labeling).
    ``embeddings``: optional ``(n, d)`` image vectors. ``image_class``: optional ``(n,)`` int,
    the predicted class of each image (-1: none), see `image_class`.
    """

    ids: Sequence[str]
    scores: FloatArray
    embeddings: FloatArray | None = None
    image_class: IntArray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(set(self.ids)) != n:
            raise StrategyError("candidate ids must be unique")
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.shape != (n,) or np.isnan(scores).any():
            raise StrategyError(f"got {n} ids but scores of shape {scores.shape} (or NaN)")
        object.__setattr__(self, "scores", scores)
        if self.embeddings is not None:
            emb = np.asarray(self.embeddings, dtype=np.float64)
            if emb.ndim != 2 or emb.shape[0] != n:
                raise StrategyError(f"got {n} ids but embeddings of shape {emb.shape}")
            object.__setattr__(self, "embeddings", emb)
        if self.image_class is not None:
            cls = np.asarray(self.image_class, dtype=np.int64)
            if cls.shape != (n,):
                raise StrategyError(f"got {n} ids but image classes of shape {cls.shape}")
            object.__setattr__(self, "image_class", cls)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class LabeledSet:
    """The labeled images a diversity selector keeps away from: ``embeddings`` ``(m, d)`` and,
    for class-conditioned diversity, ``image_class`` ``(m,)`` (see `labeled_class`)."""

    embeddings: FloatArray | None = None
    image_class: IntArray | None = None


@dataclass(frozen=True)
class SelectParams:
    """Knobs of the selectors (the matching fields of `loop.config.SelectConfig`).

    ``top_m``: the shortlist of ``hybrid`` (None: ``hybrid_factor * k``); ``class_diversity``
    shortlists ``hybrid_factor * quota`` per class. ``class_weights``: ``(C,)`` quota weights of
    ``class_quota``/``class_diversity`` (the current model's `class_difficulty`).
    """

    reduction: Reduction = "max"
    empty_score: float = 0.0
    topk: int = 3
    base_strategy: str = "entropy"
    top_m: int | None = None
    hybrid_factor: float = 5.0
    normalize_embeddings: bool = True
    class_weights: FloatArray | None = field(default=None, compare=False)


Selector = Callable[
    [CandidateSet, int, np.random.Generator, SelectParams, LabeledSet], list[tuple[str, float]]
]
SELECTORS: dict[str, Selector] = {}
SELECTOR_NEEDS: dict[str, frozenset[Need]] = {}
# Selectors that rank by the base scorer (the others use no score or their own scorer).
_BASED = {"hybrid", "class_quota", "class_diversity"}


def _selector(name: str, needs: Sequence[Need]) -> Callable[[Selector], Selector]:
    def deco(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        SELECTOR_NEEDS[name] = frozenset(needs)
        return fn

    return deco


def _need_embeddings(c: CandidateSet, name: str) -> FloatArray:
    if c.embeddings is None:
        raise StrategyError(f"strategy {name!r} needs image embeddings (CandidateSet.embeddings)")
    return c.embeddings


@_selector("top", needs=())
def _top(
    c: CandidateSet, k: int, rng: np.random.Generator, p: SelectParams, lab: LabeledSet
) -> list[tuple[str, float]]:
    scores = c.scores
    if scores.size and scores.min() < 0:
        scores = scores - scores.min()  # priorities must be >= 0; the ranking is unchanged
    return top_k(c.ids, scores, k, rng)


@_selector("diversity", needs=("embeddings",))
def _diversity(
    c: CandidateSet, k: int, rng: np.random.Generator, p: SelectParams, lab: LabeledSet
) -> list[tuple[str, float]]:
    emb = _need_embeddings(c, "diversity")
    return diversity_select(c.ids, emb, k, rng, lab.embeddings, p.normalize_embeddings)


@_selector("hybrid", needs=("predictions", "embeddings"))
def _hybrid(
    c: CandidateSet, k: int, rng: np.random.Generator, p: SelectParams, lab: LabeledSet
) -> list[tuple[str, float]]:
    emb = _need_embeddings(c, "hybrid")
    top_m = p.top_m if p.top_m is not None else max(k, math.ceil(p.hybrid_factor * k))
    return hybrid_select(
        c.ids, c.scores, emb, k, rng, top_m, lab.embeddings, p.normalize_embeddings
    )


def _quota_groups(
    c: CandidateSet, k: int, p: SelectParams, name: str
) -> tuple[IntArray, list[int], IntArray]:
    """(image classes, the groups present, their quotas) for the class selectors."""
    if c.image_class is None:
        raise StrategyError(f"strategy {name!r} needs each image's predicted class")
    if p.class_weights is None:
        raise StrategyError(
            f"strategy {name!r} needs per-class weights (the current model's class difficulty "
            "from its validation AP); train a model with a val split first"
        )
    w = np.asarray(p.class_weights, dtype=np.float64)
    cls = c.image_class
    if cls.size and cls.max() >= w.shape[0]:
        raise StrategyError(f"an image class {int(cls.max())} has no weight ({w.shape[0]} given)")
    groups = sorted({int(g) for g in cls})
    # Images with no predicted box form their own group, weighted like an average class.
    weight = np.array([w[g] if g >= 0 else float(w.mean()) for g in groups])
    available = np.array([int((cls == g).sum()) for g in groups])
    return cls, groups, class_quotas(weight, available, k)


def _by_score(
    c: CandidateSet, picks: list[int], rng: np.random.Generator
) -> list[tuple[str, float]]:
    """The picked rows ordered by score (ties by ``rng``), with rank-based priorities."""
    order = [c.ids[i] for i in picks]
    ranked = rank(order, c.scores[picks], rng)
    return [(i, pr) for (i, _), pr in zip(ranked, _pick_priorities(len(ranked)), strict=True)]


@_selector("class_quota", needs=("predictions", "class_difficulty"))
def _class_quota(
    c: CandidateSet, k: int, rng: np.random.Generator, p: SelectParams, lab: LabeledSet
) -> list[tuple[str, float]]:
    cls, groups, quotas = _quota_groups(c, k, p, "class_quota")
    picks: list[int] = []
    for g, q in zip(groups, quotas, strict=True):
        rows = np.flatnonzero(cls == g)
        best = top_k([str(r) for r in rows], c.scores[rows], int(q), rng)
        picks += [int(r) for r, _ in best]
    return _by_score(c, picks, rng)


@_selector("class_diversity", needs=("predictions", "embeddings", "class_difficulty"))
def _class_diversity(
    c: CandidateSet, k: int, rng: np.random.Generator, p: SelectParams, lab: LabeledSet
) -> list[tuple[str, float]]:
    emb = _need_embeddings(c, "class_diversity")
    cls, groups, quotas = _quota_groups(c, k, p, "class_diversity")
    lab_emb, lab_cls = lab.embeddings, lab.image_class
    if lab_emb is not None and lab_cls is not None and len(lab_cls) != len(lab_emb):
        raise StrategyError(
            f"labeled set: {len(lab_emb)} embeddings but {len(lab_cls)} image classes"
        )
    picks: list[int] = []
    for g, q in zip(groups, quotas, strict=True):
        if q == 0:
            continue
        rows = np.flatnonzero(cls == g)
        centres = None
        if lab_emb is not None and len(lab_emb):
            # Class-conditioned: an image is "covered" only by labeled images of its own class.
            centres = lab_emb if lab_cls is None else lab_emb[np.asarray(lab_cls) == g]
        top_m = max(int(q), math.ceil(p.hybrid_factor * int(q)))
        chosen = hybrid_select(
            [str(r) for r in rows],
            c.scores[rows],
            emb[rows],
            int(q),
            rng,
            top_m,
            centres,
            p.normalize_embeddings,
        )
        picks += [int(r) for r, _ in chosen]
    return _by_score(c, picks, rng)


# ------------------------------------------------------------------------------------------
# strategy names
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyPlan:
    """What strategy ``name`` runs: ``scorer`` (a `loop.uncertainty` strategy; None for pure
    ``diversity``), ``selector`` (a `SELECTORS` name) and the model outputs both read."""

    name: str
    scorer: str | None
    selector: str
    needs: frozenset[Need]


def resolve_strategy(name: str, base_strategy: str = "entropy") -> StrategyPlan:
    """The scorer and selector behind strategy ``name`` (see the module docstring).

    Raises `StrategyError` for an unknown name or a base that is not a scorer.
    """
    if name in STRATEGIES:
        return StrategyPlan(name, name, "top", NEEDS[name])
    if name == "diversity":
        return StrategyPlan(name, None, name, SELECTOR_NEEDS[name])
    if name in SELECTORS and name in _BASED:
        if base_strategy not in STRATEGIES:
            raise StrategyError(
                f"base_strategy must be a scoring strategy ({sorted(STRATEGIES)}), "
                f"not {base_strategy!r}"
            )
        return StrategyPlan(name, base_strategy, name, NEEDS[base_strategy] | SELECTOR_NEEDS[name])
    raise StrategyError(f"unknown strategy {name!r}; choose one of {available_strategies()}")


def strategy_needs(name: str, base_strategy: str = "entropy") -> frozenset[Need]:
    """The model outputs strategy ``name`` reads (see `loop.uncertainty.Need`)."""
    return resolve_strategy(name, base_strategy).needs


def available_strategies(task: str | None = None) -> list[str]:
    """Every strategy name a project may configure; for ``task="detect"`` without those that
    read instance masks (`loop.uncertainty.MASK_STRATEGIES`)."""
    from loop.uncertainty import MASK_STRATEGIES

    names = set(STRATEGIES) | (set(SELECTORS) - {"top"})
    return sorted(names - MASK_STRATEGIES if task == "detect" else names)


def select(
    plan: StrategyPlan,
    candidates: CandidateSet,
    k: int,
    rng: np.random.Generator,
    params: SelectParams | None = None,
    labeled: LabeledSet | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` (or fewer, when fewer exist) ids ``plan`` picks, most valuable first, each with
    a priority >= 0: the score itself for ``top``, rank-based ``1 .. 1/k`` for set selectors."""
    if k < 0:
        raise StrategyError(f"k must be >= 0, got {k}")
    return SELECTORS[plan.selector](
        candidates, k, rng, params or SelectParams(), labeled or LabeledSet()
    )


def select_batch(
    name: str,
    ids: Sequence[str],
    inputs: ScoringInputs,
    k: int,
    rng: np.random.Generator,
    params: SelectParams | None = None,
    labeled_embeddings: npt.ArrayLike | None = None,
    labeled_classes: npt.ArrayLike | None = None,
) -> list[tuple[str, float]]:
    """Score ``inputs`` (one entry per id) with strategy ``name``'s scorer, then pick ``k`` with
    its selector: `resolve_strategy` + `loop.uncertainty.score_inputs` + `select` in one call
    (the loop itself scores in batches, see `loop.scoring`)."""
    p = params or SelectParams()
    if len(ids) != len(inputs):
        raise StrategyError(f"got {len(ids)} ids but inputs for {len(inputs)} images")
    plan = resolve_strategy(name, p.base_strategy)
    scores: FloatArray
    if plan.scorer is None:
        scores = np.zeros(len(ids), dtype=np.float64)
    else:
        scores = score_inputs(
            plan.scorer, inputs, reduction=p.reduction, rng=rng, empty_score=p.empty_score, k=p.topk
        )
    if "class_difficulty" in plan.needs and p.class_weights is None:
        p = replace(p, class_weights=inputs.class_difficulty)
    cands = CandidateSet(
        ids,
        scores,
        inputs.embeddings,
        np.array([image_class(d) for d in inputs.detections], dtype=np.int64),
    )
    labeled = LabeledSet(
        None if labeled_embeddings is None else np.asarray(labeled_embeddings, dtype=np.float64),
        None if labeled_classes is None else np.asarray(labeled_classes, dtype=np.int64),
    )
    return select(plan, cands, k, rng, p, labeled)
