"""`loop.evaluation`: Ultralytics' metrics from per-image match statistics, the bootstrap over
test images, the paired gate and the advice helpers: known answers on hand-made statistics,
and equality with Ultralytics' own ``ap_per_class`` on random ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loop.errors import EvaluationError
from loop.evaluation import (
    BootstrapSettings,
    ImageMatches,
    Interval,
    all_background,
    bootstrap,
    box_metrics,
    hidden_classes,
    paired_bootstrap,
    paired_gate,
    resample_counts,
    split_health,
)

ALL = np.ones(10, dtype=bool)
NONE = np.zeros(10, dtype=bool)


def img(key: str, preds: list[tuple[float, int, np.ndarray]], targets: list[int]) -> tuple:
    """One image: ``preds`` = (conf, class, tp flags at the 10 IoUs), ``targets`` = classes."""
    tp = np.array([p[2] for p in preds], dtype=bool).reshape(-1, 10)
    conf = np.array([p[0] for p in preds], dtype=np.float32)
    cls = np.array([p[1] for p in preds], dtype=np.float32)
    return key, tp, conf, cls, np.array(targets, dtype=np.float32)


def flags(n_true: int) -> np.ndarray:
    """True positive at the first ``n_true`` IoU thresholds (0.50, 0.55, ...)."""
    return np.arange(10) < n_true


def random_images(n: int, nc: int, max_preds: int, seed: int, skill: float = 0.8) -> list[tuple]:
    """Realistic statistics: every true box is matched by at most one prediction (of its class,
    up to a random IoU), the other predictions are false positives of any class."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        targets = rng.integers(0, nc, rng.integers(0, 4))
        p = int(rng.integers(len(targets), max_preds + len(targets) + 1))
        conf = rng.random(p).astype(np.float32) * 0.5
        cls = rng.integers(0, nc, p)
        tp = np.zeros((p, 10), dtype=bool)
        free = list(rng.permutation(p))
        for t in targets:
            if rng.random() < skill:
                j = free.pop()
                cls[j] = t
                conf[j] = np.float32(0.5 + 0.5 * rng.random())
                tp[j] = flags(int(rng.integers(1, 11)))
        out.append((f"im{i:04d}", tp, conf, cls.astype(np.float32), targets.astype(np.float32)))
    return out


def matches(images: list[tuple], nc: int) -> ImageMatches:
    return ImageMatches.from_images(images, nc)


# ------------------------------------------------------------------ known answers

# Image a: one true box found (conf 0.9, all IoUs); image b: one true box missed and a false
# alarm (conf 0.8). Together: recall 1/2 at precision 1, then precision 1/2. On Ultralytics'
# 101-point grid AP = 0.49 + 0.005 = 0.495. Drawing a twice gives a perfect set (AP 0.995:
# Ultralytics' grid point at recall 1.0 reads the sentinel 0), b twice nothing (AP 0).
A = img("a", [(0.9, 0, ALL)], [0])
B = img("b", [(0.8, 0, NONE)], [0])


@pytest.mark.parametrize(
    ("images", "map50", "map50_95", "precision", "recall"),
    [
        ([A, B], 0.495, 0.495, None, None),
        ([A, img("a2", [(0.7, 0, ALL)], [0])], 0.995, 0.995, 1.0, 1.0),  # perfect detector
        ([B, img("b2", [], [0])], 0.0, 0.0, 0.0, 0.0),  # nothing found
        # Found at IoU 0.50..0.70 only (5 of 10 thresholds): mAP50-95 is half of mAP50.
        (
            [img("h", [(0.9, 0, flags(5))], [0]), img("h2", [(0.6, 0, flags(5))], [0])],
            0.995,
            0.4975,
            1.0,
            1.0,
        ),
        # No true boxes at all: every metric is 0 (Ultralytics' convention), not NaN.
        ([img("e", [(0.9, 0, NONE)], [])], 0.0, 0.0, 0.0, 0.0),
    ],
)
def test_box_metrics_known_answers(images, map50, map50_95, precision, recall) -> None:
    m = box_metrics(matches(images, 1))
    assert m.map50 == pytest.approx(map50, abs=1e-12)
    assert m.map50_95 == pytest.approx(map50_95, abs=1e-12)
    if precision is not None:
        assert m.precision == pytest.approx(precision, abs=1e-12)
        assert m.recall == pytest.approx(recall, abs=1e-12)


