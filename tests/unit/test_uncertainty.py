import math

import numpy as np
import pytest

from loop.config import SelectConfig
from loop.detections import Detections
from loop.errors import StrategyError
from loop.selection import random_k, rank, top_k
from loop.uncertainty import (
    REDUCTIONS,
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


def test_every_reduction_name_is_tested_and_has_a_reducer():
    # One list of names (the `Reduction` type): the table above covers it, the config accepts it.
    assert REDUCTIONS == ("max", "mean", "sum", "topk_mean")
    assert SelectConfig(reduction="topk_mean").reduction == "topk_mean"
    with pytest.raises(ValueError, match="reduction"):
        SelectConfig(reduction="median")  # type: ignore[arg-type]


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


# ----------------------------------------------------------------------------------------------
# every strategy: known answers, shapes, edge cases
# ----------------------------------------------------------------------------------------------

from loop.model.prediction import _parse_augmentation, _unflip  # noqa: E402  (pure helpers, no ultralytics)
from loop.uncertainty import (  # noqa: E402
    NEEDS,
    ScoringInputs,
    bernoulli_js,
    box_committee,
    box_least_confidence,
    box_margin,
    box_stability,
    class_rarity,
    score_inputs,
)


def det(boxes, probs, wh=(100, 100)):
    """Detections with pixel ``boxes`` (n, 4) and class scores ``probs`` (n, C)."""
    probs = np.asarray(probs, dtype=float)
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    n = len(boxes)
    cls = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
    conf = probs.max(axis=1) if n else np.zeros(0)
    return Detections(boxes, cls, wh, confidence=conf, class_probs=probs.reshape(n, -1))


RNG = np.random.default_rng


def test_registry_lists_every_strategy_with_its_needs():
    expected = {
        "entropy",
        "least_confidence",
        "margin",
        "localization_stability",
        "committee",
        "class_balance",
        "random",
    }
    assert expected <= set(STRATEGIES)
    assert NEEDS["random"] == frozenset()
    assert NEEDS["localization_stability"] == {"predictions", "tta"}
    assert NEEDS["committee"] == {"predictions", "committee"}
    assert NEEDS["class_balance"] == {"predictions", "class_counts"}


def test_least_confidence_known_values():
    assert box_least_confidence([[0.9, 0.2], [0.3, 0.1]]).tolist() == pytest.approx([0.1, 0.7])
    a = image([[0.9, 0.0, 0.0]])
    b = image([[0.3, 0.1, 0.0], [0.95, 0.0, 0.0]])
    s = score_images("least_confidence", [a, b], rng=RNG(0))
    assert s.tolist() == pytest.approx([0.1, 0.7])
    s_mean = score_images("least_confidence", [a, b], reduction="mean", rng=RNG(0))
    assert s_mean.tolist() == pytest.approx([0.1, (0.7 + 0.05) / 2])


def test_margin_known_values_many_classes_and_one_class():
    assert box_margin([[0.6, 0.5, 0.1], [0.9, 0.1, 0.0]]).tolist() == pytest.approx([0.9, 0.2])
    # One class: the runner-up is "not this class" (1 - p), so p = 0.5 is the least sure.
    assert box_margin([[0.5], [0.0], [1.0], [0.75]]).tolist() == pytest.approx([1, 0, 0, 0.5])
    one = det([[0, 0, 5, 5]], [[0.5]])
    assert score_images("margin", [one], rng=RNG(0)).tolist() == pytest.approx([1.0])


def test_entropy_one_class_image():
    one = det([[0, 0, 5, 5], [1, 1, 4, 4]], [[0.5], [0.99]])
    s = score_images("entropy", [one], reduction="sum", rng=RNG(0))
    assert s[0] == pytest.approx(math.log(2) + float(binary_entropy(0.99)))


@pytest.mark.parametrize(
    "name", ["entropy", "least_confidence", "margin", "class_balance", "committee"]
)
def test_every_strategy_gives_empty_images_the_explicit_score(name):
    empty = Detections.empty((50, 40), num_classes=3)
    full = image([[0.5, 0.2, 0.1]])
    inputs = ScoringInputs(
        [empty, full],
        views=[[empty], [full]],
        labeled_class_counts=np.array([1.0, 2.0, 3.0]),
    )
    s = score_inputs(name, inputs, rng=RNG(0), empty_score=-1.5)
    assert s.shape == (2,) and s.dtype == np.float64
    assert s[0] == -1.5 and s[1] != -1.5


def test_localization_stability_known_values():
    ref = det([[0, 0, 10, 10], [50, 50, 60, 60]], [[0.8, 0.0], [0.4, 0.0]])
    same = det([[0, 0, 10, 10], [50, 50, 60, 60]], [[0.7, 0.0], [0.3, 0.0]])
    shifted = det([[0, 0, 10, 10], [55, 50, 65, 60]], [[0.7, 0.0], [0.3, 0.0]])  # IoU 1/3
    nothing = Detections.empty((100, 100), num_classes=2)
    assert box_stability(ref, [same]).tolist() == pytest.approx([1.0, 1.0])
    assert box_stability(ref, [same, shifted]).tolist() == pytest.approx([1.0, (1 + 1 / 3) / 2])
    assert box_stability(ref, [nothing]).tolist() == [0.0, 0.0]
    s = score_images("localization_stability", [ref], views=[[shifted]], rng=RNG(0))
    # per box conf * (1 - stability): 0.8 * 0 and 0.4 * (2/3); max
    assert s[0] == pytest.approx(0.4 * 2 / 3)
    stable = score_images("localization_stability", [ref], views=[[same]], rng=RNG(0))
    assert stable[0] == 0.0


def test_localization_stability_needs_views_in_the_images_coordinates():
    ref = det([[0, 0, 10, 10]], [[0.8]])
    with pytest.raises(StrategyError, match="views"):
        score_images("localization_stability", [ref], rng=RNG(0))
    with pytest.raises(StrategyError, match="at least one augmented view"):
        score_images("localization_stability", [ref], views=[[]], rng=RNG(0))
    other_size = det([[0, 0, 10, 10]], [[0.8]], wh=(50, 50))
    with pytest.raises(StrategyError, match="map augmented boxes back"):
        score_images("localization_stability", [ref], views=[[other_size]], rng=RNG(0))


def test_tta_flip_maps_boxes_back_to_the_original_pixels():
    flipped = det([[10, 20, 30, 50]], [[0.9]], wh=(100, 80))
    h = _unflip(flipped, "hflip")
    assert h.xyxy.tolist() == [[70, 20, 90, 50]]
    v = _unflip(flipped, "vflip")
    assert v.xyxy.tolist() == [[10, 30, 30, 60]]
    assert _unflip(h, "hflip").same_boxes(flipped)
    assert _parse_augmentation("scale:0.75", 256) == (None, 192)
    assert _parse_augmentation("hflip", 256) == ("hflip", 256)
    from loop.errors import ModelError

    assert _parse_augmentation("scale:0.75", 64) == (None, 32)
    assert _parse_augmentation("scale:1.1", 64) == (None, 96)
    for bad in ("scale:1", "scale:x", "rotate", "scale:10"):
        with pytest.raises(ModelError):
            _parse_augmentation(bad, 256)


def test_bernoulli_js_known_values():
    agree = np.array([[[0.3, 0.9]], [[0.3, 0.9]]])
    assert bernoulli_js(agree).tolist() == pytest.approx([0.0])
    split = np.array([[[1.0]], [[0.0]]])  # certain, opposite: H(0.5) - 0 = ln 2
    assert bernoulli_js(split)[0] == pytest.approx(math.log(2), abs=1e-9)
    with pytest.raises(StrategyError, match="NaN"):
        bernoulli_js(np.full((2, 1, 1), np.nan))


def test_committee_known_values_and_matching():
    ref = det([[0, 0, 10, 10], [50, 50, 60, 60]], [[1.0, 0.0], [0.0, 1.0]])
    agrees = det([[0, 0, 10, 10], [50, 50, 60, 60]], [[1.0, 0.0], [0.0, 1.0]])
    misses_second = det([[0, 0, 10, 10]], [[1.0, 0.0]])  # sees nothing at box 2
    assert box_committee(ref, [agrees]).tolist() == pytest.approx([0.0, 0.0])
    d = box_committee(ref, [misses_second])
    assert d[0] == pytest.approx(0.0, abs=1e-9) and d[1] == pytest.approx(math.log(2), abs=1e-9)
    s = score_images("committee", [ref, ref], views=[[agrees], [misses_second]], rng=RNG(0))
    assert s[0] == pytest.approx(0.0, abs=1e-9) and s[1] == pytest.approx(math.log(2), abs=1e-9)
    with pytest.raises(StrategyError, match="at least one other checkpoint"):
        score_images("committee", [ref], views=[[]], rng=RNG(0))
    three = det([[0, 0, 10, 10]], [[0.2, 0.2, 0.2]])
    with pytest.raises(StrategyError, match="3 classes"):
        box_committee(three, [agrees])


def test_class_balance_favours_rare_classes():
    assert class_rarity([9, 0, 4]).tolist() == pytest.approx([0.1, 1.0, 0.2])
    common = det([[0, 0, 5, 5]], [[0.9, 0.0, 0.0]])
    rare = det([[0, 0, 5, 5]], [[0.0, 0.9, 0.0]])
    s = score_images("class_balance", [common, rare], labeled_class_counts=[9, 0, 4], rng=RNG(0))
    assert s.tolist() == pytest.approx([0.09, 0.9])
    with pytest.raises(StrategyError, match="labeled_class_counts"):
        score_images("class_balance", [common], rng=RNG(0))
    with pytest.raises(StrategyError, match="3 classes but labeled_class_counts has 2"):
        score_images("class_balance", [common], labeled_class_counts=[1, 2], rng=RNG(0))
    with pytest.raises(StrategyError, match="NaN"):
        score_images("class_balance", [common], labeled_class_counts=[1, np.nan, 2], rng=RNG(0))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_handles_zero_images(name):
    inputs = ScoringInputs([], views=[], labeled_class_counts=np.ones(3))
    assert score_inputs(name, inputs, rng=RNG(0)).shape == (0,)


def test_scoring_inputs_validate_shapes_and_nan():
    a = image([[0.5, 0.1, 0.1]])
    with pytest.raises(StrategyError, match="views for 2"):
        ScoringInputs([a], views=[[a], [a]])
    with pytest.raises(StrategyError, match=r"shape \(1, d\)"):
        ScoringInputs([a], embeddings=np.zeros((2, 4)))
    with pytest.raises(StrategyError, match="NaN"):
        ScoringInputs([a], embeddings=np.array([[np.nan, 1.0]]))
    with pytest.raises(StrategyError, match=">= 0"):
        ScoringInputs([a], labeled_class_counts=[-1, 2, 3])


@pytest.mark.parametrize(
    "fn", [box_entropy, box_least_confidence, box_margin], ids=lambda f: f.__name__
)
def test_box_measures_reject_nan_and_wrong_shapes(fn):
    with pytest.raises(StrategyError, match="NaN"):
        fn([[0.2, np.nan]])
    with pytest.raises(StrategyError, match="2-D"):
        fn([0.2, 0.3])


def test_reduce_boxes_rejects_nan_and_empty_score_must_be_finite():
    with pytest.raises(StrategyError, match="NaN"):
        reduce_boxes([0.1, np.nan], "max")
    with pytest.raises(StrategyError, match="empty_score"):
        score_images("entropy", [image(np.zeros((0, 3)))], rng=RNG(0), empty_score=np.nan)


def test_single_model_strategies_ignore_extra_inputs():
    a = image([[0.5, 0.1, 0.1]])
    plain = score_images("entropy", [a], rng=RNG(0))
    extra = score_images("entropy", [a], rng=RNG(0), embeddings=np.ones((1, 4)))
    assert plain.tolist() == extra.tolist()


# ----------------------------------------------------------------------------------------------
# class difficulty and difficulty-calibrated entropy
# ----------------------------------------------------------------------------------------------

from loop.uncertainty import class_difficulty  # noqa: E402


@pytest.mark.parametrize(
    ("ap", "n", "prior", "expected"),
    [
        # No prior: 1 - AP, floored.
        ([0.9, 0.2, 1.0], [10, 10, 10], 0.0, [0.1, 0.8, 0.05]),
        # Prior of 10 boxes: mean AP 0.5 (box-weighted); a class seen on 10 boxes moves halfway.
        ([0.9, 0.1], [10, 10], 10.0, [1 - 0.7, 1 - 0.3]),
        # A class without validation boxes gets the mean of the others.
        ([0.8, 0.0], [5, 0], 10.0, [1 - (5 * 0.8 + 10 * 0.8) / 15, 1 - 0.8]),
        # Nothing measured at all: every class is maximally hard.
        ([0.0, 0.0], [0, 0], 10.0, [1.0, 1.0]),
    ],
)
def test_class_difficulty_known_answers(ap, n, prior, expected):
    assert class_difficulty(ap, n, prior_boxes=prior).tolist() == pytest.approx(expected)


def test_class_difficulty_refuses_bad_input():
    with pytest.raises(StrategyError, match="AP50"):
        class_difficulty([1.5, 0.2], [1, 1])
    with pytest.raises(StrategyError, match=r"\(C,\)"):
        class_difficulty([0.5], [1, 2])
    with pytest.raises(StrategyError, match=">= 0"):
        class_difficulty([0.5, 0.5], [-1, 2])


def test_calibrated_entropy_weighs_doubt_about_hard_classes_more():
    easy = det([[0, 0, 5, 5]], [[0.5, 0.0, 0.0]])  # most doubt, class 0 (easy)
    hard = det([[0, 0, 5, 5]], [[0.0, 0.2, 0.0]])  # less doubt, class 1 (hard)
    difficulty = np.array([0.1, 0.9, 0.5])
    plain = score_images("entropy", [easy, hard], rng=RNG(0))
    calibrated = score_images(
        "calibrated_entropy", [easy, hard], rng=RNG(0), class_difficulty=difficulty
    )
    assert plain[0] > plain[1]
    assert calibrated.tolist() == pytest.approx([plain[0] * 0.1, plain[1] * 0.9])
    assert calibrated[1] > calibrated[0]
    assert NEEDS["calibrated_entropy"] == {"predictions", "class_difficulty"}


def test_calibrated_entropy_needs_difficulty_for_every_class():
    a = det([[0, 0, 5, 5]], [[0.5, 0.1, 0.1]])
    with pytest.raises(StrategyError, match="class_difficulty"):
        score_images("calibrated_entropy", [a], rng=RNG(0))
    with pytest.raises(StrategyError, match="3 classes but class_difficulty has 2"):
        score_images("calibrated_entropy", [a], rng=RNG(0), class_difficulty=[0.5, 0.5])
    with pytest.raises(StrategyError, match=r"\(0, 1\]"):
        ScoringInputs([a], class_difficulty=np.array([0.0, 0.5, 0.5]))
