"""Pixel masks -> polygons (issue 13, step 5): known answers on masks the tests draw (holes, thin
cracks, several regions, tiny ones dropped with a reason), exact mask -> polygon -> mask round
trips, and real magnetic-tile masks (skipped when the dataset is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loop.errors import ConversionError
from loop.formats.masks import mask_to_polygons, region_to_rings
from loop.formats.yolo import polygons_to_yolo_seg_lines, yolo_seg_lines_to_polygons
from loop.polygons import mask_iou, polygons_to_detections, ring_self_intersects, rings_to_mask

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "magnetic-tile"


def _rebuild(result, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    out = np.zeros((h, w), dtype=bool)
    for rings in result.instances:
        inst = rings_to_mask(rings, (w, h))
        assert not (out & inst).any()  # instances never overlap
        out |= inst
    return out


def _rings(result) -> list[list[list[list[float]]]]:
    return [[r.tolist() for r in inst] for inst in result.instances]


def test_a_square_with_a_hole_is_one_instance_with_two_rings():
    m = np.zeros((10, 12), np.uint8)
    m[2:8, 2:9] = 255
    m[4:6, 4:6] = 0
    res = mask_to_polygons(m)
    assert _rings(res) == [
        [
            [[2, 2], [9, 2], [9, 8], [2, 8]],  # outline, clockwise on screen, pixel corners
            [[4, 4], [4, 6], [6, 6], [6, 4]],  # the hole, counter-clockwise
        ]
    ]
    assert res.dropped == ()
    assert np.array_equal(_rebuild(res, m.shape), m >= 128)


def test_a_thin_diagonal_crack_stays_one_closed_region():
    m = np.zeros((8, 8), np.uint8)
    for i in range(1, 7):
        m[i, i] = 255  # one pixel wide, touching only at corners: 8-connected
    res = mask_to_polygons(m)
    assert len(res.instances) == 1 and len(res.instances[0]) == 1
    ring = res.instances[0][0]
    # every pixel's 4 corners; the corner two pixels share is passed twice (touching, not crossing)
    assert len(ring) == 4 * 6
    assert len(np.unique(ring, axis=0)) == 4 * 6 - 5
    assert np.array_equal(_rebuild(res, m.shape), m >= 128)


def test_a_one_pixel_wide_line_is_a_valid_polygon():
    m = np.zeros((12, 5), np.uint8)
    m[1:11, 2] = 255
    res = mask_to_polygons(m)
    assert _rings(res) == [[[[2, 1], [3, 1], [3, 11], [2, 11]]]]
    assert not ring_self_intersects(res.instances[0][0])


def test_several_regions_largest_first_and_tiny_ones_dropped_with_a_reason():
    m = np.zeros((20, 30), np.uint8)
    m[1:4, 1:4] = 200  # 9 px
    m[10:15, 10:20] = 255  # 50 px
    m[18, 28] = 255  # 1 px
    m[0, 20:22] = 255  # 2 px, on the border
    m[5:7, 25:30] = 130  # 10 px touching the right edge, just above the threshold
    m[16:19, 1:4] = 127  # just below the threshold: background
    res = mask_to_polygons(m, min_area=3)
    assert [int(rings_to_mask(r, (30, 20)).sum()) for r in res.instances] == [50, 10, 9]
    assert [(d.area_px, d.bbox) for d in res.dropped] == [
        (2, (20, 0, 22, 1)),
        (1, (28, 18, 29, 19)),
    ]
    assert all("smaller than the minimum of 3 px" in d.reason for d in res.dropped)
    kept = (m >= 128).copy()
    kept[18, 28] = kept[0, 20] = kept[0, 21] = False
    assert np.array_equal(_rebuild(res, m.shape), kept)


def test_an_island_inside_a_hole_is_its_own_instance():
    m = np.zeros((11, 11), np.uint8)
    m[1:10, 1:10] = 255
    m[3:8, 3:8] = 0
    m[5, 5] = 255
    res = mask_to_polygons(m, min_area=1)
    assert [len(inst) for inst in res.instances] == [2, 1]
    assert np.array_equal(_rebuild(res, m.shape), m >= 128)


def test_regions_touching_at_a_corner_keep_their_hole():
    """A ring of pixels closed only through diagonal steps still encloses its hole."""
    m = np.zeros((7, 7), np.uint8)
    m[1, 3] = m[2, 2] = m[2, 4] = m[3, 1] = m[3, 5] = m[4, 2] = m[4, 4] = m[5, 3] = 255
    res = mask_to_polygons(m, min_area=1)
    assert len(res.instances) == 1
    assert np.array_equal(_rebuild(res, m.shape), m >= 128)


def test_empty_and_bad_masks():
    assert mask_to_polygons(np.zeros((5, 5), np.uint8)) == mask_to_polygons(np.zeros((1, 1)))
    assert mask_to_polygons(np.zeros((5, 5), np.uint8)).instances == ()
    assert region_to_rings(np.zeros((3, 3), bool)) == ()
    with pytest.raises(ConversionError, match="2-D"):
        mask_to_polygons(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ConversionError, match="NaN"):
        mask_to_polygons(np.full((4, 4), np.nan))


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_round_trip_exactly(seed: int):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    m = (rng.random((h, w)) < 0.45).astype(np.uint8) * 255  # noise: holes, diagonals, islands
    res = mask_to_polygons(m, min_area=1)
    assert res.dropped == ()
    assert np.array_equal(_rebuild(res, m.shape), m >= 128)


@pytest.mark.parametrize("seed", range(3))
def test_mask_to_polygon_to_yolo_seg_and_back_keeps_the_mask(seed: int):
    """The whole way to an Ultralytics label and back: IoU above 0.98 per instance (6 decimals of
    a normalised coordinate move a vertex by well under a pixel; only pixel centres on the
    outline itself can flip)."""
    rng = np.random.default_rng(100 + seed)
    h, w = 64, 96
    m = np.zeros((h, w), np.uint8)
    for _ in range(4):
        cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
        ry, rx = rng.integers(3, 8), rng.integers(3, 12)
        yy, xx = np.ogrid[:h, :w]
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 255
    m[20:22, 5:90] = 255  # a long thin crack
    m[30:34, 40:44] = 0  # a hole wherever it falls inside
    res = mask_to_polygons(m)
    det, polys = polygons_to_detections([(0, r) for r in res.instances], (w, h))
    back, back_polys = yolo_seg_lines_to_polygons(polygons_to_yolo_seg_lines(det, polys), (w, h), 1)
    assert len(back_polys) == len(res.instances)
    assert np.allclose(back.xyxy, det.xyxy, atol=1e-3)
    for a, b in zip(res.instances, back_polys, strict=True):
        assert mask_iou(rings_to_mask(a, (w, h)), rings_to_mask(b, (w, h))) > 0.98


def test_magnetic_tile_masks_become_exact_polygons():
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"magnetic-tile dataset not found at {MAGNETIC_TILE.resolve()}")
    import cv2

    checked = 0
    for cls in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven", "MT_Free"):
        for png in sorted((MAGNETIC_TILE / cls / "Imgs").glob("*.png"))[:4]:
            m = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
            assert m is not None, png
            res = mask_to_polygons(m, min_area=1)
            assert np.array_equal(_rebuild(res, m.shape), m >= 128), png
            assert (len(res.instances) == 0) == (cls == "MT_Free"), png
            checked += 1
    assert checked == 24