def test_classes_without_true_boxes_are_nan_and_left_out_of_the_mean() -> None:
    # class 0: perfect (0.995); class 1: has a true box, found nothing (0); class 2: no true box.
    m = box_metrics(
        matches(
            [img("x", [(0.9, 0, ALL), (0.5, 2, NONE)], [0, 1]), img("y", [(0.8, 0, ALL)], [0])], 3
        )
    )
    assert m.ap50[0] == pytest.approx(0.995) and m.ap50[1] == 0.0 and np.isnan(m.ap50[2])
    assert m.map50 == pytest.approx((0.995 + 0.0) / 2)
    assert m.n_targets.tolist() == [2.0, 1.0, 0.0]


def test_bootstrap_known_distribution() -> None:
    # Two images: replicates are {a,a} (AP 0.995, p=1/4), {a,b} (0.495, 1/2), {b,b} (0, 1/4).
    m = matches([A, B], 1)
    wide = bootstrap(m, ["x"], BootstrapSettings(resamples=2000, confidence=0.95, seed=3))
    assert (wide.map50.value, wide.map50.lo, wide.map50.hi) == pytest.approx((0.495, 0.0, 0.995))
    assert wide.per_class_ap50["x"].lo == pytest.approx(0.0)
    # The central 40% lies inside the middle outcome.
    narrow = bootstrap(m, ["x"], BootstrapSettings(resamples=2000, confidence=0.4, seed=3))
    assert (narrow.map50.lo, narrow.map50.hi) == pytest.approx((0.495, 0.495))
    assert wide.n_images == 2 and wide.n_targets == {"x": 2}


def test_resample_counts_are_seeded_multinomial_draws() -> None:
    c = resample_counts(7, 500, seed=1)
    assert c.shape == (500, 7) and (c.sum(axis=1) == 7).all() and (c >= 0).all()
    assert np.array_equal(c, resample_counts(7, 500, seed=1))
    assert not np.array_equal(c, resample_counts(7, 500, seed=2))
    assert c.mean() == pytest.approx(1.0)


def test_a_replicate_is_the_metric_of_the_resampled_image_set() -> None:
    # Resampling by multiplicity equals building the multiset explicitly (pure, no Ultralytics).
    images = random_images(25, 3, 12, seed=4)
    m = matches(images, 3)
    for counts in resample_counts(25, 5, seed=9):
        explicit = [
            (f"{k}#{j}", *rest)
            for (k, *rest), c in zip(images, counts, strict=True)
            for j in range(int(c))
        ]
        a, b = box_metrics(m, counts), box_metrics(matches(explicit, 3))
        for f in ("map50", "map50_95", "precision", "recall"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), abs=1e-12), f
        np.testing.assert_allclose(a.ap50_95, b.ap50_95, atol=1e-12)


# ------------------------------------------------------------------ against Ultralytics


@pytest.fixture(scope="module")
def ultralytics_metrics(tmp_path_factory: pytest.TempPathFactory):
    from loop import model

    model.prepare_ultralytics(tmp_path_factory.mktemp("ycd"))
    return model.ultralytics_box_metrics


