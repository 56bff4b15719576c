"""Seeded label noise: exact shares, disjoint kinds, recorded errors, simulated annotators."""

from __future__ import annotations

import numpy as np
import pytest

from loop.detections import Detections, box_iou
from loop.errors import ConfigError
from loop.label_noise import AnnotatorRates, inject_label_noise, simulate_annotator


def _labels(n_images: int = 40, per_image: int = 5, seed: int = 0) -> dict[str, Detections]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(n_images):
        xy = rng.uniform(0, 150, size=(per_image, 2))
        wh = rng.uniform(10, 40, size=(per_image, 2))
        out[f"{k:064x}"] = Detections(
            np.hstack([xy, xy + wh]), rng.integers(0, 3, per_image), (200, 200)
        )
    return out


def test_shares_are_exact_disjoint_and_recorded() -> None:
    clean = _labels()  # 200 boxes
    noisy = inject_label_noise(clean, 3, np.random.default_rng(1), 0.10, 0.10, 0.05)
    assert noisy.counts() == {"dropped": 20, "shifted": 20, "swapped": 10}
    assert sum(len(d) for d in noisy.labels.values()) == 180
    for sha, errs in noisy.errors.items():
        boxes = [e.box for e in errs]
        assert len(boxes) == len(set(boxes))  # one kind per box
        kept = [
            i
            for i in range(len(clean[sha]))
            if i not in {e.box for e in errs if e.kind == "dropped"}
        ]
        for e in errs:
            if e.kind == "dropped":
                continue
            j = kept.index(e.box)
            before, after = clean[sha].xyxy[e.box], noisy.labels[sha].xyxy[j]
            if e.kind == "shifted":
                assert box_iou(before[None], after[None])[0, 0] < 0.3
                assert noisy.labels[sha].class_id[j] == clean[sha].class_id[e.box]
            else:
                assert np.allclose(before, after)
                assert noisy.labels[sha].class_id[j] != clean[sha].class_id[e.box]
    untouched = set(clean) - noisy.corrupted
    assert untouched and all(noisy.labels[s].same_boxes(clean[s]) for s in untouched)


def test_same_seed_same_noise_other_seed_other_noise() -> None:
    clean = _labels()
    a = inject_label_noise(clean, 3, np.random.default_rng(5))
    b = inject_label_noise(clean, 3, np.random.default_rng(5))
    c = inject_label_noise(clean, 3, np.random.default_rng(6))
    assert a.errors == b.errors and a.errors != c.errors


@pytest.mark.parametrize(
    ("drop", "shift", "swap", "classes", "match"),
    [(1.2, 0, 0, 3, "drop"), (0.5, 0.4, 0.2, 3, "<= 1"), (0, 0, 0.1, 1, "two classes")],
)
def test_bad_rates_are_refused(
    drop: float, shift: float, swap: float, classes: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        inject_label_noise(_labels(2), classes, np.random.default_rng(0), drop, shift, swap)


def test_simulated_annotator_recovers_its_rates_in_the_limit() -> None:
    truth = _labels(400, 5)
    rng = np.random.default_rng(3)
    perfect = AnnotatorRates("p", 0, 0, 0)
    assert all(simulate_annotator(d, perfect, 3, rng).same_boxes(d) for d in truth.values())
    sloppy = AnnotatorRates("s", 0.2, 0.1, 0.1)
    drawn = sum(len(simulate_annotator(d, sloppy, 3, rng)) for d in truth.values())
    assert drawn / 2000 == pytest.approx(0.8, abs=0.03)
    with pytest.raises(ConfigError, match=r"s\.miss"):
        AnnotatorRates("s", 1.5, 0, 0)
