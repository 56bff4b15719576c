"""Ultralytics segmentation labels (issue 13, step 4): `polygons_to_yolo_seg_lines` and its
inverse, round trips (single rings exactly, several rings by their filled pixels), and the
segment export of a dataset version."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from loop.datasets import DatasetVersion, LabeledImage, export_yolo
from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.yolo import (
    merge_rings,
    polygons_to_yolo_seg_lines,
    yolo_lines_to_instances,
    yolo_seg_lines_to_polygons,
)
from loop.polygons import as_ring, mask_iou, polygons_to_detections, rings_to_mask

W, H = 200, 100
TRI = as_ring([[20, 10], [60, 5], [40, 40]])
SQUARE = as_ring([[100, 20], [180, 20], [180, 90], [100, 90]])
HOLE = as_ring([[120, 40], [150, 40], [150, 70], [120, 70]])
PART = as_ring([[5, 60], [30, 60], [30, 95], [5, 95]])


def test_known_answer_line():
    det, polys = polygons_to_detections([(2, (TRI,))], (W, H))
    assert polygons_to_yolo_seg_lines(det, polys, precision=3) == [
        "2 0.100 0.100 0.300 0.050 0.200 0.400"
    ]


def test_a_box_without_polygon_is_written_as_its_rectangle():
    det = Detections(np.array([[20.0, 10.0, 60.0, 40.0]]), np.array([1]), (W, H))
    lines = polygons_to_yolo_seg_lines(det, (), precision=2)
    assert lines == ["1 0.10 0.10 0.30 0.10 0.30 0.40 0.10 0.40"]
    back, rings = yolo_seg_lines_to_polygons(lines, (W, H), 3)
    assert np.allclose(back.xyxy, det.xyxy)
    assert np.allclose(rings[0][0], [[20, 10], [60, 10], [60, 40], [20, 40]])


def test_single_rings_round_trip_to_the_written_precision():
    rng = np.random.default_rng(7)
    instances = []
    for k in range(30):
        n = int(rng.integers(3, 25))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radius = rng.uniform(2, 40, size=n)
        cx, cy = rng.uniform(45, 155), rng.uniform(45, 55)
        ring = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        instances.append((k % 3, (as_ring(np.clip(ring, 0, [W, H])),)))
    det, polys = polygons_to_detections(instances, (W, H))
    lines = polygons_to_yolo_seg_lines(det, polys)
    back, back_polys = yolo_seg_lines_to_polygons("\n".join(lines), (W, H), 3)
    assert back.class_id.tolist() == det.class_id.tolist()
    tol = 0.5e-6 * max(W, H) + 1e-9  # 6 decimals of a normalised coordinate
    assert np.allclose(back.xyxy, det.xyxy, rtol=0, atol=tol)
    for a, b in zip(polys, back_polys, strict=True):
        assert a[0].shape == b[0].shape
        assert np.allclose(a[0], b[0], rtol=0, atol=tol)


@pytest.mark.parametrize(
    ("name", "rings"),
    [
        ("square with a hole", (SQUARE, HOLE)),
        ("two parts", (SQUARE, PART)),
        ("hole and part", (PART, SQUARE, HOLE)),
        ("hole listed first", (HOLE, SQUARE)),
    ],
)
def test_several_rings_become_one_line_with_the_same_pixels(name: str, rings):
    expected = rings_to_mask(rings, (W, H))
    merged = merge_rings(rings)
    assert np.array_equal(rings_to_mask([merged], (W, H)), expected)
    det, polys = polygons_to_detections([(0, rings)], (W, H))
    lines = polygons_to_yolo_seg_lines(det, polys)
    assert len(lines) == 1
    back, back_polys = yolo_seg_lines_to_polygons(lines, (W, H), 1)
    assert np.allclose(back.xyxy, det.xyxy, atol=1e-4)
    # written to 6 decimals: pixel centres can only flip on the outline itself
    assert mask_iou(rings_to_mask(back_polys[0], (W, H)), expected) > 0.995
    hole_px = rings_to_mask([HOLE], (W, H))
    if any(r is HOLE for r in rings):
        assert not rings_to_mask(back_polys[0], (W, H))[hole_px].any()


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("0 0.1 0.1 0.2 0.2", ConversionError, "3 or more points"),
        ("0 0.1 0.1 0.2 0.2 0.3", ConversionError, "3 or more points"),
        ("0 0.1 0.1 0.2 0.2 0.3 x", ConversionError, "non-numeric"),
        ("5 0.1 0.1 0.2 0.2 0.3 0.1", UnknownLabelError, "class id 5"),
        ("0.5 0.1 0.1 0.2 0.2 0.3 0.1", UnknownLabelError, "whole number"),
        ("0 0.1 0.1 1.2 0.2 0.3 0.1", ConversionError, r"\[0, 1\]"),
        ("0 0.1 0.1 0.2 0.2 0.3 0.3", ConversionError, "one line"),
        ("\n0 0.1 0.1 0.2 0.2 0.3 0.1\n\n0 0.1", ConversionError, "line 4"),
    ],
)
def test_bad_segmentation_lines_are_refused(text: str, error: type, match: str):
    with pytest.raises(error, match=match):
        yolo_seg_lines_to_polygons(text, (W, H), 3)


def test_segment_export_writes_polygon_lines_and_detect_export_boxes(tmp_path: Path):
    rows = []
    for i, split in enumerate(("train", "val")):
        s = hashlib.sha256(str(i).encode()).hexdigest()
        det, polys = polygons_to_detections([(1, (TRI,)), (0, (SQUARE, HOLE))], (W, H))
        rows.append(LabeledImage(s, f"{s}.png", W, H, split, det, {}, polys))  # type: ignore[arg-type]
    images = tmp_path / "images"
    images.mkdir()
    for r in rows:
        (images / r.path).write_bytes(r.sha256.encode())
    v = DatasetVersion.create(("scratch", "pit"), rows)
    export_yolo(v, images, tmp_path / "seg", task="segment")
    export_yolo(v, images, tmp_path / "det")
    r = rows[0]
    seg = (tmp_path / "seg" / r.split / "labels" / f"{r.sha256}.txt").read_text().splitlines()
    det_lines = (tmp_path / "det" / r.split / "labels" / f"{r.sha256}.txt").read_text()
    assert seg == polygons_to_yolo_seg_lines(r.boxes, r.polygons)
    assert [len(line.split()) for line in seg] == [1 + 2 * 3, 1 + 2 * (4 + 1 + 4 + 1)]
    assert [line.split()[0] for line in det_lines.splitlines()] == ["1", "0"]
    assert all(len(line.split()) == 5 for line in det_lines.splitlines())
    back, back_polys = yolo_seg_lines_to_polygons(seg, (W, H), 2)
    assert np.allclose(back.xyxy, r.boxes.xyxy, atol=1e-4)
    holed = rings_to_mask((SQUARE, HOLE), (W, H))
    assert mask_iou(rings_to_mask(back_polys[1], (W, H)), holed) > 0.995
    again = tmp_path / "seg2"
    export_yolo(v, images, again, task="segment")
    assert (again / r.split / "labels" / f"{r.sha256}.txt").read_text() == "\n".join(seg) + "\n"


# ------------------------------------------------------------------ import (YOLO-seg folders)


def test_mixed_box_and_segmentation_lines():
    text = "1 0.2 0.25 0.2 0.3\n\n2 0.100 0.100 0.300 0.050 0.200 0.400\n"
    det, polys = yolo_lines_to_instances(text, (W, H), 3)
    assert det.class_id.tolist() == [1, 2]
    assert np.allclose(det.xyxy, [[20, 10, 60, 40], [20, 5, 60, 40]])
    assert polys[0] == () and np.allclose(polys[1][0], TRI)
    boxes_only, none = yolo_lines_to_instances("0 0.5 0.5 0.2 0.2", (W, H), 3)
    assert none == () and len(boxes_only) == 1
    with pytest.raises(ConversionError, match="line 3"):
        yolo_lines_to_instances("0 0.5 0.5 0.2 0.2\n\n0 0.1 0.1 0.2", (W, H), 3)
    with pytest.raises(UnknownLabelError, match="line 2"):
        yolo_lines_to_instances("0 0.5 0.5 0.2 0.2\n7 0.1 0.1 0.2 0.2 0.3 0.1", (W, H), 3)


def _seg_project(root: Path, task: str = "segment"):
    import yaml

    from loop.config import load_config
    from loop.project import Project

    root.mkdir(parents=True, exist_ok=True)
    (root / "defect-loop.yaml").write_text(
        yaml.safe_dump({"task": task, "classes": ["crack", "blowhole"]})
    )
    return Project(load_config(root / "defect-loop.yaml"))


def test_segment_export_then_ingest_gives_back_the_polygons(tmp_path: Path):
    """Export a segment version as a YOLO-seg folder and ingest it into a new segment project:
    the same images, classes and masks (IoU above 0.99 per instance; exact boxes to 1e-4 px)."""
    import cv2

    from loop.formats.masks import mask_to_polygons

    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    images = src / "images"
    images.mkdir(parents=True)
    instances = {}
    for i in range(8):
        m = np.zeros((48, 64), np.uint8)
        m[5 + i : 20 + i, 4:30] = 255
        m[10 + i : 13 + i, 10:14] = 0  # a hole
        m[30:32, 20 + i : 60] = 255  # a thin crack
        name = f"img{i}.png"
        cv2.imwrite(str(images / name), rng.integers(0, 255, (48, 64), dtype=np.uint8))
        instances[name] = mask_to_polygons(m).instances
    first = _seg_project(tmp_path / "a")
    report, _ = first.ingest(images)
    rows = []
    for name, rings_list in instances.items():
        entry = report.accepted[str(images / name)]
        det, polys = polygons_to_detections(
            [(i % 2, r) for i, r in enumerate(rings_list)], (64, 48)
        )
        rows.append(LabeledImage(entry.sha256, entry.path, 64, 48, "train", det, {}, polys))
    rows[0] = LabeledImage(
        rows[0].sha256, rows[0].path, 64, 48, "val", rows[0].boxes, {}, rows[0].polygons
    )
    version = DatasetVersion.create(first.cfg.classes, rows)
    first.set_version(version)
    data_yaml = first.export(version)
    out = data_yaml.parent
    second = _seg_project(tmp_path / "b")
    rep2, v2 = second.ingest(out / "train" / "images", out / "train" / "labels")
    assert rep2.label_problems == [] and v2 is not None and v2.has_polygons
    back = v2.by_sha()
    for r in version.rows:
        if r.split != "train":
            continue
        b = back[r.sha256]
        assert b.boxes.class_id.tolist() == r.boxes.class_id.tolist()
        assert np.allclose(b.boxes.xyxy, r.boxes.xyxy, atol=1e-4)
        for rings_a, rings_b in zip(r.polygons, b.polygons, strict=True):
            iou = mask_iou(rings_to_mask(rings_a, (64, 48)), rings_to_mask(rings_b, (64, 48)))
            assert iou > 0.99
    # a detect project reads only box lines: the segmentation lines are listed, not guessed
    third = _seg_project(tmp_path / "c", "detect")
    rep3, v3 = third.ingest(out / "train" / "images", out / "train" / "labels")
    assert v3 is None and len(rep3.label_problems) == 7
    assert all("expected 5 fields" in p.reason for p in rep3.label_problems)
