"""Brush masks (issue 13, item 3, brush half): a Label Studio ``brushlabels`` region, decoded
with label-studio-sdk's own RLE codec, becomes one polygon instance whose fill is exactly the
painted pixels; empty, undecodable or foreign-sized brushes reject their task."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from ls_json import one_annotation_task, rect, task_data

from loop.errors import ConversionError
from loop.formats.labelstudio_pull import judge_task
from loop.formats.labelstudio_regions import ls_results_to_instances, mask_to_ls_brush_result
from loop.labelstudio.brush import mask_to_rle, rle_to_mask
from loop.polygons import mask_iou, rings_bbox, rings_to_mask

CLASSES = ["scratch", "dent", "crack"]
W, H = 200, 100
# The bound of the round trip mask -> SDK RLE -> pull -> rings -> raster: the rings run along
# pixel edges, so it is exact (IoU 1.0); the bound leaves no room for a lost pixel on any mask
# here (the smallest has 45 pixels: one pixel lost is IoU <= 0.978).
IOU_BOUND = 0.99


def _blob() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[10:40, 20:80] = True
    return m


def _with_hole() -> np.ndarray:
    m = _blob()
    m[20:30, 40:60] = False
    return m


def _thin_crack() -> np.ndarray:
    m = np.zeros((H, W), bool)
    for i in range(45):  # a 1-pixel diagonal: 8-connected only
        m[50 + i // 2, 100 + i] = True
    return m


def _parts() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[5:10, 5:10] = True
    m[80:95, 150:199] = True
    m[60, 0:200] = True  # touches the left and right edges of the image
    return m


def _island_in_hole() -> np.ndarray:
    m = _with_hole()
    m[23:27, 48:52] = True
    return m


def _random() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((H, W)) < 0.3


MASKS = [
    ("a blob", _blob),
    ("a blob with a hole", _with_hole),
    ("a thin diagonal crack", _thin_crack),
    ("several parts, one across the image", _parts),
    ("an island inside a hole", _island_in_hole),
    ("random speckle", _random),
]


@pytest.mark.parametrize(("case", "make"), MASKS)
def test_sdk_rle_round_trip_is_exact(case: str, make: Any) -> None:
    mask = make()
    assert np.array_equal(rle_to_mask(mask_to_rle(mask), (W, H)), mask), case


@pytest.mark.parametrize(("case", "make"), MASKS)
def test_brush_region_becomes_one_instance_with_the_painted_pixels(case: str, make: Any) -> None:
    mask = make()
    region = mask_to_ls_brush_result(mask_to_rle(mask), "crack", (W, H), "b1")
    det, polygons = ls_results_to_instances(
        [rect(1, 1, 2, 2, "dent"), region], CLASSES, brush=rle_to_mask
    )
    assert det.class_id.tolist() == [1, 2]
    assert polygons[0] == ()
    rings = polygons[1]
    filled = rings_to_mask(rings, (W, H))
    iou = mask_iou(filled, mask)
    assert iou >= IOU_BOUND, (case, iou)
    assert np.array_equal(filled, mask), case  # exact, in fact
    ys, xs = np.nonzero(mask)
    assert rings_bbox(rings) == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
    np.testing.assert_allclose(det.xyxy[1], rings_bbox(rings))


def test_without_a_decoder_brush_regions_are_ignored() -> None:
    region = mask_to_ls_brush_result(mask_to_rle(_blob()), "crack", (W, H), "b1")
    det, polygons = ls_results_to_instances([region], CLASSES, image_wh=(W, H))
    assert len(det) == 0 and polygons == ()


DATA = task_data(W, H)


def task(result: list, tid: int = 9) -> dict[str, Any]:
    return one_annotation_task(result, tid, DATA)


def brush(mask: np.ndarray, label: str = "crack", **over: Any) -> dict[str, Any]:
    r = mask_to_ls_brush_result(mask_to_rle(mask), label, (mask.shape[1], mask.shape[0]), "b")
    for k, v in over.items():
        if k == "value":
            r["value"] = {**r["value"], **v}
        else:
            r[k] = v
    return r


def test_pull_keeps_a_brush_region_in_a_segment_project() -> None:
    v = judge_task(task([brush(_with_hole())]), CLASSES, {}, polygons=True, brush=rle_to_mask)
    assert v.label is not None, v.rejected
    assert v.label.detections.class_id.tolist() == [2]
    assert np.array_equal(rings_to_mask(v.label.polygons[0], (W, H)), _with_hole())


def test_keypoint_on_a_brush_instance_is_placed_by_its_painted_pixels() -> None:
    kp = {
        "id": "k",
        "type": "keypointlabels",
        "from_name": "keypoint",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "value": {"x": 25.0, "y": 25.0, "keypointlabels": ["crack/tip_a"]},  # 50, 25 px
    }
    # two crack brushes whose boxes both hold the point: it lies in the hole of the first
    island = np.zeros((H, W), bool)
    island[23:27, 48:52] = True
    result = [brush(_with_hole()), {**brush(island), "id": "b2"}, kp]
    v = judge_task(
        task(result), CLASSES, {}, polygons=True, brush=rle_to_mask, keypoints={"crack": ["tip_a"]}
    )
    assert v.label is not None, v.rejected
    assert v.label.keypoints[0] == () and v.label.keypoints[1][0].name == "tip_a"


def _forged_header(mask: np.ndarray) -> list[int]:
    rle = mask_to_rle(mask)
    return [0xFF, 0xFF, 0xFF, 0xF0, *rle[4:]]  # announces ~4 billion values


@pytest.mark.parametrize(
    ("case", "region", "message"),
    [
        ("empty", brush(np.zeros((H, W), bool)), "is empty"),
        ("unknown label", brush(_blob(), "rust"), "'rust' is not one of"),
        ("rle not a list", brush(_blob(), value={"rle": "abc"}), "list of byte values"),
        ("rle values not bytes", brush(_blob(), value={"rle": [1, 2, 3, 999, 5]}), "0-255"),
        ("forged header", brush(_blob(), value={"rle": _forged_header(_blob())}), "holds"),
        ("truncated", brush(_blob(), value={"rle": mask_to_rle(_blob())[:20]}), "does not decode"),
        ("other format", brush(_blob(), value={"format": "png"}), "is not 'rle'"),
        (
            "painted on another image",
            brush(np.ones((50, 100), bool), original_width=W, original_height=H),
            "painted on another image",
        ),
        ("another size than the task", brush(np.ones((50, 100), bool)), "100x50 image"),
    ],
)
def test_pull_refuses_bad_brushes_per_task(case: str, region: dict, message: str) -> None:
    v = judge_task(task([region], tid=77), CLASSES, {}, polygons=True, brush=rle_to_mask)
    assert v.label is None and v.rejected is not None, case
    assert v.rejected.task_id == 77
    assert message in str(v.rejected), (case, str(v.rejected))


def test_mask_to_rle_refuses_a_non_2d_mask() -> None:
    with pytest.raises(ConversionError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2)))


def test_a_brush_claiming_a_huge_image_is_refused_before_decoding() -> None:
    # A forged region: 30k x 30k px and a header announcing exactly that many values; the
    # decoder would allocate 3.6 GB. Refused by size, and by the task's size in a pull.
    side = 30_000
    forged = [*(side * side * 4).to_bytes(4, "big")] + [0] * 8
    with pytest.raises(ConversionError, match="larger than"):
        rle_to_mask(forged, (side, side))
    region = brush(_blob(), original_width=side, original_height=side, value={"rle": forged})
    v = judge_task(task([region], tid=5), CLASSES, {}, polygons=True, brush=rle_to_mask)
    assert v.rejected is not None and "30000x30000 image but the task's image is 200x100" in (
        v.rejected.reason
    )


def test_a_brush_on_a_task_without_a_size_is_refused() -> None:
    t = task([brush(_blob())], tid=6)
    del t["data"]["width"], t["data"]["height"]
    v = judge_task(t, CLASSES, {}, polygons=True, brush=rle_to_mask)
    assert v.rejected is not None and v.rejected.task_id == 6
    assert "no width/height" in v.rejected.reason


def test_hostile_brush_fields_reject_their_task_never_crash() -> None:
    """Fields of a brush region replaced by hostile values (seeded): a verdict, never a crash."""
    hostile = [None, True, "x", [], {}, [300], [-1] * 8, [1.5] * 8, float("nan"), -1, 10**30]
    rng = np.random.default_rng(11)
    base = brush(_blob())
    paths = [("value",), ("value", "rle"), ("value", "format"), ("value", "brushlabels"),
             ("original_width",), ("original_height",), ("type",)]  # fmt: skip
    rejected = 0
    for _ in range(200):
        region = {**base, "value": dict(base["value"])}
        path = paths[int(rng.integers(len(paths)))]
        bad = hostile[int(rng.integers(len(hostile)))]
        (region["value"] if len(path) == 2 else region)[path[-1]] = bad
        v = judge_task(task([region], tid=4), CLASSES, {}, polygons=True, brush=rle_to_mask)
        assert v.task_id == 4 and (v.label is None) != (v.rejected is None)
        rejected += v.rejected is not None
        if v.label is not None and len(v.label.detections):
            assert np.array_equal(rings_to_mask(v.label.polygons[0], (W, H)), _blob())
    assert rejected > 100
