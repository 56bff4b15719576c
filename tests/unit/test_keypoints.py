"""Keypoints (issue 13, item 6): the config's names, lossless storage in dataset versions and
the digest, `datasets diff`, the Ultralytics pose export and its import, the label config, and
the pull rules that turn Label Studio keypoint regions into keypoints of instances."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from ls_json import one_annotation_task, poly, rect, task_data

from loop.config import load_config
from loop.dataset_diff import diff_versions
from loop.datasets import MANIFEST_FILE, DatasetStore, DatasetVersion, LabeledImage, export_yolo
from loop.detections import Detections
from loop.errors import ConfigError, ConversionError, DatasetError
from loop.formats.labelstudio_config import has_control, label_config_xml
from loop.formats.labelstudio_pull import judge_task
from loop.formats.labelstudio_regions import keypoint_to_ls_result
from loop.formats.yolo import (
    instances_to_yolo_pose_lines,
    pose_slots,
    yolo_pose_lines_to_instances,
)
from loop.keypoints import Keypoint, assign_to_instance, check_keypoint_config
from loop.polygons import as_ring

CLASSES = ["scratch", "dent", "crack"]
KP = {"crack": ["tip_a", "tip_b"], "dent": ["centre"], "scratch": ["start", "end"]}


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def image(
    i: int,
    boxes: list[list[float]],
    classes: list[int],
    keypoints: tuple = (),
    split: str = "train",
) -> LabeledImage:
    s = sha(i)
    det = Detections(
        np.array(boxes, dtype=float).reshape(-1, 4), np.array(classes, dtype=np.int64), (200, 100)
    )
    return LabeledImage(s, f"{s}.png", 200, 100, split, det, {"source": "test"}, (), keypoints)  # type: ignore[arg-type]


TIPS = ((Keypoint("tip_a", 20.0, 10.0), Keypoint("tip_b", 60.5, 30.25, 1)),)


# --- the config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keypoints", "message"),
    [
        ({"rust": ["a"]}, "'rust' is not one of the classes"),
        ({"crack": []}, "must list its keypoint names"),
        ({"crack": "tip"}, "must list its keypoint names"),
        ({"crack": ["tip", "tip"]}, "names a keypoint twice"),
        ({"crack": [" tip"]}, "names must be non-empty"),
        ({"crack": ["a/b"]}, "without surrounding spaces or '/'"),
        ({"crack": [""]}, "names must be non-empty"),
    ],
)
def test_keypoint_config_is_checked_against_the_classes(keypoints: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_keypoint_config(keypoints, CLASSES)


def _yaml(tmp_path: Path, **extra: Any) -> Path:
    p = tmp_path / "defect-loop.yaml"
    p.write_text(yaml.safe_dump({"classes": CLASSES, **extra}))
    return p


def test_project_config_reads_keypoints_and_refuses_bad_ones(tmp_path: Path) -> None:
    cfg = load_config(_yaml(tmp_path, keypoints={"crack": ["tip_a", "tip_b"]}))
    assert cfg.keypoints == {"crack": ["tip_a", "tip_b"]}
    with pytest.raises(ConfigError, match="'rust' is not one of the classes"):
        load_config(_yaml(tmp_path, keypoints={"rust": ["a"]}))


def test_brush_needs_a_segment_project(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"labelstudio\.brush needs task: segment"):
        load_config(_yaml(tmp_path, labelstudio={"brush": True}))
    cfg = load_config(_yaml(tmp_path, task="segment", labelstudio={"brush": True}))
    assert cfg.labelstudio.brush


# --- lossless storage and the digest ---------------------------------------------------------
def test_no_keypoints_keeps_the_box_only_digest_form() -> None:
    r = image(1, [[10, 5, 70, 40]], [2], keypoints=((),))
    assert r.keypoints == ()  # no keypoint at all: stored as none
    line = f"{sha(1)}|200x100|train|crack:10.000,5.000,70.000,40.000"
    assert r.canonical(CLASSES) == line
    expected = hashlib.sha256(
        ("classes:" + "\n".join(CLASSES) + "\n" + line + "\n").encode()
    ).hexdigest()
    assert DatasetVersion.create(CLASSES, [r]).digest == expected


@pytest.mark.parametrize(
    "moved",
    [
        (Keypoint("tip_a", 20.01, 10.0), TIPS[0][1]),  # one keypoint moved by 0.01 px
        (Keypoint("tip_a", 20.0, 10.0, 1), TIPS[0][1]),  # visibility changed
        (Keypoint("tip_b", 20.0, 10.0), Keypoint("tip_a", 60.5, 30.25, 1)),  # names swapped
        (TIPS[0][0],),  # one keypoint deleted
    ],
)
def test_a_changed_keypoint_changes_the_digest(moved: tuple[Keypoint, ...]) -> None:
    a = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2], TIPS)])
    b = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2], (moved,))])
    plain = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2])])
    assert len({a.digest, b.digest, plain.digest}) == 3


def test_keypoint_order_within_an_instance_does_not_change_the_digest() -> None:
    a = image(1, [[10, 5, 70, 40]], [2], TIPS)
    b = image(1, [[10, 5, 70, 40]], [2], ((TIPS[0][1], TIPS[0][0]),))
    assert a.canonical(CLASSES) == b.canonical(CLASSES)
    assert "|keypoints=crack:10.000,5.000,70.000,40.000#tip_a@20.000,10.000,2+tip_b@60.500" in (
        a.canonical(CLASSES)
    )


@pytest.mark.parametrize(
    ("keypoints", "message"),
    [
        ((TIPS[0], ()), "1 boxes but 2 keypoint instances"),
        (((Keypoint("tip_a", 201, 10),),), "outside the 200x100 image"),
        (((Keypoint("tip_a", float("nan"), 10),),), "not finite"),
        (((Keypoint("tip_a", 1, 1), Keypoint("tip_a", 2, 2)),), "'tip_a' is given twice"),
        (((Keypoint("tip_a", 1, 1, 0),),), "visibility 0"),
        (((Keypoint("", 1, 1),),), "has no name"),
    ],
)
def test_bad_keypoints_are_refused(keypoints: tuple, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        image(1, [[10, 5, 70, 40]], [2], keypoints)


def test_versions_store_keypoints_losslessly_and_old_versions_stay_readable(
    tmp_path: Path,
) -> None:
    store = DatasetStore(tmp_path)
    old = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2])])
    path = store.save(old)
    assert "keypoints" not in pq.read_table(path / MANIFEST_FILE).schema.names
    assert store.load(old.digest).rows[0].keypoints == ()

    rows = [
        image(1, [[10, 5, 70, 40], [0, 0, 5, 5]], [2, 1], (TIPS[0], ())),
        image(2, [[1, 1, 9, 9]], [0]),
    ]
    v = DatasetVersion.create(CLASSES, rows, parent=old.digest)
    back = store.load(store.save(v).name)
    assert back.digest == v.digest
    assert back.by_sha()[sha(1)].keypoints == (TIPS[0], ())
    assert back.by_sha()[sha(2)].keypoints == ()
    assert back.keypoint_counts() == {"scratch": 0, "dent": 0, "crack": 2}
    meta = next(m for m in store.list() if m["digest"] == v.digest)
    assert meta["keypoint_counts"]["crack"] == 2


def test_diff_reports_a_moved_keypoint() -> None:
    a = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2], TIPS), image(2, [], [])])
    moved = ((Keypoint("tip_a", 25.0, 10.0), TIPS[0][1]),)
    b = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2], moved), image(2, [], [])])
    d = diff_versions(a, b)
    assert d.has_keypoints
    assert d.rekeyed == (sha(1),)
    assert d.relabeled == (sha(1),)
    assert d.boxes_added["crack"] == d.boxes_removed["crack"] == 0
    assert d.keypoints_added["crack"] == d.keypoints_removed["crack"] == 1
    assert d.keypoints_before["crack"] == d.keypoints_after["crack"] == 2
    assert d.to_dict()["keypoints"]["changed_images"] == [sha(1)]
    assert "images with changed keypoints: 1" in d.to_text()
    same = diff_versions(a, a)
    assert same.rekeyed == () and same.unchanged == 2
    plain = DatasetVersion.create(CLASSES, [image(1, [[10, 5, 70, 40]], [2])])
    assert "keypoints" not in diff_versions(plain, plain).to_dict()


# --- the pose export -------------------------------------------------------------------------
def test_pose_line_known_answer_missing_keypoint_is_zero() -> None:
    det = Detections(np.array([[10.0, 5.0, 70.0, 45.0]]), np.array([2]), (200, 100))
    slots = pose_slots(CLASSES, KP)
    lines = instances_to_yolo_pose_lines(det, ((Keypoint("tip_b", 50.0, 25.0, 1),),), slots)
    assert lines == [
        "2 0.200000 0.250000 0.300000 0.400000 0.000000 0.000000 0 0.250000 0.250000 1"
    ]
    # a class with fewer keypoints than K (dent: 1 of 2) leaves its last slot at 0
    det = Detections(np.array([[10.0, 5.0, 70.0, 45.0]]), np.array([1]), (200, 100))
    assert instances_to_yolo_pose_lines(det, (), slots) == [
        "1 0.200000 0.250000 0.300000 0.400000 0.000000 0.000000 0 0.000000 0.000000 0"
    ]


def test_pose_export_needs_every_class_to_name_its_keypoints() -> None:
    with pytest.raises(ConversionError, match="class 'scratch' has no keypoints"):
        pose_slots(CLASSES, {"crack": ["tip_a"], "dent": ["centre"]})


def test_pose_export_refuses_a_keypoint_outside_the_config() -> None:
    det = Detections(np.array([[10.0, 5.0, 70.0, 45.0]]), np.array([2]), (200, 100))
    with pytest.raises(ConversionError, match=r"'middle'.*not one of its configured"):
        instances_to_yolo_pose_lines(det, ((Keypoint("middle", 1, 1),),), pose_slots(CLASSES, KP))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2 0.5 0.5 0.2 0.2 0.1 0.1 2", "expected 11 fields"),
        ("2 0.5 0.5 0.2 0.2 0.1 0.1 3 0 0 0", "visibility 3.0 is not 0, 1 or 2"),
        ("2 0.5 0.5 0.2 0.2 1.5 0.1 2 0 0 0", "outside"),
        ("1 0.5 0.5 0.2 0.2 0.1 0.1 2 0.2 0.2 2", "class 1 has only 1 keypoints"),
        ("7 0.5 0.5 0.2 0.2 0.1 0.1 2 0 0 0", "class id 7"),
    ],
)
def test_pose_import_refuses_bad_lines(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        yolo_pose_lines_to_instances(text, (200, 100), pose_slots(CLASSES, KP))


def test_pose_export_then_import_gives_the_same_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images_dir = tmp_path / "pool"
    images_dir.mkdir()
    rows = []
    for i in range(12):
        boxes, classes, kps = [], [], []
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, 150), rng.uniform(0, 60)
            boxes.append([x1, y1, x1 + rng.uniform(5, 50), y1 + rng.uniform(5, 40)])
            c = int(rng.integers(0, 3))
            classes.append(c)
            names = [n for n in KP[CLASSES[c]] if rng.random() < 0.7]  # some not labeled
            kps.append(
                tuple(
                    Keypoint(n, rng.uniform(0, 200), rng.uniform(0, 100), int(rng.integers(1, 3)))
                    for n in names
                )
            )
        r = image(i, boxes, classes, tuple(kps), split="val" if i % 3 == 0 else "train")
        (images_dir / r.path).write_bytes(b"img")
        rows.append(r)
    version = DatasetVersion.create(CLASSES, rows)
    assert version.has_keypoints
    data_yaml = export_yolo(version, images_dir, tmp_path / "out", pose=KP)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["kpt_shape"] == [2, 3]
    assert data["kpt_names"][1] == ["centre", "unused_1"]
    slots = pose_slots(CLASSES, KP)
    for r in rows:
        text = (tmp_path / "out" / r.split / "labels" / f"{r.sha256}.txt").read_text()
        det, kps = yolo_pose_lines_to_instances(text, (200, 100), slots)
        assert det.class_id.tolist() == r.boxes.class_id.tolist()
        np.testing.assert_allclose(det.xyxy, r.boxes.xyxy, atol=2e-4)
        want = r.keypoints or tuple(() for _ in range(len(r.boxes)))
        got = kps or tuple(() for _ in range(len(det)))
        for w_inst, g_inst in zip(want, got, strict=True):
            assert [(k.name, k.visibility) for k in w_inst] == [
                (k.name, k.visibility) for k in g_inst
            ]
            for wk, gk in zip(w_inst, g_inst, strict=True):
                # 6 decimals of a fraction of 200 px: within 1e-4 px
                assert abs(wk.x - gk.x) < 2e-4 and abs(wk.y - gk.y) < 2e-4
    with pytest.raises(DatasetError, match="class 'scratch' has no keypoints"):
        export_yolo(version, images_dir, tmp_path / "out2", pose={"crack": ["tip_a", "tip_b"]})


# --- the label config ------------------------------------------------------------------------
def test_label_config_offers_keypoints_and_brush_when_asked() -> None:
    xml = label_config_xml(CLASSES, polygons=True, brush=True, keypoints={"crack": ["a", "b"]})
    assert has_control(xml, "KeyPointLabels", "keypoint")
    assert has_control(xml, "BrushLabels", "brush")
    assert 'value="crack/a"' in xml and 'value="crack/b"' in xml
    # only a crack's own keypoints may be nested under a crack region in the editor
    assert xml.count('groupcancontain="crack/a,crack/b"') == 3  # rectangle, polygon, brush
    assert xml.count("groupcancontain") == 3
    plain = label_config_xml(CLASSES, polygons=True)
    assert not has_control(plain, "KeyPointLabels", "keypoint")
    assert not has_control(plain, "BrushLabels", "brush")
    with pytest.raises(ConfigError, match="'rust' is not one of the classes"):
        label_config_xml(CLASSES, keypoints={"rust": ["a"]})


# --- which instance a keypoint belongs to ----------------------------------------------------
L_RING = as_ring([[0, 0], [100, 0], [100, 20], [20, 20], [20, 100], [0, 100]])


@pytest.mark.parametrize(
    ("point", "cls", "expected"),
    [
        ((15, 15), 2, 1),  # inside both crack boxes: the smaller wins
        ((45, 45), 2, 0),  # inside the big box only
        ((150, 50), 2, 0),  # inside none: the nearest box (the big one, 50 px away)
        ((15, 15), 0, None),  # no scratch instance
        ((60, 60), 1, 2),  # dent: inside the L's box but outside its fill -> still the only dent
    ],
)
def test_assignment_rule(point: tuple[float, float], cls: int, expected: int | None) -> None:
    det = Detections(
        np.array([[0, 0, 100, 100], [10, 10, 30, 30], [0, 0, 100, 100]], dtype=float),
        np.array([2, 2, 1]),
        (200, 100),
    )
    assert assign_to_instance(*point, cls, det, ((), (), (L_RING,))) == expected


def test_assignment_prefers_a_polygon_that_contains_the_point() -> None:
    # two dents with the same box: the point lies in the L's fill of the second, not the first
    other = as_ring([[100, 0], [100, 100], [0, 100]])  # the lower-right triangle
    det = Detections(np.array([[0, 0, 100, 100]] * 2, dtype=float), np.array([1, 1]), (200, 100))
    assert assign_to_instance(5, 5, 1, det, ((other,), (L_RING,))) == 1
    assert assign_to_instance(90, 90, 1, det, ((other,), (L_RING,))) == 0


# --- the pull rules --------------------------------------------------------------------------
DATA = task_data()


def task(result: list, tid: int = 7) -> dict[str, Any]:
    return one_annotation_task(result, tid, DATA)


def kp(x: float, y: float, label: str = "crack/tip_a", parent: str | None = None, **extra: Any):
    r: dict[str, Any] = {
        "id": f"k{x}",
        "type": "keypointlabels",
        "from_name": "keypoint",
        "to_name": "image",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        **extra,
    }
    if parent is not None:
        r["parentID"] = parent
    return r


def named(region: dict[str, Any], rid: str) -> dict[str, Any]:
    return {**region, "id": rid}


BIG = named(rect(0, 0, 50, 100, "crack"), "big")  # 0-100 x 0-100 px
SMALL = named(rect(5, 10, 10, 20, "crack"), "small")  # 10-30 x 10-30 px


@pytest.mark.parametrize(
    ("case", "result", "polygons", "expected"),
    [
        (
            "parentID links a keypoint to its region even outside it",
            [BIG, SMALL, kp(90, 90, parent="small")],
            False,
            [(), (("tip_a", 180.0, 90.0),)],
        ),
        (
            "no parentID: the smallest crack region that contains it",
            [BIG, SMALL, kp(10, 20), kp(40, 50, "crack/tip_b")],
            False,
            [(("tip_b", 80.0, 50.0),), (("tip_a", 20.0, 20.0),)],
        ),
        (
            "no parentID and outside every region: the nearest crack region",
            [named(rect(80, 0, 10, 10, "crack"), "far"), SMALL, kp(20, 5)],
            False,
            [(), (("tip_a", 40.0, 5.0),)],
        ),
        (
            "keypoints on a polygon instance in a segment project",
            [named(poly([[10, 10], [30, 5], [20, 40]], "dent"), "p1"), kp(20, 20, "dent/centre")],
            True,
            [(("centre", 40.0, 20.0),)],
        ),
        ("no keypoint: none stored", [BIG], False, []),
    ],
)
def test_pull_keeps_keypoints(case: str, result: list, polygons: bool, expected: list) -> None:
    v = judge_task(task(result), CLASSES, {}, polygons=polygons, keypoints=KP)
    assert v.label is not None, (case, v.rejected)
    got = [tuple((k.name, k.x, k.y) for k in inst) for inst in v.label.keypoints]
    assert got == [tuple(inst) for inst in expected], case
    assert all(k.visibility == 2 for inst in v.label.keypoints for k in inst)


@pytest.mark.parametrize(
    ("case", "result", "message"),
    [
        ("an unknown keypoint label", [BIG, kp(10, 10, "crack/middle")], "'crack/middle'"),
        ("a keypoint of a class without keypoints", [BIG, kp(10, 10, "scratch/x")], "scratch/x"),
        ("out of range", [BIG, kp(10, 100.5)], "outside the image"),
        ("negative", [BIG, kp(-3, 10)], "outside the image"),
        ("non-numeric", [BIG, kp("a", 10)], "must be a number"),
        (
            "no crack region",
            [named(rect(0, 0, 10, 10, "dent"), "d"), kp(1, 1)],
            "no 'crack' region",
        ),
        ("a parent that is not there", [BIG, kp(1, 1, parent="ghost")], "'ghost'"),
        (
            "a parent of another class",
            [named(rect(0, 0, 10, 10, "dent"), "d"), BIG, kp(1, 1, parent="d")],
            "linked to a 'dent' region",
        ),
        ("one name twice on one region", [SMALL, kp(10, 20), kp(11, 21)], "two 'crack/tip_a'"),
        (
            "placed on another image size",
            [BIG, kp(1, 1, original_width=400)],
            "placed on a 400x100 image",
        ),
        ("only keypoints, no region", [kp(1, 1)], "no 'crack' region"),
    ],
)
def test_pull_refuses_bad_keypoints_per_task(case: str, result: list, message: str) -> None:
    v = judge_task(task(result, tid=42), CLASSES, {}, keypoints=KP)
    assert v.label is None and v.rejected is not None, case
    assert v.rejected.task_id == 42
    assert message in str(v.rejected), (case, str(v.rejected))


def test_keypoints_are_ignored_when_none_are_configured() -> None:
    v = judge_task(task([BIG, kp(10, 10, "anything")]), CLASSES, {})
    assert v.label is not None and v.label.keypoints == ()


def test_keypoint_result_round_trip() -> None:
    point = Keypoint("tip_b", 33.0, 71.5)
    r = keypoint_to_ls_result(point, "crack", (200, 100), "k1", parent_id="big")
    assert r["parentID"] == "big" and r["value"]["keypointlabels"] == ["crack/tip_b"]
    v = judge_task(task([BIG, r]), CLASSES, {}, keypoints=KP)
    assert v.label is not None
    (got,) = v.label.keypoints[0]
    assert got.name == "tip_b"
    assert got.x == pytest.approx(33.0, abs=1e-9) and got.y == pytest.approx(71.5, abs=1e-9)


def test_datasets_commands_show_diff_and_export_keypoints(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loop.cli import app

    cfg = _yaml(tmp_path, keypoints={"crack": ["tip_a", "tip_b"]})
    rows = [image(1, [[10, 5, 70, 40]], [2], TIPS), image(3, [[1, 1, 9, 9]], [2], split="val")]
    a = DatasetVersion.create(CLASSES, rows)
    moved = ((Keypoint("tip_a", 21.0, 10.0), TIPS[0][1]),)
    b = a.with_labels([image(1, [[10, 5, 70, 40]], [2], moved)])
    store = DatasetStore(tmp_path / ".defect-loop" / "datasets")
    store.save(a), store.save(b)
    images = tmp_path / ".defect-loop" / "images"
    images.mkdir(parents=True)
    for r in b.rows:
        (images / r.path).write_bytes(b"img")
    runner = CliRunner()
    r = runner.invoke(app, ["datasets", "diff", a.digest[:8], b.digest[:8], "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "images with changed keypoints: 1" in r.output
    assert f"keypoints changed: {sha(1)[:12]}" in r.output
    r = runner.invoke(app, ["datasets", "show", b.digest[:8], "--json", "-c", str(cfg)])
    assert json.loads(r.output)["keypoint_counts"] == {"scratch": 0, "dent": 0, "crack": 2}
    # dent and scratch name no keypoints: no fixed keypoint count, a clear error
    out = tmp_path / "pose"
    r = runner.invoke(app, ["datasets", "export", b.digest[:8], str(out), "--pose", "-c", str(cfg)])
    assert r.exit_code != 0 and "class 'scratch' has no keypoints" in r.output
    cfg.write_text(yaml.safe_dump({"classes": CLASSES, "keypoints": KP}))
    r = runner.invoke(
        app, ["datasets", "export", b.digest[:8], str(tmp_path / "pose2"), "--pose", "-c", str(cfg)]
    )
    assert r.exit_code == 0, r.output
    label = (tmp_path / "pose2" / "train" / "labels" / f"{sha(1)}.txt").read_text()
    assert label == (
        "2 0.200000 0.225000 0.300000 0.350000 0.105000 0.100000 2 0.302500 0.302500 1\n"
    )


def test_pose_labels_ingest_then_export_byte_identical(tmp_path: Path) -> None:
    """Pose label files -> `ingest --pose` -> the version holds the keypoints -> `datasets export
    --pose` writes the same files again."""
    from typer.testing import CliRunner

    from loop.cli import app
    from loop.images import sha256_file
    from loop.project import Project
    from loop.synth import SYNTH_CLASSES, generate, write_dataset

    classes = list(SYNTH_CLASSES)
    keypoints = {c: ["a", "b"] for c in classes}
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": classes, "keypoints": keypoints}))
    data = tmp_path / "data"
    write_dataset(data, 16, seed=2, size=64)
    samples = generate(16, 2, 64)
    slots = pose_slots(classes, keypoints)
    rng = np.random.default_rng(0)
    written: dict[str, str] = {}
    for txt, sample in zip(sorted((data / "labels").glob("*.txt")), samples, strict=True):
        assert txt.stem == sample.name
        det = sample.labels
        kps = tuple(
            tuple(
                Keypoint(n, float(rng.uniform(x1, x2)), float(rng.uniform(y1, y2)), v)
                for n, v in (("a", 2), ("b", 1))
                if rng.random() < 0.7
            )
            for x1, y1, x2, y2 in det.xyxy.tolist()
        )
        text = "".join(f"{ln}\n" for ln in instances_to_yolo_pose_lines(det, kps, slots))
        txt.write_text(text)
        written[txt.stem] = text
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "ingest",
            str(data / "images"),
            "--labels",
            str(data / "labels"),
            "--pose",
            "-c",
            str(cfg),
        ],
    )
    assert r.exit_code == 0, r.output
    project = Project(load_config(cfg))
    version = project.current_version()
    assert version is not None and len(version) == 16 and version.has_keypoints
    out = tmp_path / "out"
    r = runner.invoke(
        app, ["datasets", "export", version.digest[:8], str(out), "--pose", "-c", str(cfg)]
    )
    assert r.exit_code == 0, r.output
    by_sha = {sha256_file(p): p.stem for p in (data / "images").glob("*.png")}
    for row in version.rows:
        exported = (out / row.split / "labels" / f"{row.sha256}.txt").read_text()
        assert exported == written[by_sha[row.sha256]]


HOSTILE = [
    None,
    True,
    "x",
    "",
    [],
    {},
    [1, 2],
    {"a": 1},
    float("nan"),
    float("inf"),
    -1,
    1e308,
    10**30,
]


def test_hostile_keypoint_fields_reject_their_task_never_crash() -> None:
    """Every field of a keypoint region replaced by hostile values (seeded): the pull rules give
    a verdict for the task (a label whose keypoints are valid, or a rejection), never raise."""
    rng = np.random.default_rng(7)
    base = kp(10, 20, parent="small")
    paths = [
        ("value",),
        ("value", "x"),
        ("value", "y"),
        ("value", "keypointlabels"),
        ("parentID",),
        ("original_width",),
        ("original_height",),
        ("id",),
        ("type",),
    ]
    verdicts = {"label": 0, "rejected": 0}
    for _ in range(300):
        region = {**base, "value": dict(base["value"])}
        for path in [paths[i] for i in rng.choice(len(paths), size=2, replace=False)]:
            bad = HOSTILE[int(rng.integers(len(HOSTILE)))]
            target = region["value"] if len(path) == 2 else region
            if isinstance(target, dict):
                target[path[-1]] = bad
        v = judge_task(task([BIG, SMALL, region], tid=3), CLASSES, {}, keypoints=KP)
        assert v.task_id == 3 and (v.label is None) != (v.rejected is None)
        if v.label is not None:
            for inst in v.label.keypoints:
                for k in inst:
                    assert 0 <= k.x <= 200 and 0 <= k.y <= 100 and k.name in {"tip_a", "tip_b"}
            verdicts["label"] += 1
        else:
            verdicts["rejected"] += 1
    assert verdicts["rejected"] > 100 and verdicts["label"] > 10  # both outcomes were reached
