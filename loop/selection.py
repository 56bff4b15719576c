"""Selection: turn scores (or embeddings) into the batch to label. Separate from scoring.

Every function takes a seeded `numpy.random.Generator`, so a selection is reproducible; ties are
broken by that generator, never by list position.

- `rank` / `top_k` / `random_k`: order by independent per-image scores.
- `k_center_greedy`: core-set diversity (Sener & Savarese 2018) on image embeddings: repeatedly
  pick the image farthest from everything labeled or picked so far.
- `hybrid_select`: pre-filter the top-M images by an uncertainty strategy, then choose K of them
  by k-center greedy, so a batch is uncertain AND not K near-duplicates.
- `select_batch`: one entry point for every strategy name (the registered uncertainty strategies
  of `loop.uncertainty` plus ``diversity`` and ``hybrid``), used by the oracle replay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from loop.errors import StrategyError
from loop.uncertainty import NEEDS, STRATEGIES, Need, Reduction, ScoringInputs, score_inputs

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Selection-type strategies (they choose a set; see the module docstring) and what they read.
SELECTORS: dict[str, frozenset[Need]] = {
    "diversity": frozenset({"embeddings"}),
    "hybrid": frozenset({"predictions", "embeddings"}),
}


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


def strategy_needs(name: str) -> frozenset[Need]:
    """The model outputs strategy ``name`` reads (see `loop.uncertainty.Need`)."""
    if name in SELECTORS:
        return SELECTORS[name]
    if name in NEEDS:
        return NEEDS[name]
    raise StrategyError(f"unknown strategy {name!r}; choose one of {available_strategies()}")


def available_strategies() -> list[str]:
    """Every strategy name `select_batch` accepts."""
    return sorted(set(STRATEGIES) | set(SELECTORS))


@dataclass(frozen=True)
class SelectParams:
    """Knobs of `select_batch` (the matching fields of `loop.config.SelectConfig`).

    ``hybrid_base``: the uncertainty strategy hybrid pre-filters by; ``top_m``: its shortlist
    size (None: ``hybrid_factor * k``).
    """

    reduction: Reduction = "max"
    empty_score: float = 0.0
    topk: int = 3
    hybrid_base: str = "entropy"
    top_m: int | None = None
    hybrid_factor: float = 5.0
    normalize_embeddings: bool = True


def select_batch(
    name: str,
    ids: Sequence[str],
    inputs: ScoringInputs,
    k: int,
    rng: np.random.Generator,
    params: SelectParams | None = None,
    labeled_embeddings: npt.ArrayLike | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` ids (with priority >= 0, most valuable first) that strategy ``name`` picks.

    ``inputs`` holds one entry per id (same order). Scoring strategies rank by score (`top_k`);
    ``diversity`` and ``hybrid`` choose a set (their priorities are rank-based, in ``(0, 1]``).
    Scores are shifted to be >= 0 when a strategy returns negatives (a ranking is unchanged).
    """
    p = params or SelectParams()
    if len(ids) != len(inputs):
        raise StrategyError(f"got {len(ids)} ids but inputs for {len(inputs)} images")
    if k < 0:
        raise StrategyError(f"k must be >= 0, got {k}")
    if name == "diversity":
        if inputs.embeddings is None:
            raise StrategyError("strategy 'diversity' needs ScoringInputs.embeddings")
        return diversity_select(
            ids, inputs.embeddings, k, rng, labeled_embeddings, p.normalize_embeddings
        )
    if name == "hybrid":
        if inputs.embeddings is None:
            raise StrategyError("strategy 'hybrid' needs ScoringInputs.embeddings")
        if p.hybrid_base in SELECTORS:
            raise StrategyError(f"hybrid_base must be a scoring strategy, not {p.hybrid_base!r}")
        scores = score_inputs(
            p.hybrid_base,
            inputs,
            reduction=p.reduction,
            rng=rng,
            empty_score=p.empty_score,
            k=p.topk,
        )
        top_m = p.top_m if p.top_m is not None else max(k, math.ceil(p.hybrid_factor * k))
        return hybrid_select(
            ids,
            scores,
            inputs.embeddings,
            k,
            rng,
            top_m,
            labeled_embeddings,
            p.normalize_embeddings,
        )
    scores = score_inputs(
        name, inputs, reduction=p.reduction, rng=rng, empty_score=p.empty_score, k=p.topk
    )
    if scores.size and scores.min() < 0:
        scores = scores - scores.min()
    return top_k(ids, scores, k, rng)
