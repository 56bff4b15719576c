"""Mask-aware uncertainty (issue 13, step 5): `box_mask_stability` and the registered
``mask_stability`` strategy, known answers on hand-made outlines."""

from __future__ import annotations

import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import StrategyError
from loop.selection import resolve_strategy
from loop.uncertainty import (
    NEEDS,
    STRATEGIES,
    box_mask_stability,
    instance_mask_iou,
    score_images,
)

WH = (40, 30)


def _square(x: float, y: float, s: float) -> np.ndarray:
    return np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]], dtype=np.float64)


def _det(rings: list[tuple[np.ndarray, ...]], conf: list[float] | None = None) -> Detections:
    boxes = [
        [*np.concatenate(r).min(axis=0), *np.concatenate(r).max(axis=0)] if r else [0, 0, 1, 1]
        for r in rings
    ]
    n = len(rings)
    c = np.asarray(conf if conf is not None else [1.0] * n, dtype=np.float64)
    probs = np.zeros((n, 2))
    probs[:, 0] = c
    return Detections(
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.zeros(n, dtype=np.int64),
        WH,
        confidence=c,
        class_probs=probs,
        polygons=tuple(rings),
    )


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((_square(0, 0, 10),), (_square(0, 0, 10),), 1.0),
        ((_square(0, 0, 10),), (_square(5, 0, 10),), 50 / 150),  # half overlap
        ((_square(0, 0, 10),), (_square(20, 0, 5),), 0.0),  # apart
        # a 10x10 square with a 4x4 hole (even-odd fill: 84 px) against the full square
        ((_square(0, 0, 10), _square(3, 3, 4)), (_square(0, 0, 10),), 84 / 100),
        ((_square(0, 0, 4),), (_square(0, 0, 2),), 4 / 16),  # nested
    ],
)
def test_instance_mask_iou_known_answers(a, b, iou) -> None:
    assert instance_mask_iou(a, b) == pytest.approx(iou)
    assert instance_mask_iou(b, a) == pytest.approx(iou)


def test_mask_stability_per_instance_known_answers() -> None:
    ref = _det([(_square(0, 0, 10),), (_square(20, 10, 10),), ()])
    views = [
        _det([(_square(0, 0, 10),), (_square(25, 10, 10),)]),  # same; shifted by half
        _det([(_square(0, 0, 10),)]),  # same; the second instance vanished
    ]
    stab = box_mask_stability(ref, views)
    # instance 0: IoU 1 in both views; instance 1: (1/3 + 0) / 2; instance 2 has no outline: 0
    np.testing.assert_allclose(stab, [1.0, (50 / 150) / 2, 0.0])


def test_mask_stability_sees_what_box_stability_does_not() -> None:
    """Same boxes, different masks: a ring and a full square share a box, not their pixels."""
    full = _det([(_square(0, 0, 10),)])
    ring = _det([(_square(0, 0, 10), _square(1, 1, 8))])  # a 1-px frame: 36 px
    assert box_mask_stability(full, [ring])[0] == pytest.approx(36 / 100)
    s_mask = score_images("mask_stability", [full], views=[[ring]], rng=np.random.default_rng(0))
    s_box = score_images(
        "localization_stability", [full], views=[[ring]], rng=np.random.default_rng(0)
    )
    assert s_mask[0] == pytest.approx(1 - 0.36) and s_box[0] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [
        ("max", 0.9 * (1 - 50 / 150)),
        ("mean", (0.0 + 0.9 * (1 - 50 / 150)) / 2),
        ("sum", 0.9 * (1 - 50 / 150)),
    ],
)
def test_mask_stability_reduction_is_explicit(reduction, expected) -> None:
    ref = _det([(_square(0, 0, 10),), (_square(20, 10, 10),)], conf=[0.5, 0.9])
    view = _det([(_square(0, 0, 10),), (_square(25, 10, 10),)])
    got = score_images(
        "mask_stability", [ref], views=[[view]], reduction=reduction, rng=np.random.default_rng(0)
    )
    assert got[0] == pytest.approx(expected)


def test_mask_stability_empty_image_gets_empty_score() -> None:
    empty = Detections.empty(WH, 2)
    empty = Detections(
        empty.xyxy, empty.class_id, WH, empty.confidence, empty.class_probs, polygons=()
    )
    got = score_images(
        "mask_stability", [empty], views=[[empty]], rng=np.random.default_rng(0), empty_score=0.7
    )
    assert got[0] == 0.7


def test_mask_stability_is_registered_and_reads_tta_views() -> None:
    assert "mask_stability" in STRATEGIES
    assert NEEDS["mask_stability"] == frozenset({"predictions", "tta"})
    plan = resolve_strategy("mask_stability")
    assert plan.scorer == "mask_stability" and "tta" in plan.needs


def test_mask_stability_refuses_boxes_without_outlines() -> None:
    boxes = Detections(
        np.array([[0.0, 0, 5, 5]]), [0], WH, confidence=[0.5], class_probs=[[0.5, 0.1]]
    )
    with pytest.raises(StrategyError, match="outlines"):
        score_images("mask_stability", [boxes], views=[[boxes]], rng=np.random.default_rng(0))
    with pytest.raises(StrategyError, match="augmented view"):
        box_mask_stability(_det([(_square(0, 0, 4),)]), [])
