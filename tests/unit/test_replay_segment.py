"""Segment oracle replays: mask datasets prepared through the product's mask import, ground truth
with polygons (stored, read back, answered by the oracle), settings, and savings on mask mAP50."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import ConfigError, DatasetError
from loop.labelstudio import PushItem
from loop.polygons import as_ring
from loop.replay import ReplaySettings
from loop.replay_dataset import prepare_mask_dataset
from loop.savings import mean_curve, summarize
from loop.simulate import OracleGateway, boxes_and_polygons, truth_from_json, truth_to_json

SQUARE = as_ring([[2.0, 2.0], [10.0, 2.0], [10.0, 10.0], [2.0, 10.0]])
HOLE = as_ring([[4.0, 4.0], [6.0, 4.0], [6.0, 6.0], [4.0, 6.0]])
TRI = as_ring([[12.5, 1.25], [15.0, 9.0], [11.0, 7.0]])


def _segment_truth() -> Detections:
    return Detections(
        np.array([[2.0, 2.0, 10.0, 10.0], [11.0, 1.25, 15.0, 9.0]]),
        np.array([0, 1]),
        (16, 12),
        polygons=((SQUARE, HOLE), (TRI,)),
    )


def test_truth_json_round_trips_exactly():
    truth = {
        "a" * 64: _segment_truth(),
        "b" * 64: Detections(np.zeros((0, 4)), np.zeros(0, dtype=int), (16, 12), polygons=()),
        "c" * 64: Detections(np.array([[1.0, 1.0, 3.5, 4.0]]), np.array([1]), (8, 8)),
    }
    back = truth_from_json(truth_to_json(truth))
    assert sorted(back) == sorted(truth)
    for sha, det in truth.items():
        got = back[sha]
        assert got.image_wh == det.image_wh
        assert np.array_equal(got.xyxy, det.xyxy) and got.class_id.tolist() == det.class_id.tolist()
        if det.polygons is None:
            assert got.polygons is None
        else:
            assert got.polygons is not None and len(got.polygons) == len(det.polygons)
            for rings_a, rings_b in zip(got.polygons, det.polygons, strict=True):
                assert len(rings_a) == len(rings_b)
                assert all(np.array_equal(x, y) for x, y in zip(rings_a, rings_b, strict=True))


def test_the_oracle_answers_polygon_instances_and_boxes_as_before():
    truth = {
        "s": _segment_truth(),
        "d": Detections(np.array([[1, 1, 4, 4]]), np.array([0]), (8, 8)),
    }
    gw = OracleGateway(truth)
    items = [
        PushItem(
            sha256=s, image_url="/x", detections=Detections.empty(truth[s].image_wh), priority=1
        )
        for s in ("s", "d")
    ]
    gw.push(1, items, "v1", ["a", "b"])
    seg, det = gw.pull(1, ["a", "b"]).labels
    assert seg.detections.polygons is None and seg.detections.xyxy.tolist() == [
        [2.0, 2.0, 10.0, 10.0],
        [11.0, 1.25, 15.0, 9.0],
    ]
    assert len(seg.polygons) == 2 and len(seg.polygons[0]) == 2  # the hole stays a ring
    assert np.array_equal(seg.polygons[1][0], TRI)
    # Boxes-only ground truth (a detect replay) is answered exactly as before: no polygons.
    assert det.polygons == () and det.detections is truth["d"]
    boxes, polys = boxes_and_polygons(truth["d"])
    assert boxes is truth["d"] and polys == ()


def _write_mask_folder(root: Path) -> None:
    """MT_Crack: one image with two regions (one with a hole) and one 2-px speck; MT_Free: an
    all-zero mask (defect-free); MT_Pit: one region."""
    rng = np.random.default_rng(0)
    for folder, stem, regions in (
        ("MT_Crack", "a", [(2, 2, 12, 12), (20, 4, 24, 30)]),
        ("MT_Crack", "speck", [(5, 5, 6, 7)]),
        ("MT_Free", "f", []),
        ("MT_Pit", "p", [(10, 10, 18, 16)]),
    ):
        d = root / folder / "Imgs"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{stem}.jpg"), rng.integers(0, 255, (32, 40), dtype=np.uint8))
        mask = np.zeros((32, 40), dtype=np.uint8)
        for x0, y0, x1, y1 in regions:
            mask[y0:y1, x0:x1] = 255
        if stem == "a":
            mask[5:8, 5:8] = 0  # a hole in the first region
        cv2.imwrite(str(d / f"{stem}.png"), mask)


def test_prepare_mask_dataset_goes_through_the_mask_import(tmp_path: Path):
    src = tmp_path / "tiles"
    _write_mask_folder(src)
    folders = {"MT_Crack": "crack", "MT_Pit": "pit"}
    ds = prepare_mask_dataset(src, tmp_path / "prep", folders)
    assert ds.kind == "masks" and ds.classes == ["crack", "pit"] and ds.n_images == 4
    # The all-zero mask and the mask whose only region is under 4 px: no instance.
    assert ds.n_defect_free == 2
    assert sorted(p.name for p in ds.images_dir.iterdir()) == [
        "MT_Crack__a.jpg",
        "MT_Crack__speck.jpg",
        "MT_Free__f.jpg",
        "MT_Pit__p.jpg",
    ]
    assert all(p.is_symlink() for p in ds.images_dir.iterdir())
    assert ds.truth_file is not None
    truth = truth_from_json(ds.truth_file.read_text())
    by_count = sorted((len(d), d.class_id.tolist()) for d in truth.values())
    assert by_count == [(0, []), (0, []), (1, [1]), (2, [0, 0])]
    two = next(d for d in truth.values() if len(d) == 2)
    assert two.polygons is not None and sorted(len(r) for r in two.polygons) == [1, 2]
    assert sorted(two.xyxy.tolist()) == [[2.0, 2.0, 12.0, 12.0], [20.0, 4.0, 24.0, 30.0]]
    report = (ds.truth_file.parent / "import-report.json").read_text()
    assert "smaller than the minimum" in report  # the dropped speck is recorded
    again = prepare_mask_dataset(src, tmp_path / "prep", folders)
    assert again == ds  # reused, not re-imported
    with pytest.raises(DatasetError, match="folder -> class"):
        prepare_mask_dataset(src, tmp_path / "prep2", {})


def test_settings_of_segment_replays_are_checked_and_fingerprinted():
    detect = ReplaySettings(dataset=Path("."))
    assert "task" not in detect.fingerprint() and "mask_import" not in detect.fingerprint()
    assert detect.metric == "test_map50"
    seg = ReplaySettings(
        dataset=Path("."),
        strategies=("random", "mask_stability"),
        task="segment",
        mask_classes=(("MT_Crack", "crack"),),
    )
    seg.check()
    fp = seg.fingerprint()
    assert fp["task"] == "segment" and fp["mask_import"]["folder_classes"] == [
        ["MT_Crack", "crack"]
    ]
    assert seg.metric == "test_mask_map50"
    for bad, match in (
        ({"task": "segment"}, "mask dataset"),
        ({"strategies": ("random", "mask_stability")}, "instance masks"),
        ({"task": "keypoints", "mask_classes": (("a", "b"),)}, "detect or segment"),
    ):
        with pytest.raises(ConfigError, match=match):
            ReplaySettings(**{**detect.__dict__, **bad}).check()


def _curve(strategy: str, points: list[tuple[int, float, float, int]]) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "seed": 0,
        "rounds": [
            {
                "round": i,
                "labeled": n,
                "test_map50": box,
                "test_map50_95": box / 2,
                "test_mask_map50": mask,
                "test_mask_map50_95": mask / 2,
                "defect_free": free,
                "actions_total": n,
            }
            for i, (n, box, mask, free) in enumerate(points)
        ],
    }


def test_savings_on_mask_map50_known_answer():
    # Random reaches mask 0.4 at 300 labels; the strategy reaches it at 150 (halfway from 0.1 at 100 to 0.7 at 200: savings 0.5). On
    # box mAP50 the strategy is no better than random (savings 0).
    curves = [
        _curve("random", [(100, 0.2, 0.1, 70), (200, 0.3, 0.2, 140), (300, 0.4, 0.4, 210)]),
        _curve("s", [(100, 0.2, 0.1, 70), (200, 0.3, 0.7, 90), (300, 0.4, 0.8, 100)]),
    ]
    mask = summarize(curves, metric="test_mask_map50")
    box = summarize(curves)
    assert mask is not None and box is not None
    assert mask["metric"] == "test_mask_map50" and mask["best_strategy"] == "s"
    assert mask["strategies"]["s"]["savings_mean"] == pytest.approx(1 - 150 / 300)
    assert box["strategies"]["s"]["savings_mean"] == pytest.approx(0.0)
    mc = mean_curve([curves[1]])
    assert [p["mask_map50_mean"] for p in mc] == [0.1, 0.7, 0.8]
    assert [p["defect_free_mean"] for p in mc] == [70, 90, 100]
    # Detect curves (mask metrics None) keep exactly the keys they had.
    for r in curves[0]["rounds"]:
        r["test_mask_map50"] = r["test_mask_map50_95"] = None
    assert not any(k.startswith(("mask_", "defect_")) for p in mean_curve([curves[0]]) for k in p)
