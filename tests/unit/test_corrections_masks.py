"""Correction analytics in segment projects: polygon pairs are matched by mask IoU."""

from __future__ import annotations

import numpy as np
import pytest

from loop.corrections import CorrectionInput, build_corrections, compare, instance_iou
from loop.detections import Detections
from loop.errors import InvalidDetectionsError
from loop.polygons import as_ring

CLASSES = ["crack", "pit"]
BOX = [[0.0, 0.0, 20.0, 20.0]]
LOWER = (as_ring([[0, 0], [20, 0], [0, 20]]),)  # triangle below the diagonal
UPPER = (as_ring([[20, 0], [20, 20], [0, 20]]),)  # the other half: same bounding box
L_SHAPE = (as_ring([[0, 0], [20, 0], [20, 10], [10, 10], [10, 20], [0, 20]]),)  # 3/4 of it
SQUARE = (as_ring([[0, 0], [20, 0], [20, 20], [0, 20]]),)


def _det(n: int = 1) -> Detections:
    return Detections(np.asarray(BOX * n), np.zeros(n, dtype=int), (40, 40))


@pytest.mark.parametrize(
    ("pred_rings", "final_rings", "outcome", "added"),
    [
        ((), (), "accepted", 0),  # boxes only: identical boxes
        ((LOWER,), (), "accepted", 0),  # a polygon on one side only: box IoU
        ((LOWER,), (UPPER,), "removed", 1),  # same box, disjoint masks
        ((L_SHAPE,), (SQUARE,), "adjusted", 0),  # mask IoU 0.75
        ((SQUARE,), (SQUARE,), "accepted", 0),
    ],
)
def test_polygon_pairs_are_judged_by_mask_iou(
    pred_rings: tuple, final_rings: tuple, outcome: str, added: int
) -> None:
    tc = compare(_det(), _det(), CLASSES, pred_rings, final_rings)
    assert tc.counts["crack"][outcome] == 1
    assert tc.counts["crack"]["added"] == added


def test_instance_iou_known_values_and_shape_check() -> None:
    iou = instance_iou(_det(), _det(), (L_SHAPE,), (SQUARE,))
    assert iou[0, 0] == pytest.approx(0.75)
    with pytest.raises(InvalidDetectionsError, match="2 polygon instances"):
        instance_iou(_det(), _det(), (L_SHAPE, SQUARE), (SQUARE,))


def test_the_document_says_how_each_image_was_matched() -> None:
    doc = build_corrections(
        [
            CorrectionInput("a" * 64, 1, _det(), _det(), None, (LOWER,), (UPPER,)),
            CorrectionInput("b" * 64, 2, _det(), _det()),
        ],
        CLASSES,
    )
    assert [im["match"] for im in doc["images"]] == ["mask", "box"]
    assert doc["per_class"]["crack"]["removed"] == 1 and doc["per_class"]["crack"]["accepted"] == 1
