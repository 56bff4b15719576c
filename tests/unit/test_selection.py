"""Selection: k-center greedy, hybrid, `select_batch` for every strategy; seeded reproducibility."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import StrategyError
from loop.selection import (
    CandidateSet,
    LabeledSet,
    SelectParams,
    available_strategies,
    class_quotas,
    diversity_select,
    hybrid_select,
    image_class,
    k_center_greedy,
    labeled_class,
    resolve_strategy,
    select,
    select_batch,
    strategy_needs,
)
from loop.uncertainty import ScoringInputs

RNG = np.random.default_rng


def line(*xs: float) -> np.ndarray:
    """1-D points as ``(n, 1)`` embeddings."""
    return np.array(xs, dtype=float).reshape(-1, 1)


def det(probs: list[list[float]], wh: tuple[int, int] = (64, 64)) -> Detections:
    p = np.asarray(probs, dtype=float).reshape(-1, 2)
    n = len(p)
    boxes = np.tile([1.0, 1.0, 9.0, 9.0], (n, 1))
    cls = p.argmax(axis=1) if n else np.zeros(0, dtype=int)
    # Each box's outline is the box itself, so the mask strategies score these too.
    outline = (np.array([[1.0, 1.0], [9.0, 1.0], [9.0, 9.0], [1.0, 9.0]]),)
    return Detections(
        boxes,
        cls,
        wh,
        confidence=p.max(axis=1) if n else np.zeros(0),
        class_probs=p,
        polygons=tuple(outline for _ in range(n)),
    )


def test_k_center_greedy_known_order_with_labeled_centres():
    # Labeled point at 0: 10 first (distance 10), then 5 (5 from 0 and 10), then 2 (2 from 0).
    idx, dist = k_center_greedy(line(1, 5, 10, 6, 2), 3, RNG(0), labeled=line(0))
    assert idx.tolist() == [2, 1, 4]
    assert dist.tolist() == pytest.approx([10.0, 5.0, 2.0])
    assert all(a >= b for a, b in itertools.pairwise(dist))  # non-increasing


def test_k_center_greedy_without_labeled_starts_at_a_seeded_random_point():
    x = line(0, 1, 2, 10)
    firsts = {int(k_center_greedy(x, 1, RNG(s))[0][0]) for s in range(30)}
    assert len(firsts) > 1  # the first pick is drawn, not "index 0"
    _, dist = k_center_greedy(x, 2, RNG(0))
    assert math.isinf(dist[0])
    a, b = (k_center_greedy(x, 4, RNG(7))[0].tolist() for _ in range(2))
    assert a == b and sorted(a) == [0, 1, 2, 3]


def test_k_center_greedy_edge_cases():
    assert k_center_greedy(line(1, 2), 5, RNG(0))[0].shape == (2,)  # k capped at n
    assert k_center_greedy(np.zeros((0, 3)), 3, RNG(0))[0].shape == (0,)
    assert k_center_greedy(line(1, 2), 0, RNG(0))[0].shape == (0,)
    # Duplicates: still k distinct indices.
    assert sorted(k_center_greedy(line(3, 3, 3), 3, RNG(0))[0].tolist()) == [0, 1, 2]
    # Empty labeled set (embed() of no images gives (0, 0)).
    assert k_center_greedy(line(1, 2), 1, RNG(0), labeled=np.zeros((0, 0)))[0].shape == (1,)
    with pytest.raises(StrategyError, match="NaN"):
        k_center_greedy(np.array([[np.nan]]), 1, RNG(0))
    with pytest.raises(StrategyError, match="dimensions"):
        k_center_greedy(line(1, 2), 1, RNG(0), labeled=np.zeros((1, 3)))
    with pytest.raises(StrategyError, match="k must be"):
        k_center_greedy(line(1), -1, RNG(0))


def test_normalised_embeddings_compare_directions():
    x = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    idx, _ = k_center_greedy(x, 1, RNG(0), labeled=np.array([[2.0, 0.0]]), normalize=True)
    assert idx.tolist() == [2]  # [10, 0] points the same way as the labeled one


def test_hybrid_prefilters_by_score_then_spreads_by_embedding():
    ids = list("abcdef")
    scores = [0.9, 0.89, 0.88, 0.1, 0.87, 0.05]
    # a, b, c are near-duplicates; e is far away; d and f are far but certain.
    emb = line(0.0, 0.01, 0.02, 50.0, 10.0, 100.0)
    picked = hybrid_select(ids, scores, emb, 2, RNG(0), top_m=4, normalize=False)
    assert {i for i, _ in picked} >= {"e"} and len(picked) == 2
    assert not {"d", "f"} & {i for i, _ in picked}
    assert [p for _, p in picked] == [1.0, 0.5]
    # top_m == k: plain top-k by score.
    plain = hybrid_select(ids, scores, emb, 2, RNG(0), top_m=2, normalize=False)
    assert {i for i, _ in plain} == {"a", "b"}
    with pytest.raises(StrategyError, match="top_m"):
        hybrid_select(ids, scores, emb, 2, RNG(0), top_m=0)
    with pytest.raises(StrategyError, match="unique"):
        hybrid_select(["a", "a"], [1, 2], line(0, 1), 1, RNG(0), top_m=2)


def test_diversity_select_shapes_and_errors():
    picked = diversity_select(list("xyz"), line(0, 5, 10), 2, RNG(0), labeled_embeddings=line(0))
    assert [i for i, _ in picked] == ["z", "y"]
    with pytest.raises(StrategyError, match="embeddings of shape"):
        diversity_select(list("xy"), line(0, 1, 2), 1, RNG(0))


def _inputs(n: int, seed: int = 0) -> tuple[list[str], ScoringInputs]:
    rng = RNG(seed)
    dets = [det(rng.random((int(rng.integers(0, 4)), 2)).tolist()) for _ in range(n)]
    ids = [f"img{i:02d}" for i in range(n)]
    views = [[d] for d in dets]
    return ids, ScoringInputs(
        dets,
        views=views,
        embeddings=rng.random((n, 5)),
        labeled_class_counts=np.array([3.0, 1]),
        class_difficulty=np.array([0.2, 0.9]),
    )


@pytest.mark.parametrize("name", available_strategies())
def test_select_batch_every_strategy_is_reproducible_and_valid(name):
    ids, inputs = _inputs(20)
    a = select_batch(name, ids, inputs, 5, RNG(11), labeled_embeddings=RNG(1).random((3, 5)))
    b = select_batch(name, ids, inputs, 5, RNG(11), labeled_embeddings=RNG(1).random((3, 5)))
    assert a == b
    assert len(a) == 5 and len({i for i, _ in a}) == 5
    assert all(i in ids for i, _ in a)
    assert all(p >= 0 and math.isfinite(p) for _, p in a)
    assert [p for _, p in a] == sorted((p for _, p in a), reverse=True)


def test_select_batch_seed_changes_random_selection():
    ids, inputs = _inputs(30)
    runs = {tuple(i for i, _ in select_batch("random", ids, inputs, 5, RNG(s))) for s in range(5)}
    assert len(runs) == 5


def test_select_batch_matches_top_k_for_scoring_strategies():
    ids = ["a", "b", "c"]
    inputs = ScoringInputs([det([[0.5, 0.0]]), det([[0.99, 0.0]]), det([[0.7, 0.6]])])
    picked = select_batch("entropy", ids, inputs, 2, RNG(0))
    assert [i for i, _ in picked] == ["c", "a"]


def test_select_batch_shifts_negative_scores_to_valid_priorities():
    ids = ["a", "b"]
    inputs = ScoringInputs([Detections.empty((8, 8), 2), det([[0.5, 0.5]])])
    picked = select_batch("entropy", ids, inputs, 2, RNG(0), SelectParams(empty_score=-3.0))
    assert picked[0][0] == "b" and picked[1] == ("a", 0.0)


def test_select_batch_errors_are_named():
    ids, inputs = _inputs(4)
    plain = ScoringInputs(inputs.detections, class_difficulty=np.array([0.5, 0.5]))
    for name in ("diversity", "hybrid", "class_diversity"):
        with pytest.raises(StrategyError, match="embeddings"):
            select_batch(name, ids, plain, 2, RNG(0))
    with pytest.raises(StrategyError, match="per-class weights"):
        select_batch("class_quota", ids, ScoringInputs(inputs.detections), 2, RNG(0))
    with pytest.raises(StrategyError, match="unknown strategy"):
        strategy_needs("nope")
    with pytest.raises(StrategyError, match="inputs for 4"):
        select_batch("entropy", ids[:2], inputs, 1, RNG(0))
    with pytest.raises(StrategyError, match="scoring strategy"):
        select_batch("hybrid", ids, inputs, 1, RNG(0), SelectParams(base_strategy="diversity"))
    assert strategy_needs("hybrid") == {"predictions", "embeddings"}


@pytest.mark.parametrize(
    ("name", "base", "scorer", "selector", "needs"),
    [
        ("entropy", "margin", "entropy", "top", {"predictions"}),
        ("random", "entropy", "random", "top", set()),
        ("diversity", "entropy", None, "diversity", {"embeddings"}),
        ("hybrid", "margin", "margin", "hybrid", {"predictions", "embeddings"}),
        ("class_quota", "entropy", "entropy", "class_quota", {"predictions", "class_difficulty"}),
        (
            "class_diversity",
            "calibrated_entropy",
            "calibrated_entropy",
            "class_diversity",
            {"predictions", "embeddings", "class_difficulty"},
        ),
        (
            "hybrid",
            "localization_stability",
            "localization_stability",
            "hybrid",
            {"predictions", "embeddings", "tta"},
        ),
    ],
)
def test_resolve_strategy_table(name, base, scorer, selector, needs):
    plan = resolve_strategy(name, base)
    assert (plan.scorer, plan.selector, set(plan.needs)) == (scorer, selector, needs)


def test_resolve_strategy_refuses_unknown_names_and_non_scorer_bases():
    with pytest.raises(StrategyError, match="unknown strategy 'top'"):
        resolve_strategy("top")  # a selector's internal name is not a strategy
    with pytest.raises(StrategyError, match="base_strategy"):
        resolve_strategy("class_quota", "hybrid")
    assert "class_diversity" in available_strategies() and "top" not in available_strategies()


@pytest.mark.parametrize(
    ("weights", "available", "k", "expected"),
    [
        ([3, 1], [10, 10], 8, [6, 2]),
        ([1, 1, 1], [10, 10, 10], 3, [1, 1, 1]),
        ([3, 1], [2, 10], 8, [2, 6]),  # the first group is short: the rest goes to the other
        ([1, 1], [3, 2], 10, [3, 2]),  # fewer images than seats
        ([1, 2, 1], [5, 5, 5], 1, [0, 1, 0]),  # one seat: the heaviest group
        ([0.5, 0.25, 0.25], [9, 9, 9], 5, [3, 1, 1]),
        ([1, 1], [0, 0], 4, [0, 0]),
        ([2, 1], [5, 5], 0, [0, 0]),
    ],
)
def test_class_quotas_known_answers(weights, available, k, expected):
    q = class_quotas(weights, available, k)
    assert q.tolist() == expected
    assert q.sum() == min(k, sum(available)) and (q <= np.array(available)).all()


def test_class_quotas_refuses_bad_input():
    with pytest.raises(StrategyError, match="weights > 0"):
        class_quotas([0, 1], [1, 1], 1)
    with pytest.raises(StrategyError, match=r"\(G,\)"):
        class_quotas([1, 1], [1], 1)


def test_image_class_and_labeled_class():
    a = det([[0.2, 0.9], [0.95, 0.1]])  # most confident box: class 0
    assert image_class(a) == 0
    assert image_class(Detections.empty((8, 8), 2)) == -1
    gt = Detections(np.tile([1.0, 1, 5, 5], (3, 1)), np.array([1, 0, 1]), (8, 8))
    assert labeled_class(gt) == 1 and labeled_class(Detections.empty((8, 8))) == -1


def _cands(classes: list[int], scores: list[float], emb: np.ndarray | None = None) -> CandidateSet:
    ids = [f"i{j}" for j in range(len(classes))]
    return CandidateSet(ids, np.array(scores, float), emb, np.array(classes))


def test_class_quota_fills_each_class_with_its_best_images():
    # Class 1 is three times as hard as class 0: 3 of 4 seats, filled by its highest scores.
    c = _cands([0, 0, 0, 1, 1, 1, 1], [0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.6])
    plan = resolve_strategy("class_quota")
    params = SelectParams(class_weights=np.array([0.25, 0.75]))
    picked = select(plan, c, 4, RNG(0), params)
    assert {i for i, _ in picked} == {"i0", "i4", "i6", "i5"}
    assert [i for i, _ in picked] == ["i0", "i4", "i6", "i5"]  # by score
    assert [p for _, p in picked] == [1.0, 0.75, 0.5, 0.25]
    # Uniform weights: 2 + 2.
    even = select(plan, c, 4, RNG(0), SelectParams(class_weights=np.array([0.5, 0.5])))
    assert {i for i, _ in even} == {"i0", "i1", "i4", "i6"}


def test_class_diversity_keeps_away_from_labeled_images_of_the_same_class_only():
    # Candidates: class 0 at 0 and 9, class 1 at 1 and 10. Labeled: a class-0 image at 10 and a
    # class-1 image at 0, i.e. each near the OTHER class's candidates.
    c = _cands([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], line(0.0, 9.0, 1.0, 10.0))
    plan = resolve_strategy("class_diversity")
    params = SelectParams(class_weights=np.array([0.5, 0.5]), normalize_embeddings=False)
    labeled = LabeledSet(line(10.0, 0.0), np.array([0, 1]))
    # Class-conditioned: each class keeps away from its own labeled image only.
    assert {i for i, _ in select(plan, c, 2, RNG(0), params, labeled)} == {"i0", "i3"}
    # Without classes the labeled images cover whatever lies near them.
    blind = LabeledSet(line(10.0, 0.0), None)
    assert {i for i, _ in select(plan, c, 2, RNG(0), params, blind)} == {"i1", "i2"}
