"""Segmentation predictions and metrics without a model (issue 13, steps 4-5): outlines on
`Detections`, mask -> simplified outline, synthetic polygons, mask metrics in MLflow keys and in
the promotion gate, the config's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.detections import Detections
from loop.errors import ConfigError, InvalidDetectionsError, ModelError
from loop.formats.masks import mask_to_instance_rings, simplify_ring
from loop.model import EvalResult
from loop.model.training import segment_architecture
from loop.polygons import mask_iou, ring_self_intersects, rings_to_mask
from loop.synth import generate
from loop.tracking.gate import GATE_METRIC, gate, metric_dict

WH = (20, 10)
SQ = np.array([[1.0, 1], [5, 1], [5, 5], [1, 5]])


def test_detections_carry_outlines_through_indexing() -> None:
    tri = np.array([[10.0, 2], [14, 2], [12, 8]])
    det = Detections(
        np.array([[1.0, 1, 5, 5], [10, 2, 14, 8], [0, 0, 2, 2]]),
        [0, 1, 0],
        WH,
        confidence=[0.9, 0.2, 0.5],
        polygons=((SQ,), (tri,), ()),
    )
    sub = det.with_min_confidence(0.4)
    assert sub.polygons is not None and len(sub.polygons) == 2
    np.testing.assert_array_equal(sub.polygons[0][0], SQ)
    assert sub.polygons[1] == ()
    assert det[np.array([1])].polygons[0][0].tolist() == tri.tolist()
    assert det[1:].polygons[1] == ()
    assert not det.polygons[0][0].flags.writeable
    assert Detections(det.xyxy, det.class_id, WH).polygons is None


@pytest.mark.parametrize(
    ("polygons", "match"),
    [
        (((SQ,),), "one entry per box"),
        (((SQ,), (SQ[:2],)), "shape"),
        (((SQ,), (np.array([[0.0, 0], [np.nan, 1], [2, 2]]),)), "NaN"),
    ],
)
def test_detections_refuse_bad_outlines(polygons, match) -> None:
    with pytest.raises(InvalidDetectionsError, match=match):
        Detections(np.array([[1.0, 1, 5, 5], [0, 0, 2, 2]]), [0, 0], WH, polygons=polygons)


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 2.0])
def test_simplified_outline_stays_within_tolerance_and_simple(tolerance: float) -> None:
    """Every vertex of the exact pixel-edge outline lies within ``tolerance`` px of the
    simplified ring, which is simple; the area it covers stays close (bound stated here)."""
    mask = _disc(60, 80, 40.3, 29.7, 20)
    rings = mask_to_instance_rings(mask, tolerance)
    assert len(rings) == 1
    ring = rings[0]
    assert not ring_self_intersects(ring)
    from loop.formats.masks import mask_to_polygons

    exact = mask_to_polygons(mask.astype(np.uint8), threshold=1).instances[0][0]
    assert len(ring) < len(exact)
    # distance of each exact vertex to the simplified outline's edges
    a, b = ring, np.roll(ring, -1, axis=0)
    ab = b - a
    t = np.clip(
        ((exact[:, None, :] - a[None]) * ab[None]).sum(-1) / (ab**2).sum(-1)[None], 0.0, 1.0
    )
    d = np.linalg.norm(exact[:, None, :] - (a[None] + t[..., None] * ab[None]), axis=-1)
    assert d.min(axis=1).max() <= tolerance + 1e-6
    # a 20 px disc: 1 px of tolerance moves the outline, so the fill stays above 0.9 IoU
    assert mask_iou(rings_to_mask(rings, (80, 60)), mask) > 0.9


def test_outline_of_a_mask_with_a_hole_and_specks() -> None:
    main = np.zeros((40, 40), dtype=bool)
    main[5:35, 5:35] = True
    main[15:25, 15:25] = False  # hole
    mask = main.copy()
    mask[0, 39] = True  # a 1-px speck: below min_area
    mask[38:40, 0:2] = True  # 4 px: above min_area, below 10 % of the main part
    rings = mask_to_instance_rings(mask, tolerance=0.5)
    assert len(rings) == 2  # outer outline and hole; straight edges need no simplification
    np.testing.assert_array_equal(rings_to_mask(rings, (40, 40)), main)
    assert mask_to_instance_rings(np.zeros((8, 8)), 1.0) == ()


def test_a_pixel_chain_touching_itself_becomes_a_simple_ring() -> None:
    """Two squares meeting at one corner: the exact outline passes that corner twice."""
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    mask[5:8, 5:8] = True
    from loop.formats.masks import mask_to_polygons

    exact = mask_to_polygons(mask.astype(np.uint8), threshold=1).instances[0]
    assert any(ring_self_intersects(r) for r in exact)
    for r in exact:
        assert not ring_self_intersects(simplify_ring(r, 0.0))


def test_synthetic_polygons_are_exact() -> None:
    for sample in generate(6, seed=4, size=64, defect_free_fraction=0.0):
        polys = sample.polygons()
        assert len(polys) == len(sample.labels) == len(sample.masks)
        for rings, mask in zip(polys, sample.masks, strict=True):
            np.testing.assert_array_equal(rings_to_mask(rings, (64, 64)), mask)


def _ev(mask: bool) -> EvalResult:
    extra = (
        {
            "mask_map50": 0.4,
            "mask_map50_95": 0.2,
            "mask_precision": 0.5,
            "mask_recall": 0.3,
            "mask_per_class_ap50": {"pit": 0.4},
            "mask_per_class_ap50_95": {"pit": 0.2},
        }
        if mask
        else {}
    )
    return EvalResult(0.6, 0.3, 0.7, 0.5, {"pit": 0.6}, {"pit": 0.3}, {"pit": 4}, [], 3, **extra)


def test_metric_dict_adds_mask_metrics_for_segmentation_models() -> None:
    box = metric_dict("test", _ev(False), ["pit"])
    both = metric_dict("test", _ev(True), ["pit"])
    assert not any("mask" in k for k in box)
    assert both["test_mask_map50"] == 0.4 and both["test_mask_map50_95"] == 0.2
    assert both["test_mask_ap50_pit"] == 0.4 and both["test_mask_ap50_95_pit"] == 0.2
    assert both["test_map50"] == 0.6  # box figures stay


def test_gate_reads_the_mask_metric_for_segment_projects() -> None:
    """Box mAP improved, mask mAP fell: a segment project keeps its champion."""
    champ = {"test_map50_95": 0.30, "test_mask_map50_95": 0.40, "test_mask_ap50_95_pit": 0.4}
    cand = {"test_map50_95": 0.50, "test_mask_map50_95": 0.20, "test_mask_ap50_95_pit": 0.2}
    assert GATE_METRIC == {"detect": "box", "segment": "mask"}
    boxes = gate(cand, champ, ["pit"], 0.0, 1.0, "3")
    masks = gate(cand, champ, ["pit"], 0.0, 1.0, "3", metric=GATE_METRIC["segment"])
    assert boxes.promoted and not masks.promoted
    assert "test mask mAP50-95 0.2000 < champion v3 0.4000" in masks.reason
    drop = gate(cand, champ, ["pit"], 1.0, 0.1, "3", metric="mask")
    assert not drop.promoted and drop.class_drops == {"pit": 0.2}
    no_mask = gate({"test_map50_95": 0.5}, champ, ["pit"], 0.0, 1.0, metric="mask")
    assert not no_mask.promoted and "mask mAP50-95" in no_mask.reason


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("yolov8n.yaml", "yolov8n-seg.yaml"),
        ("yolo11s.yaml", "yolo11s-seg.yaml"),
        ("yolov8n-seg.yaml", "yolov8n-seg.yaml"),
    ],
)
def test_segment_architecture(model: str, expected: str) -> None:
    assert segment_architecture(model) == expected


def test_segment_architecture_refuses_a_checkpoint_name() -> None:
    with pytest.raises(ModelError, match="YAML"):
        segment_architecture("yolov8n.pt")


def test_segment_projects_score_with_torch(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"classes": ["pit"], "task": "segment", "scoring": {"backend": "onnx"}})
    )
    with pytest.raises(ConfigError, match=r"scoring\.backend: torch"):
        load_config(path)


def test_mask_metrics_view_puts_mask_figures_under_box_names() -> None:
    from loop.tracking.gate import mask_metrics_view

    run = {
        "test_map50": 0.6,
        "test_mask_map50": 0.4,
        "test_mask_ap50_95_pit": 0.2,
        "gate_diff_mask_map50_95_lo": -0.1,
        "gate_diff_map50_95_lo": 0.3,
        "compared_test_mask_map50": 0.5,
        "val_mask_recall": 0.7,
        "epoch_metrics/mAP50(M)": 0.1,
    }
    view = mask_metrics_view(run)
    assert view["test_map50"] == 0.4 and view["test_box_map50"] == 0.6
    assert view["test_ap50_95_pit"] == 0.2 and "test_box_ap50_95_pit" not in view
    assert view["gate_diff_map50_95_lo"] == -0.1 and view["gate_diff_box_map50_95_lo"] == 0.3
    assert view["compared_test_map50"] == 0.5 and view["val_recall"] == 0.7
    assert view["epoch_metrics/mAP50(M)"] == 0.1
    assert mask_metrics_view({"test_map50": 0.6}) == {"test_map50": 0.6}


@pytest.mark.parametrize("key", ["strategy", "base_strategy"])
def test_mask_strategies_need_a_segment_project(tmp_path: Path, key: str) -> None:
    from loop.selection import available_strategies

    select = {"strategy": "hybrid", key: "mask_stability"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"classes": ["pit"], "select": select}))
    with pytest.raises(ConfigError, match="task: segment"):
        load_config(path)
    path.write_text(yaml.safe_dump({"classes": ["pit"], "task": "segment", "select": select}))
    assert getattr(load_config(path).select, key) == "mask_stability"
    assert "mask_stability" not in available_strategies("detect")
    assert "mask_stability" in available_strategies("segment")


@pytest.mark.parametrize(
    ("axis", "ring", "box"),
    [
        ("hflip", [[19.0, 1], [15, 1], [15, 5], [19, 5]], [15.0, 1, 19, 5]),
        ("vflip", [[1.0, 9], [5, 9], [5, 5], [1, 5]], [1.0, 5, 5, 9]),
    ],
)
def test_outlines_predicted_on_a_flipped_image_are_flipped_back(axis, ring, box) -> None:
    from loop.model.prediction import _unflip

    det = Detections(np.array([[1.0, 1, 5, 5]]), [0], WH, confidence=[0.5], polygons=((SQ,),))
    back = _unflip(det, axis)
    np.testing.assert_allclose(back.xyxy[0], box)
    assert back.polygons is not None
    np.testing.assert_allclose(back.polygons[0][0], ring)
    assert back.confidence is not None and back.confidence[0] == 0.5