def _concat(images: list[tuple], idx: np.ndarray) -> tuple[np.ndarray, ...]:
    sel = [images[i] for i in idx]
    return tuple(np.concatenate([s[k] for s in sel]) for k in range(1, 5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_and_replicates_equal_ultralytics_ap_per_class(ultralytics_metrics, seed) -> None:
    images = random_images(40, 4, 30, seed=seed)
    m = matches(images, 4)
    ref = ultralytics_metrics(*_concat(images, np.arange(40)))
    ours = box_metrics(m)
    for f in ("map50", "map50_95", "precision", "recall"):
        assert getattr(ours, f) == pytest.approx(ref[f], abs=1e-12), f
    counts = resample_counts(40, 4, seed=seed)
    rng = np.random.default_rng(seed)
    for c in counts:
        idx = np.repeat(np.arange(40), c)
        rng.shuffle(idx)  # the order images come in does not matter
        ref = ultralytics_metrics(*_concat(images, idx))
        ours = box_metrics(m, c)
        for f in ("map50", "map50_95", "precision", "recall"):
            assert getattr(ours, f) == pytest.approx(ref[f], abs=1e-12), f


# ------------------------------------------------------------------ interval width


def test_interval_shrinks_as_test_images_grow() -> None:
    images = random_images(400, 3, 10, seed=5, skill=0.6)
    m = matches(images, 3)
    widths = []
    for n in (30, 100, 300):
        iv = bootstrap(m.take(np.arange(n)), ["a", "b", "c"], BootstrapSettings(400, 0.95, 0))
        assert iv.map50.lo <= iv.map50.value <= iv.map50.hi
        widths.append(iv.map50.halfwidth)
    assert widths[0] > widths[1] > widths[2] > 0
    # Roughly 1/sqrt(n): 10x the images, about a third of the width.
    assert 2.0 < widths[0] / widths[2] < 5.0


# ------------------------------------------------------------------ paired gate


def _detector(n: int, found: float, seed: int, nc: int = 2) -> list[tuple]:
    """n images with one true box each (class i % nc); the detector finds a box with
    probability ``found`` (decided per image by a shared seed, so better detectors find a
    superset) and adds one low-confidence false alarm per image."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    conf = rng.random(n).astype(np.float32)
    out = []
    for i in range(n):
        preds = [(0.5 + 0.5 * float(conf[i]), i % nc, ALL)] if u[i] < found else []
        preds.append((0.3 * float(conf[i]), (i + 1) % nc, NONE))
        out.append(img(f"im{i:03d}", preds, [i % nc]))
    return out


SETTINGS = BootstrapSettings(resamples=500, confidence=0.95, seed=0)


@pytest.mark.parametrize(
    ("cand_found", "champ_found", "tolerance", "max_drop", "verdict", "promoted"),
    [
        (0.9, 0.5, 0.0, 0.05, "improvement", True),
        (0.5, 0.9, 0.0, 0.05, "worse", False),
        (0.5, 0.9, 0.0, 1.0, "worse", False),  # the overall rule alone refuses it
        (0.5, 0.9, 0.7, 1.0, "worse", True),  # a huge tolerance accepts even a worse model
        (0.5, 0.9, 0.7, 0.05, "worse", False),  # ... unless classes drop significantly
        (0.7, 0.7, 0.0, 0.05, "noise", True),  # identical statistics: difference exactly 0
    ],
)
def test_paired_gate_verdicts(cand_found, champ_found, tolerance, max_drop, verdict, promoted):
    cand = matches(_detector(80, cand_found, seed=1), 2)
    champ = matches(_detector(80, champ_found, seed=1), 2)
    comp = paired_bootstrap(cand, champ, ["a", "b"], SETTINGS)
    g = paired_gate(comp, tolerance, max_drop, "7")
    assert (g.verdict, g.promoted) == (verdict, promoted), g.reason
    assert "champion v7" in g.reason and "500 resamples of 80 test images" in g.reason
    d = comp.difference_map50_95
    assert d.lo <= d.value <= d.hi
    assert g.difference == d


def test_paired_gate_calls_a_small_difference_noise_and_keeps_the_champion() -> None:
    # Two detectors of equal skill that find different boxes (as two training seeds do).
    cand = matches(_detector(40, 0.5, seed=2), 2)
    champ = matches(_detector(40, 0.5, seed=3), 2)
    g = paired_gate(paired_bootstrap(cand, champ, ["a", "b"], SETTINGS), 0.0, 0.05, "1")
    assert g.verdict == "noise" and not g.promoted
    assert g.difference.lo < 0 < g.difference.hi
    assert "within noise" in g.reason and "does not clear -tolerance 0" in g.reason


def test_pairing_is_narrower_than_comparing_two_independent_intervals() -> None:
    cand = matches(_detector(100, 0.8, seed=3), 2)
    champ = matches(_detector(100, 0.7, seed=3), 2)
    comp = paired_bootstrap(cand, champ, ["a", "b"], SETTINGS)
    unpaired = comp.candidate.map50_95.halfwidth + comp.champion.map50_95.halfwidth
    assert comp.difference_map50_95.halfwidth < unpaired


def test_a_significant_class_drop_blocks_an_overall_improvement() -> None:
    # Candidate: class 0 perfect instead of missed (big gain); class 1 loses boxes it found.
    def det(i: int, c0: bool, c1: bool) -> tuple:
        preds = []
        if (i % 2 == 0 and c0) or (i % 2 == 1 and c1):
            preds.append((0.9 - i * 1e-3, i % 2, ALL))
        return img(f"im{i:03d}", preds, [i % 2])

    cand = matches([det(i, True, i % 4 != 1) for i in range(120)], 2)
    champ = matches([det(i, False, True) for i in range(120)], 2)
    comp = paired_bootstrap(cand, champ, ["a", "b"], SETTINGS)
    assert comp.difference_map50_95.lo > 0
    g = paired_gate(comp, 0.0, 0.05, "2")
    assert not g.promoted and set(g.class_drops) == {"b"}
    assert g.class_drops["b"].lo > 0 and "class 'b'" in g.reason
    assert paired_gate(comp, 0.0, 0.9, "2").promoted  # a drop smaller than max_class_drop


def test_paired_bootstrap_aligns_images_by_key_and_refuses_different_sets() -> None:
    images = _detector(30, 0.6, seed=4)
    cand = matches(images, 2)
    shuffled = matches([images[i] for i in np.random.default_rng(0).permutation(30)], 2)
    comp = paired_bootstrap(cand, shuffled, ["a", "b"], SETTINGS)
    assert comp.difference_map50_95 == Interval(0.0, 0.0, 0.0)
    with pytest.raises(EvaluationError, match="different test images"):
        paired_bootstrap(cand, matches(images[:29], 2), ["a", "b"], SETTINGS)


def test_gate_metrics_and_interval_metrics_for_mlflow() -> None:
    cand = matches(_detector(30, 0.8, seed=5), 2)
    champ = matches(_detector(30, 0.6, seed=5), 2)
    comp = paired_bootstrap(cand, champ, ["scratch", "pit hole"], SETTINGS)
    m = comp.metrics("gate_diff")
    assert {"gate_diff_map50_95", "gate_diff_map50_95_lo", "gate_diff_map50_95_hi"} <= set(m)
    assert "gate_diff_ap50_95_pit_hole_lo" in m
    t = comp.candidate.metrics("test")
    assert t["test_map50_lo"] <= t["test_map50"] <= t["test_map50_hi"]
    assert {"test_ap50_scratch_lo", "test_ap50_95_pit_hole_hi", "test_recall_hi"} <= set(t)


# ------------------------------------------------------------------ match statistics


def test_take_select_and_arrays_round_trip() -> None:
    images = random_images(12, 2, 5, seed=6)
    m = matches(images, 2)
    sub = m.take([5, 2, 9])
    assert sub.keys == ("im0005", "im0002", "im0009")
    assert box_metrics(sub).map50 == box_metrics(matches([images[i] for i in (5, 2, 9)], 2)).map50
    assert m.select(list(sub.keys)).keys == sub.keys
    back = ImageMatches.from_arrays(m.to_arrays())
    assert back.keys == m.keys and np.array_equal(back.tp, m.tp) and back.conf.dtype == m.conf.dtype
    with pytest.raises(EvaluationError, match="not evaluated here"):
        m.select(["nope"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"keys": ("a", "a")}, "unique"),
        ({"tp": np.zeros((1, 9), dtype=bool)}, "bool array"),
        ({"conf": np.array([1.5])}, "within"),
        ({"pred_cls": np.array([3])}, "class ids"),
        ({"pred_image": np.array([2])}, "index"),
        ({"target_image": np.array([0, 0])}, "same length"),
    ],
)
def test_inconsistent_statistics_are_refused(change, match) -> None:
    base = {
        "keys": ("a", "b"),
        "num_classes": 2,
        "tp": np.zeros((1, 10), dtype=bool),
        "conf": np.array([0.5]),
        "pred_cls": np.array([1]),
        "pred_image": np.array([0]),
        "target_cls": np.array([1]),
        "target_image": np.array([1]),
    }
    with pytest.raises(EvaluationError, match=match):
        ImageMatches(**{**base, **change})


# ------------------------------------------------------------------ advice helpers


@pytest.mark.parametrize(
    ("n", "boxes", "halfwidth", "expected"),
    [
        (300, {"a": 40, "b": 35}, 0.03, []),
        (27, {"a": 40, "b": 35}, 0.09, ["resolves only mAP50 differences larger than ±0.090"]),
        (300, {"a": 40, "b": 3}, 0.03, ["class 'b' has 3 test boxes"]),
        (300, {"a": 40, "b": 35}, None, []),  # not measured yet: nothing to say about width
        (0, {}, None, ["the test split is empty"]),
    ],
)
def test_split_health(n, boxes, halfwidth, expected) -> None:
    out = split_health(n, boxes, halfwidth, max_halfwidth=0.05, min_test_boxes=10)
    assert len(out) == len(expected)
    for msg, want in zip(out, expected, strict=True):
        assert want in msg


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        ([[0, 0, 0], [0, 0, 0], [5, 3, 0]], True),  # every true box missed, nothing predicted
        ([[1, 0, 0], [0, 0, 0], [4, 3, 0]], False),  # one box found
        ([[0, 0, 2], [0, 0, 0], [5, 3, 0]], False),  # false alarms: it predicts something
        ([[0, 0, 0], [0, 0, 0], [0, 0, 0]], False),  # no true boxes: nothing to say
        (None, False),
    ],
)
def test_all_background(matrix, expected) -> None:
    assert all_background(matrix) is expected


def test_hidden_classes_only_for_measured_classes_below_the_bar() -> None:
    ap = {"a": 0.05, "b": 0.5, "c": 0.0, "d": float("nan")}
    n = {"a": 10, "b": 10, "c": 0, "d": 0}
    assert hidden_classes(ap, n, 0.1) == ["a"]
    assert hidden_classes(ap, n, 0.0) == []


def test_interval_text() -> None:
    assert Interval(0.61234, 0.5, 0.7).text() == "0.612 [0.500, 0.700]"
    assert Interval(0.01, -0.02, 0.04).text(3, signed=True) == "+0.010 [-0.020, +0.040]"
    assert Interval(0.5, float("nan"), float("nan")).text() == "0.500"


def test_the_statistics_module_does_not_import_ultralytics() -> None:
    code = "import sys, loop.evaluation, loop.quality; print('ultralytics' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True
    )
    assert out.stdout.strip() == "False"


def test_swapped_comparison_equals_the_reverse_bootstrap() -> None:
    cand = matches(_detector(50, 0.8, seed=6), 2)
    champ = matches(_detector(50, 0.6, seed=7), 2)
    fwd = paired_bootstrap(cand, champ, ["a", "b"], SETTINGS)
    rev = paired_bootstrap(champ, cand, ["a", "b"], SETTINGS)
    sw = fwd.swapped()
    for x, y in (
        (sw.difference_map50_95, rev.difference_map50_95),
        (sw.difference_map50, rev.difference_map50),
        *((sw.per_class_difference_ap50_95[c], rev.per_class_difference_ap50_95[c]) for c in "ab"),
    ):
        assert (x.value, x.lo, x.hi) == pytest.approx((y.value, y.lo, y.hi), abs=1e-12)
    assert (
        sw.candidate is fwd.champion and sw.swapped().difference_map50_95 == fwd.difference_map50_95
    )
    assert paired_gate(sw, 0, 0.05).verdict == paired_gate(rev, 0, 0.05).verdict


def test_evaluation_memo_key_follows_label_content_not_rewrites(tmp_path: Path) -> None:
    import time

    import yaml

    from loop.model.validation import _split_fingerprint

    images, labels = tmp_path / "test" / "images", tmp_path / "test" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    (images / "a.png").write_bytes(b"png-a")
    (labels / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    data = {"path": str(tmp_path), "test": "test/images", "names": {0: "x"}}
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data))
    key = _split_fingerprint(data_yaml, data, "test")
    time.sleep(0.01)
    (labels / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # an identical re-export
    assert _split_fingerprint(data_yaml, data, "test") == key
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.1\n")  # a corrected label
    changed = _split_fingerprint(data_yaml, data, "test")
    assert changed != key
    (images / "b.png").write_bytes(b"png-b")  # one more test image
    assert _split_fingerprint(data_yaml, data, "test") not in (key, changed)
