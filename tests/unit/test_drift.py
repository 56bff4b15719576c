"""The drift statistics (`loop.drift`): known answers worked out by hand, exact null
distributions checked by enumeration, calibration under the null and power under a shift."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from loop.drift import (
    IMAGE_STATS,
    FeatureSet,
    TestResult,
    bonferroni,
    category_test,
    chi2_statistic,
    exceedance_pvalue,
    exceedance_test,
    exceedance_threshold,
    image_stats,
    ks_test,
    l2_normalize,
    median_bandwidth,
    mmd2_biased,
    mmd_test,
    nearest_distance,
    pairwise_sq_dists,
    part_normalize,
    part_scales,
    pca_project,
    proportion_test,
)
from loop.errors import DriftError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------- MMD
def test_mmd_of_two_points_is_two_minus_twice_the_kernel():
    # x = 0, y = 1, sigma = 1: K = [[1, e^-1/2], [e^-1/2, 1]], MMD² = 1 + 1 - 2 e^-1/2.
    res = mmd_test([[0.0]], [[1.0]], rng(), permutations=99, bandwidth=1.0)
    assert res.statistic == pytest.approx(2 - 2 * math.exp(-0.5), abs=1e-12)
    # Both relabellings of two points give the same MMD: every permutation ties, p = 1.
    assert res.p_value == 1.0


def test_mmd2_biased_matches_the_three_means():
    r = rng(3)
    z = r.normal(size=(7, 3))
    k = np.exp(-pairwise_sq_dists(z) / 2.0)
    in_x = np.array([1, 1, 0, 1, 0, 0, 0], dtype=bool)
    x, y = k[np.ix_(in_x, in_x)], k[np.ix_(~in_x, ~in_x)]
    xy = k[np.ix_(in_x, ~in_x)]
    assert mmd2_biased(k, in_x) == pytest.approx(x.mean() + y.mean() - 2 * xy.mean(), abs=1e-12)


def test_median_bandwidth_is_the_median_distance():
    z = np.array([[0.0], [1.0], [3.0]])  # distances 1, 3, 2 -> median 2
    assert median_bandwidth(pairwise_sq_dists(z)) == pytest.approx(2.0)
    assert median_bandwidth(pairwise_sq_dists(np.zeros((4, 2)))) == 0.0


def test_mmd_of_identical_points_is_zero_with_p_one():
    res = mmd_test(np.ones((5, 2)), np.ones((6, 2)), rng(), permutations=50)
    assert res.statistic == 0.0 and res.p_value == 1.0


def test_mmd_finds_a_shift_at_the_smallest_p_the_permutations_allow():
    r = rng(1)
    res = mmd_test(r.normal(size=(50, 5)) + 1.5, r.normal(size=(60, 5)), rng(2), permutations=199)
    assert res.p_value == pytest.approx(1 / 200)


def test_mmd_p_value_is_seeded():
    r = rng(4)
    x, y = r.normal(size=(20, 3)), r.normal(size=(25, 3)) + 0.3
    a = mmd_test(x, y, rng(9), permutations=99).p_value
    assert a == mmd_test(x, y, rng(9), permutations=99).p_value


@pytest.mark.parametrize(
    "make",
    [
        lambda r: mmd_test(r.normal(size=(15, 2)), r.normal(size=(20, 2)), r, permutations=99),
        lambda r: ks_test(r.normal(size=15), r.normal(size=20)),
        lambda r: category_test(r.integers(0, 3, 15), r.integers(0, 3, 20), 3, r, 99),
        lambda r: exceedance_test(r.random(15), r.random(40), 0.9),
    ],
    ids=["mmd", "ks", "categories", "exceedance"],
)
def test_false_alarms_stay_at_alpha_under_the_null(make):
    """300 null draws at alpha = 0.1: a valid test rejects at most ~10 % (99.9 % bound 17 %)."""
    r = rng(12345)
    rejected = sum(make(r).p_value <= 0.1 for _ in range(300))
    assert rejected / 300 <= 0.17


# ------------------------------------------------------------------------------- 1-d tests
def test_ks_of_separated_samples_is_exact():
    # n = m = 3, fully separated: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1.
    res = ks_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert res.statistic == 1.0 and res.p_value == pytest.approx(0.1)
    assert res.window == 2.0 and res.reference == 5.0


@pytest.mark.parametrize(
    ("table", "expected"),
    [([[10, 0], [0, 10]], 20.0), ([[5, 5], [5, 5]], 0.0), ([[3, 0, 1], [1, 0, 3]], 2.0)],
)
def test_chi2_statistic_known_answers(table, expected):
    assert chi2_statistic(table) == pytest.approx(expected)


def test_chi2_statistic_agrees_with_scipy_without_correction():
    t = np.array([[12, 5, 9, 0], [7, 14, 3, 0]])
    ref = chi2_contingency(t[:, :3], correction=False).statistic
    assert chi2_statistic(t) == pytest.approx(ref)


def test_category_test_of_disjoint_categories():
    res = category_test([0] * 10, [1] * 10, 2, rng(1), permutations=499)
    assert res.statistic == pytest.approx(20.0)
    # Only 2 of C(20, 10) = 184756 relabellings separate the samples as well.
    assert res.p_value == pytest.approx(1 / 500)
    same = category_test([0, 1, 1, 2], [0, 1, 1, 2], 3, rng(), permutations=99)
    assert same.statistic == 0.0 and same.p_value == 1.0


def test_category_test_refuses_out_of_range_categories():
    with pytest.raises(DriftError, match="categories must lie"):
        category_test([0, 3], [0, 1], 3, rng())


def test_fisher_tea_tasting():
    # Fisher's lady tasting tea: [[3, 1], [1, 3]], two-sided p = 34 / 70.
    res = proportion_test(3, 4, 1, 4)
    assert res.p_value == pytest.approx(34 / 70)
    assert (res.window, res.reference) == (0.75, 0.25)


# ------------------------------------------------------------------------------ novelty
def test_exceedance_threshold_is_the_jth_largest():
    ref = np.arange(1.0, 101.0)
    assert exceedance_threshold(ref, 0.99) == (100.0, 1)
    assert exceedance_threshold(ref, 0.95) == (96.0, 5)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_exceedance_with_one_reference_value_is_uniform(n):
    # X = window values above the single reference value: uniform on 0..n.
    for x in range(n + 1):
        assert exceedance_pvalue(x, n, 1, 1) == pytest.approx((n - x + 1) / (n + 1))


@pytest.mark.parametrize(("n", "m", "j"), [(3, 4, 2), (4, 3, 1), (2, 5, 3)])
def test_exceedance_tail_matches_enumeration(n, m, j):
    """Every arrangement of n window and m reference ranks is equally likely under the null."""
    counts = np.zeros(n + 1)
    for window_ranks in itertools.combinations(range(n + m), n):
        order = ["w" if i in window_ranks else "r" for i in range(n + m)]  # descending values
        refs_seen = x = 0
        for item in order:
            if item == "r":
                refs_seen += 1
                if refs_seen == j:
                    break
            else:
                x += 1
        counts[x] += 1
    probs = counts / counts.sum()
    for x in range(n + 1):
        assert exceedance_pvalue(x, n, m, j) == pytest.approx(probs[x:].sum())


def test_exceedance_test_counts_values_above_the_threshold():
    # 101 values 0, 0.01, ..., 1; q = 0.95: j = ceil(0.05 * 101) = 6, threshold 0.95.
    ref = np.linspace(0.0, 1.0, 101)
    assert exceedance_threshold(ref, 0.95) == (pytest.approx(0.95), 6)
    res = exceedance_test([0.1, 0.2, 0.97, 0.99, 1.5], ref, 0.95)
    assert res.window == pytest.approx(3 / 5)
    assert res.reference == pytest.approx(5 / 101)
    assert res.p_value == pytest.approx(exceedance_pvalue(3, 5, 101, 6))
    assert exceedance_test([0.1, 0.2], ref, 0.95).p_value == 1.0


# ------------------------------------------------------------------------------ decision
def test_bonferroni_divides_alpha_by_the_number_of_tests():
    tests = [TestResult("a", 0, 0.004), TestResult("b", 0, 0.006), TestResult("c", 0, 0.5)]
    d = bonferroni(tests, 0.015)
    assert d.threshold == pytest.approx(0.005) and d.fired == ("a",) and d.alert
    assert not bonferroni(tests, 0.01).alert
    with pytest.raises(DriftError):
        bonferroni(tests, 1.5)


# ------------------------------------------------------------------------------ embeddings
def test_nearest_distance_cosine_and_euclidean():
    nb = np.array([[1.0, 0.0], [0.0, 2.0]])
    q = np.array([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    d = nearest_distance(q, nb, metric="cosine")
    assert d == pytest.approx([0.0, 1 - 1 / math.sqrt(2), 1.0])
    assert nearest_distance([[-1.0, 0.0]], [[1.0, 0.0]], metric="cosine") == pytest.approx([2.0])
    # Euclidean: (3, 0) -> (1, 0) is 2; (1, 1) -> 1 from both; (-1, 0) -> (1, 0) is 2.
    assert nearest_distance(q, nb) == pytest.approx([2.0, 1.0, 2.0])
    with pytest.raises(DriftError, match="metric"):
        nearest_distance(q, nb, metric="manhattan")


def test_part_scales_and_normalize_weigh_parts_alike():
    # part 1 (2 dims) spreads 10x more than part 2 (1 dim)
    x = np.array([[10.0, 0.0, 1.0], [-10.0, 0.0, -1.0], [0.0, 10.0, 1.0], [0.0, -10.0, -1.0]])
    center, scales = part_scales(x, [2, 1])
    assert center == pytest.approx([0.0, 0.0, 0.0]) and scales == pytest.approx([10.0, 1.0])
    z = part_normalize(x, center, scales, [2, 1])
    assert z == pytest.approx(
        np.array([[1, 0, 1], [-1, 0, -1], [0, 1, 1], [0, -1, -1]]) / math.sqrt(2)
    )
    assert np.sqrt((z**2).sum(axis=1).mean()) == pytest.approx(1.0)
    # Magnitude is kept: twice as far from the centre, twice the length.
    far = part_normalize([[20.0, 0.0, 2.0]], center, scales, [2, 1])
    assert np.linalg.norm(far) == pytest.approx(2 * np.linalg.norm(z[0]))
    assert part_scales(np.ones((3, 2)), [2])[1] == pytest.approx([1.0])  # constant: scale 1
    with pytest.raises(DriftError, match="do not split"):
        part_scales(x, [2, 2])


def test_pca_project_keeps_the_main_axis():
    r = rng(5)
    t = r.normal(size=200)
    z = np.column_stack([3 * t, 3 * t, 0.01 * r.normal(size=200)])
    p = pca_project(z, 1)
    assert p.shape == (200, 1)
    assert abs(np.corrcoef(p[:, 0], t)[0, 1]) > 0.999
    assert l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(
        np.array([[0.6, 0.8], [0.0, 0.0]])
    )


# ------------------------------------------------------------------------------ images
def test_image_stats_of_a_flat_image():
    assert image_stats(np.full((20, 30), 77.0)) == pytest.approx([77.0, 0.0, 0.0, 0.0])


def test_image_stats_of_a_ramp_have_no_edges_and_no_noise():
    ramp = np.tile(np.arange(40.0), (30, 1)) * 2 + np.arange(30.0)[:, None]
    s = image_stats(ramp)
    assert s[2] == pytest.approx(0.0, abs=1e-9) and s[3] == pytest.approx(0.0, abs=1e-9)


def test_image_stats_estimate_gaussian_noise():
    g = 128.0 + rng(7).normal(0.0, 10.0, size=(256, 256))
    brightness, contrast, sharpness, noise = image_stats(g)
    assert noise == pytest.approx(10.0, rel=0.03)
    assert contrast == pytest.approx(10.0, rel=0.03) and brightness == pytest.approx(128, abs=0.2)
    # Blurring (a 3 x 3 box mean) lowers the Laplacian energy; a shift moves only brightness.
    from scipy.ndimage import uniform_filter

    assert image_stats(uniform_filter(g, 3))[2] < sharpness - 0.5
    shifted = image_stats(g + 20.0)
    assert shifted[0] == pytest.approx(brightness + 20.0)
    assert shifted[1:] == pytest.approx([contrast, sharpness, noise])


@pytest.mark.parametrize("bad", [np.zeros((2, 9)), np.zeros(9), np.full((4, 4), np.nan)])
def test_image_stats_refuses_unusable_images(bad):
    with pytest.raises(DriftError):
        image_stats(bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ks_test([], [1.0]),
        lambda: ks_test([np.nan], [1.0]),
        lambda: mmd_test(np.zeros((2, 2)), np.zeros((2, 3)), rng()),
        lambda: mmd_test(np.zeros((2, 2)), np.zeros((2, 2)), np.random.RandomState(0)),  # type: ignore[arg-type]
        lambda: proportion_test(5, 4, 1, 4),
        lambda: exceedance_threshold([1.0], 1.0),
    ],
)
def test_bad_input_raises_drift_error(call):
    with pytest.raises(DriftError):
        call()


# ------------------------------------------------------------------------------ feature sets
def features(n: int, seed: int = 0, d: int = 4, c: int = 3) -> FeatureSet:
    r = rng(seed)
    return FeatureSet(
        tuple(f"{seed:02d}{i:062d}" for i in range(n)),
        r.normal(size=(n, d)).astype(np.float32),
        r.normal(size=(n, len(IMAGE_STATS))),
        r.random(n),
        r.random(n),
        r.integers(-1, c, n),
        r.integers(0, 3, (n, c)),
    )


def test_feature_set_round_trip_subset_and_concat():
    fs = features(5)
    back = FeatureSet.from_arrays(fs.arrays("ref_"), "ref_")
    assert back.sha256 == fs.sha256
    for name in ("embedding", "stats", "max_conf", "uncertainty", "top_class", "class_counts"):
        assert np.array_equal(getattr(back, name), getattr(fs, name)), name
    sub = fs.subset([3, 1])
    assert sub.sha256 == (fs.sha256[3], fs.sha256[1]) and np.array_equal(
        sub.stats, fs.stats[[3, 1]]
    )
    both = FeatureSet.concat([fs, features(2, seed=1)])
    assert len(both) == 7 and both.n_classes == 3


def test_feature_set_refuses_mismatched_rows():
    fs = features(3)
    with pytest.raises(DriftError, match="max_conf"):
        FeatureSet(
            fs.sha256,
            fs.embedding,
            fs.stats,
            fs.max_conf[:2],
            fs.uncertainty,
            fs.top_class,
            fs.class_counts,
        )
