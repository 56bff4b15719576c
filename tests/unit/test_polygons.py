"""Lossless segmentation labels (issue 13, step 2): polygons in dataset versions, their digest,
the manifest round trip and `datasets diff`; and the pure polygon helpers of `loop.polygons`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from loop.config import SplitConfig
from loop.dataset_diff import diff_versions
from loop.datasets import (
    MANIFEST_FILE,
    DatasetStore,
    DatasetVersion,
    LabeledImage,
    assign_split,
    read_version_dir,
)
from loop.detections import Detections
from loop.errors import ConversionError, DatasetError
from loop.polygons import (
    as_ring,
    mask_iou,
    polygons_to_detections,
    ring_area,
    rings_bbox,
    rings_to_mask,
)

CLASSES = ("scratch", "pit")


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def row(i: int, boxes=((1, 2, 10, 12, 0),), split: str | None = None) -> LabeledImage:
    """A box-only image, as tests/unit/test_datasets.py makes them (split from the hash)."""
    arr = np.array([b[:4] for b in boxes], dtype=float).reshape(-1, 4)
    ids = np.array([b[4] for b in boxes], dtype=int)
    s = sha(i)
    det = Detections(arr, ids, (32, 32))
    split = split or assign_split(s, SplitConfig())
    return LabeledImage(s, f"{s[:2]}/{s}.png", 32, 32, split, det, {"source": "test"})  # type: ignore[arg-type]


SQUARE = [[2, 2], [10, 2], [10, 10], [2, 10]]
HOLE = [[4, 4], [8, 4], [8, 8], [4, 8]]
TRIANGLE = [[12, 12], [20, 12], [16, 20]]


def seg_row(i: int, instances, split: str = "train") -> LabeledImage:
    """An image of 32 x 32 px with ``instances``: ``(class id, [ring, ...])``."""
    det, polys = polygons_to_detections(
        [(c, tuple(as_ring(r) for r in rings)) for c, rings in instances], (32, 32)
    )
    s = sha(i)
    return LabeledImage(s, f"{s[:2]}/{s}.png", 32, 32, split, det, {"source": "test"}, polys)  # type: ignore[arg-type]


# ------------------------------------------------------------------ digest


def test_box_only_digests_are_what_they_were_before_polygons():
    """Pinned from main before this change: a detect project's versions keep their digests."""
    v = DatasetVersion.create(
        CLASSES, [row(1, boxes=((5, 6, 7, 8.0004, 1), (1, 2, 10, 12, 0))), row(2, boxes=()), row(3)]
    )
    assert v.digest == "07929a647eb86ad751486a747687dfc992a5511d2d564595e111c934f967123f"


def test_polygon_digest_follows_the_documented_canonical_form():
    r1 = seg_row(1, [(1, [TRIANGLE]), (0, [SQUARE, HOLE])])
    r2 = seg_row(2, [])
    v = DatasetVersion.create(CLASSES, [r1, r2])
    square = "scratch:2.000,2.000,10.000,10.000"
    tri = "pit:12.000,12.000,20.000,20.000"
    rings = sorted(
        [
            "2.000,2.000 10.000,2.000 10.000,10.000 2.000,10.000",
            "4.000,4.000 8.000,4.000 8.000,8.000 4.000,8.000",
        ]
    )
    inst = sorted(
        [f"{square}={'/'.join(rings)}", f"{tri}=12.000,12.000 20.000,12.000 16.000,20.000"]
    )
    lines = sorted(
        [
            f"{r1.sha256}|32x32|train|{';'.join(sorted([tri, square]))}|{';'.join(inst)}",
            f"{r2.sha256}|32x32|train|",  # no instances: the box-only form
        ]
    )
    text = "classes:scratch\npit\n" + "".join(line + "\n" for line in lines)
    assert v.digest == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("other", "same"),
    [
        ([[2, 2], [10, 2], [10, 10], [2, 10]], True),  # identical
        ([[2, 2], [10, 2], [10, 10], [2, 10], [2, 2]], True),  # explicit closing vertex
        ([[2, 2], [10, 2], [10, 10], [2, 10.0004]], True),  # sub-millipixel noise
        ([[2, 2], [10, 2], [9, 9], [2, 10]], False),  # one vertex moved inside the box
        ([[2, 2], [10, 2], [10, 10], [6, 11], [2, 10]], False),  # a vertex added
        ([[2, 2], [2, 10], [10, 10], [10, 2]], False),  # stored order is part of the label
    ],
)
def test_a_moved_vertex_gives_a_new_digest(other, same: bool):
    a = DatasetVersion.create(CLASSES, [seg_row(1, [(0, [SQUARE])])])
    b = DatasetVersion.create(CLASSES, [seg_row(1, [(0, [other])])])
    assert (a.digest == b.digest) is same


