"""Selection: turn per-image scores into the batch to label. Separate from scoring.

Every function takes a seeded `numpy.random.Generator`, so a selection is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from loop.errors import StrategyError


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
