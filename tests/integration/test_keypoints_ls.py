"""Keypoints and brush masks through a real Label Studio 1.23.2 (session fixture `ls_server`)
into dataset versions (issue 13, items 6 and 3):

- a ``segment`` project with ``keypoints:`` and ``labelstudio.brush`` gets a labeling config
  with ``KeyPointLabels`` and ``BrushLabels`` that the server accepts;
- a labeler adds a polygon, a brush region (label-studio-sdk's RLE) and keypoints, one linked to
  its region by ``parentID`` (the server stores and exports it), one unlinked; the pulled
  version holds exactly those instances, rings and keypoints;
- moving one keypoint gives a new version whose diff reports exactly that keypoint;
- an unknown keypoint label and an empty brush reject their own tasks, with the task id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.dataset_diff import diff_versions
from loop.datasets import assign_split
from loop.detections import Detections
from loop.formats.labelstudio_regions import keypoint_to_ls_result, mask_to_ls_brush_result
from loop.keypoints import Keypoint
from loop.labelstudio.brush import mask_to_rle
from loop.polygons import rings_to_mask
from loop.project import Project, ScoredImage
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

CLASSES = list(SYNTH_CLASSES)
SIZE = 64
KEYPOINTS = {"crack": ["tip_a", "tip_b"], "pit": ["centre"]}


def _project(ls_server: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Project, list[str]]:
    root = Path(ls_server.document_root) / "keypoints"
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": "keypoints",
        "task": "segment",
        "classes": CLASSES,
        "keypoints": KEYPOINTS,
        "workspace": "ws",
        "labelstudio": {
            "url": ls_server.url,
            "document_root": str(ls_server.document_root),
            "project_title": "defect-loop keypoints and brush",
            "progress": False,
            "brush": True,
        },
        "select": {"batch_size": 50},
    }
    path = root / "defect-loop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    write_dataset(root / "synth", 12, seed=5, size=SIZE)
    project = Project(load_config(path))
    report, _ = project.ingest(root / "synth" / "images", None)
    cfg_split = project.cfg.split
    shas = sorted(
        p.sha256
        for p in report.accepted.values()
        if assign_split(p.sha256, cfg_split) != "test"  # test images are never pushed
    )
    return project, shas


def _poly(points: list[list[float]], label: str, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "type": "polygonlabels",
        "from_name": "polygon",
        "to_name": "image",
        "original_width": SIZE,
        "original_height": SIZE,
        "value": {"points": points, "polygonlabels": [label]},
    }


def _mask() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[30:50, 10:30] = True
    m[36:42, 16:22] = False  # a hole
    m[55, 40:63] = True  # a 1-pixel crack, another part of the same region
    return m


def test_keypoints_and_brush_from_a_real_server_reach_the_version(ls_server, monkeypatch):
    project, shas = _project(ls_server, monkeypatch)
    a, b, c = shas[:3]
    ranked = [
        ScoredImage(s, 3.0 - i, Detections.empty((SIZE, SIZE))) for i, s in enumerate(shas[:3])
    ]
    with project.gateway() as gw:
        summary = project.push(gw, ranked, "m1")
        assert summary.failed == 0, summary.failures
        ids = summary.task_ids
        info = gw.project_info(project.state.ls_project_id)
        assert info["brush"] and info["keypoints"] and info["polygons"]
        assert "crack/tip_a" in info["label_config"] and "pit/centre" in info["label_config"]
        # the editor may nest only a crack's keypoints under a crack region
        assert 'groupcancontain="crack/tip_a,crack/tip_b"' in info["label_config"]

        # Task a: a crack polygon (upper left), a crack brush (lower half), a pit polygon.
        # tip_a is linked to the polygon by parentID although it lies inside the brush region
        # (only the link can put it there); tip_b is unlinked and lies in the brush's pixels;
        # centre is unlinked and inside the pit.
        crack_poly = _poly([[5, 5], [40, 5], [20, 30]], "crack", "cp")  # percent
        brush = mask_to_ls_brush_result(mask_to_rle(_mask()), "crack", (SIZE, SIZE), "cb")
        pit = _poly([[70, 70], [90, 70], [80, 90]], "pit", "pp")
        tip_a = keypoint_to_ls_result(
            Keypoint("tip_a", 12.0, 45.0), "crack", (SIZE, SIZE), "k1", "cp"
        )
        tip_b = keypoint_to_ls_result(Keypoint("tip_b", 25.0, 33.0), "crack", (SIZE, SIZE), "k2")
        centre = keypoint_to_ls_result(Keypoint("centre", 51.2, 48.64), "pit", (SIZE, SIZE), "k3")
        result_a = [crack_poly, brush, pit, tip_a, tip_b, centre]
        ann_a = gw.annotate_results(ids[a], result_a)
        # Task b: a keypoint label the config does not have. Task c: an empty brush.
        bad_kp = keypoint_to_ls_result(Keypoint("middle", 5, 5), "crack", (SIZE, SIZE), "k9")
        gw.annotate_results(ids[b], [_poly([[5, 5], [40, 5], [20, 30]], "crack", "x"), bad_kp])
        empty = mask_to_ls_brush_result(
            mask_to_rle(np.zeros((SIZE, SIZE), bool)), "crack", (SIZE, SIZE), "e"
        )
        gw.annotate_results(ids[c], [empty])
        stored = {t["id"]: t for t in gw.list_tasks(project.state.ls_project_id)}
        stored_kp = [r for r in stored[ids[a]]["annotations"][0]["result"] if r["id"] == "k1"]
        assert stored_kp[0].get("parentID") == "cp"  # the server keeps the link

        first = project.pull(gw)

    assert first.labeled == 1
    assert sorted(first.rejected) == sorted(
        [
            f"Label Studio task {ids[b]}: UnknownLabelError: keypoint label 'crack/middle' is not "
            f"one of the configured keypoints ['pit/centre', 'crack/tip_a', 'crack/tip_b']",
            f"Label Studio task {ids[c]}: ConversionError: brush 'e' is empty (no painted pixel); "
            "paint the defect or delete the region",
        ]
    )
    version = project.current_version()
    assert version is not None and version.digest == first.new_version
    row = version.by_sha()[a]
    crack, pit_id = CLASSES.index("crack"), CLASSES.index("pit")
    assert row.boxes.class_id.tolist() == [crack, crack, pit_id]
    np.testing.assert_allclose(
        row.polygons[0][0], [[3.2, 3.2], [25.6, 3.2], [12.8, 19.2]], atol=1e-6
    )
    brush_fill = rings_to_mask(row.polygons[1], (SIZE, SIZE))
    assert np.array_equal(brush_fill, _mask())  # the painted pixels, exactly
    np.testing.assert_allclose(row.boxes.xyxy[1], [10, 30, 63, 56])
    assert [(k.name, k.x, k.y, k.visibility) for k in row.keypoints[0]] == [
        ("tip_a", pytest.approx(12.0), pytest.approx(45.0), 2)
    ]
    assert [(k.name, k.x, k.y) for k in row.keypoints[1]] == [
        ("tip_b", pytest.approx(25.0), pytest.approx(33.0))
    ]
    assert [(k.name, k.x, k.y) for k in row.keypoints[2]] == [
        ("centre", pytest.approx(51.2), pytest.approx(48.64))
    ]
    assert version.keypoint_counts()["crack"] == 2 and version.keypoint_counts()["pit"] == 1
    assert set(version.by_sha()) == {a}  # the rejected tasks added nothing

    # The labeler moves tip_b by 2 px: a new version, its diff names exactly that keypoint.
    moved = keypoint_to_ls_result(Keypoint("tip_b", 27.0, 33.0), "crack", (SIZE, SIZE), "k2")
    with project.gateway() as gw:
        gw.delete_annotation(ann_a)
        gw.annotate_results(ids[a], [crack_poly, brush, pit, tip_a, moved, centre])
        second = project.pull(gw)
    assert second.new_version is not None and second.new_version != first.new_version
    d = diff_versions(version, project.store.load(second.new_version))
    assert d.rekeyed == (a,) and d.relabeled == (a,) and d.remasked == ()
    assert d.keypoints_added == {cls: int(cls == "crack") for cls in CLASSES}
    assert d.keypoints_removed == {cls: int(cls == "crack") for cls in CLASSES}
    assert sum(d.boxes_added.values()) == sum(d.boxes_removed.values()) == 0