def test_polygons_and_their_boxes_differ_from_the_boxes_alone():
    seg = seg_row(1, [(0, [SQUARE])])
    box_only = LabeledImage(seg.sha256, seg.path, 32, 32, "train", seg.boxes, {})
    assert seg.boxes.same_boxes(box_only.boxes)
    assert DatasetVersion.create(CLASSES, [seg]).digest != (
        DatasetVersion.create(CLASSES, [box_only]).digest
    )
    # boxes written with empty polygon instances are boxes only: the same labels, the same digest
    empty = LabeledImage(seg.sha256, seg.path, 32, 32, "train", seg.boxes, {}, ((),))
    assert empty.polygons == ()
    assert DatasetVersion.create(CLASSES, [empty]).digest == (
        DatasetVersion.create(CLASSES, [box_only]).digest
    )


def test_a_hole_is_part_of_the_label():
    a = DatasetVersion.create(CLASSES, [seg_row(1, [(0, [SQUARE])])])
    b = DatasetVersion.create(CLASSES, [seg_row(1, [(0, [SQUARE, HOLE])])])
    assert a.digest != b.digest


@pytest.mark.parametrize(
    ("polygons", "message"),
    [
        ((), None),
        (((np.array(SQUARE, float),),), "is not its polygon's bounding box"),
        (((np.array(TRIANGLE, float),), ()), "1 boxes but 2 polygon instances"),
        (((np.array([[12, 12], [20, 20]], float),),), "at least 3 distinct points"),
        (((np.array([[12, 12], [16, 16], [20, 20]], float),),), "zero area"),
        (((np.array([[12, 12], [20, 12], [np.nan, 20]], float),),), "NaN"),
    ],
)
def test_boxes_and_polygons_must_agree(polygons, message: str | None):
    det = Detections(np.array([[12, 12, 20, 20.0]]), np.array([1]), (32, 32))
    make = lambda: LabeledImage(sha(1), "a.png", 32, 32, "train", det, {}, polygons)  # noqa: E731
    if message is None:
        assert make().polygons == ()
    else:
        with pytest.raises(DatasetError, match=message):
            make()


# ------------------------------------------------------------------ storage


def test_manifest_round_trip_keeps_every_vertex(tmp_path: Path):
    rng = np.random.default_rng(3)
    wobbly = (rng.random((17, 2)) * 20 + 5).tolist()  # many vertices, float noise below 1e-3
    rows = [
        seg_row(1, [(1, [TRIANGLE]), (0, [SQUARE, HOLE])]),
        seg_row(2, [(0, [[[1, 1], [3, 1.25], [2.5, 4.125]]])], split="val"),
        row(3),  # a box without a polygon in the same version
        seg_row(4, []),
    ]
    rows.append(seg_row(5, [(1, [wobbly])], split="test"))
    v = DatasetVersion.create(CLASSES, rows)
    store = DatasetStore(tmp_path)
    store.save(v)
    back = store.load(v.digest[:10])
    assert back.digest == v.digest and back.has_polygons
    for a, b in zip(v.rows, back.rows, strict=True):
        assert len(a.polygons) == len(b.polygons)
        for ra, rb in zip(a.polygons, b.polygons, strict=True):
            assert len(ra) == len(rb)
            for x, y in zip(ra, rb, strict=True):
                assert np.array_equal(x, y)  # float64 exactly, not only to 3 decimals
    meta = json.loads((tmp_path / v.digest / "meta.json").read_text())
    assert meta["mask_counts"] == {"scratch": 2, "pit": 2}
    assert meta["class_counts"] == {"scratch": 3, "pit": 2}


def test_a_box_only_manifest_has_no_polygons_column(tmp_path: Path):
    v = DatasetVersion.create(CLASSES, [row(i) for i in range(3)])
    folder = DatasetStore(tmp_path).save(v)
    assert "polygons" not in pq.read_table(folder / MANIFEST_FILE).column_names
    assert "mask_counts" not in json.loads((folder / "meta.json").read_text())
    assert read_version_dir(folder, v.digest).digest == v.digest


def test_an_edited_vertex_on_disk_is_caught_by_the_digest(tmp_path: Path):
    v = DatasetVersion.create(CLASSES, [seg_row(1, [(0, [SQUARE, HOLE])])])
    folder = DatasetStore(tmp_path).save(v)
    table = pq.read_table(folder / MANIFEST_FILE)
    data = table.to_pylist()
    data[0]["polygons"][0][1][0] = 5.0  # the hole's first x: 4 -> 5, box unchanged
    pq.write_table(table.from_pylist(data, schema=table.schema), folder / MANIFEST_FILE)
    with pytest.raises(DatasetError, match="does not match its digest"):
        read_version_dir(folder)


# ------------------------------------------------------------------ diff


