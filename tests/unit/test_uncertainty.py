import math

import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import StrategyError
from loop.selection import random_k, rank, top_k
from loop.uncertainty import (
    STRATEGIES,
    binary_entropy,
    box_entropy,
    reduce_boxes,
    score_images,
)


def image(probs):
    probs = np.asarray(probs, dtype=float).reshape(-1, 3)
    n = len(probs)
    cls = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
    conf = probs.max(axis=1) if n else np.zeros(0)
    boxes = np.tile([0.0, 0.0, 5.0, 5.0], (n, 1))
    return Detections(boxes, cls, (10, 10), confidence=conf, class_probs=probs)


def test_registry_has_entropy_and_random():
    assert {"entropy", "random"} <= set(STRATEGIES)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.5, math.log(2)),
        (0.0, 0.0),
        (1.0, 0.0),
        (0.1, -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))),
    ],
)
def test_binary_entropy_known_values(p, expected):
    assert binary_entropy(p) == pytest.approx(expected, abs=1e-9)


def test_box_entropy_sums_over_classes():
    assert box_entropy([[0.5, 0.5, 0.0]])[0] == pytest.approx(2 * math.log(2))


def test_entropy_ranks_known_order():
    certain = image([[0.99, 0.0, 0.0]])
    unsure = image([[0.5, 0.01, 0.01]])
    confused = image([[0.5, 0.5, 0.01]])
    rng = np.random.default_rng(0)
    s = score_images("entropy", [certain, unsure, confused], rng=rng)
    assert s.argsort().tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [("max", 3.0), ("mean", 2.0), ("sum", 6.0), ("topk_mean", 2.5)],
)
def test_reductions(reduction, expected):
    assert reduce_boxes([1.0, 2.0, 3.0], reduction, k=2) == pytest.approx(expected)


def test_reduction_changes_ranking():
    one_bad_box = image([[0.5, 0, 0], [0.99, 0, 0], [0.99, 0, 0], [0.99, 0, 0]])
    two_medium = image([[0.3, 0, 0], [0.3, 0, 0]])
    rng = np.random.default_rng(0)
    by_max = score_images("entropy", [one_bad_box, two_medium], reduction="max", rng=rng)
    by_mean = score_images("entropy", [one_bad_box, two_medium], reduction="mean", rng=rng)
    assert by_max[0] > by_max[1]
    assert by_mean[0] < by_mean[1]


def test_empty_image_gets_explicit_score():
    rng = np.random.default_rng(0)
    s = score_images("entropy", [image(np.zeros((0, 3)))], rng=rng, empty_score=0.25)
    assert s.tolist() == [0.25]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: box_entropy([[np.nan, 0.1, 0.1]]), "NaN"),
        (lambda: score_images("nope", [], rng=np.random.default_rng(0)), "unknown strategy"),
        (
            lambda: score_images("entropy", [], reduction="median", rng=np.random.default_rng(0)),
            "reduction",
        ),
        (lambda: reduce_boxes([], "max"), "at least one box"),
        (
            lambda: STRATEGIES["random"](
                [image([[0.1, 0, 0]])], reduction="max", rng=None, empty_score=0.0, k=3
            ),
            "seeded",
        ),
    ],
)
def test_errors_are_named(call, match):
    with pytest.raises(StrategyError, match=match):
        call()


def test_entropy_needs_probabilities():
    d = Detections(np.array([[0.0, 0, 1, 1]]), np.array([0]), (5, 5), confidence=np.array([0.5]))
    with pytest.raises(StrategyError, match="class probabilities"):
        score_images("entropy", [d], rng=np.random.default_rng(0))


def test_random_strategy_is_seeded():
    imgs = [image([[0.1, 0, 0]])] * 5
    a = score_images("random", imgs, rng=np.random.default_rng(3))
    b = score_images("random", imgs, rng=np.random.default_rng(3))
    c = score_images("random", imgs, rng=np.random.default_rng(4))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_rank_orders_by_score_and_breaks_ties_by_seed():
    ids = ["a", "b", "c", "d"]
    scores = [0.1, 0.9, 0.5, 0.5]
    r1 = rank(ids, scores, np.random.default_rng(0))
    order = [i for i, _ in r1]
    assert order[0] == "b" and order[-1] == "a"
    assert {i for i, _ in r1[1:3]} == {"c", "d"}
    ties = {tuple(i for i, _ in rank(ids, scores, np.random.default_rng(s))) for s in range(20)}
    assert len(ties) == 2  # both tie orders occur across seeds: list position decides nothing
    assert rank(ids, scores, np.random.default_rng(5)) == rank(
        ids, scores, np.random.default_rng(5)
    )


def test_top_k_and_random_k():
    rng = np.random.default_rng(1)
    assert [i for i, _ in top_k(["x", "y", "z"], [3, 1, 2], 2, rng)] == ["x", "z"]
    picked = random_k(list("abcdef"), 3, np.random.default_rng(2))
    assert len(set(picked)) == 3 and picked == random_k(list("abcdef"), 3, np.random.default_rng(2))
    with pytest.raises(StrategyError):
        rank(["a"], [np.nan], rng)