def test_diff_reports_changed_masks():
    base = [
        seg_row(1, [(0, [SQUARE])]),
        seg_row(2, [(1, [TRIANGLE])]),
        seg_row(3, [(0, [SQUARE]), (1, [TRIANGLE])]),
    ]
    changed = [
        seg_row(1, [(0, [[[2, 2], [10, 2], [9, 9], [2, 10]]])]),  # vertex moved, same box
        base[1],
        seg_row(3, [(0, [SQUARE])]),  # a region deleted
    ]
    a = DatasetVersion.create(CLASSES, base)
    b = a.with_labels(changed)
    d = diff_versions(a, b)
    assert d.has_masks
    assert d.remasked == tuple(sorted([sha(1), sha(3)]))
    assert d.relabeled == tuple(sorted([sha(1), sha(3)]))
    assert d.boxes_added == {"scratch": 0, "pit": 0}  # the moved vertex kept the box
    assert d.boxes_removed == {"scratch": 0, "pit": 1}
    assert d.masks_added == {"scratch": 1, "pit": 0}
    assert d.masks_removed == {"scratch": 1, "pit": 1}
    assert (d.masks_before, d.masks_after) == ({"scratch": 2, "pit": 2}, {"scratch": 2, "pit": 1})
    out = d.to_dict()
    assert out["masks"]["changed_images"] == list(d.remasked)
    assert out["masks"]["classes"]["pit"] == {"before": 2, "after": 1, "added": 0, "removed": 1}
    text = d.to_text()
    assert "images with changed masks: 2" in text
    assert f"masks changed: {' '.join(s[:12] for s in d.remasked)}" in text


def test_datasets_diff_command_shows_changed_masks(tmp_path: Path):
    from typer.testing import CliRunner

    from loop.cli import app

    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(f"task: segment\nclasses: [{', '.join(CLASSES)}]\n")
    a = DatasetVersion.create(CLASSES, [seg_row(1, [(0, [SQUARE])]), seg_row(2, [])])
    b = a.with_labels([seg_row(1, [(0, [SQUARE, HOLE])])])
    store = DatasetStore(tmp_path / ".defect-loop" / "datasets")
    store.save(a), store.save(b)
    runner = CliRunner()
    r = runner.invoke(app, ["datasets", "diff", a.digest[:8], b.digest[:8], "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "images with changed masks: 1" in r.output
    assert f"masks changed: {sha(1)[:12]}" in r.output
    r = runner.invoke(
        app, ["datasets", "diff", a.digest[:8], b.digest[:8], "--json", "-c", str(cfg)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["masks"]["changed_images"] == [sha(1)]
    r = runner.invoke(app, ["datasets", "show", b.digest[:8], "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "masks" in r.output and any(
        line.split() == ["scratch", "1", "1"] for line in r.output.splitlines()
    )
    r = runner.invoke(app, ["datasets", "show", b.digest[:8], "--json", "-c", str(cfg)])
    assert json.loads(r.output)["mask_counts"] == {"scratch": 1, "pit": 0}


def test_a_box_only_diff_has_no_masks_part():
    a = DatasetVersion.create(CLASSES, [row(1), row(2)])
    b = a.with_labels([row(2, boxes=((3, 3, 9, 9, 1),))])
    d = diff_versions(a, b)
    assert not d.has_masks and d.remasked == ()
    assert "masks" not in d.to_dict() and "mask" not in d.to_text()


# ------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("rings", "expected_pixels"),
    [
        ([SQUARE], 64),  # 8 x 8 pixel centres inside
        ([SQUARE, HOLE], 64 - 16),  # even-odd: the inner ring is a hole
        ([SQUARE, TRIANGLE], 64 + 32),  # two parts
        ([[[0, 0], [32, 0], [32, 32], [0, 32]]], 32 * 32),  # the whole image
    ],
)
def test_rings_to_mask_known_areas(rings, expected_pixels: int):
    mask = rings_to_mask([as_ring(r) for r in rings], (32, 32))
    assert mask.shape == (32, 32)
    assert int(mask.sum()) == expected_pixels


def test_rings_to_mask_places_pixels_by_their_centres():
    mask = rings_to_mask([as_ring(SQUARE)], (16, 12))  # width 16, height 12
    assert mask.shape == (12, 16)
    assert mask[2, 2] and mask[9, 9] and not mask[10, 10] and not mask[1, 5]
    assert not mask[5, 1] and mask[5, 2]


def test_helpers_known_answers():
    assert rings_bbox((as_ring(SQUARE), as_ring(TRIANGLE))) == (2.0, 2.0, 20.0, 20.0)
    assert ring_area(as_ring(TRIANGLE)) == pytest.approx(32.0)
    m = rings_to_mask([as_ring(SQUARE)], (32, 32))
    assert mask_iou(m, m) == 1.0
    assert mask_iou(m, rings_to_mask([as_ring(SQUARE), as_ring(HOLE)], (32, 32))) == 0.75
    with pytest.raises(ConversionError, match="list of"):
        as_ring([1, 2, 3])
