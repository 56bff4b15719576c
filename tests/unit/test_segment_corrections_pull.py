"""Issue 13 in pull and report (segment projects): the prediction a labeler saw comes back with
its polygons, correction analytics match it to the submitted polygons by mask IoU, the
annotation log keeps every annotator's polygons and keypoints (old log lines still read), and
the report's disagreement thumbnails draw the outlines. Pure rules on plain dicts, as in
test_pull_rules.py, then the wiring from `Project.pull` to corrections.json."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ls_json import one_annotation_task, poly, rect, task_data

from loop.annotation_log import (
    AnnotationRecord,
    TaskOutcome,
    append_outcomes,
    json_to_outcome,
    outcome_to_json,
    read_outcomes,
)
from loop.corrections import CorrectionInput, build_corrections
from loop.detections import Detections
from loop.errors import DatasetError
from loop.formats.labelstudio_pull import judge_task
from loop.keypoints import Keypoint
from loop.polygons import as_ring

CLASSES = ["scratch", "dent", "crack"]
DATA = task_data()
USERS = {1: "ann@x", 2: "bob@x"}

# An L-shaped suggestion (percent of 200 x 100 px) and the labeler's version of it: the inner
# corner moved out. The box stays (0, 0, 100, 100) px, so box IoU says "accepted" (1.0) while
# the masks differ: L = 5,200 px, the moved outline 7,280 px (on the pixel grid) holding
# it, IoU 5,200 / 7,280 = 0.714.
L_PCT = [[0, 0], [50, 0], [50, 20], [20, 20], [20, 100], [0, 100]]
L_MOVED = [[0, 0], [50, 0], [50, 20], [35, 50], [20, 100], [0, 100]]
TRI_PCT = [[60, 50], [90, 55], [70, 90]]


def _scored(region: dict[str, Any], rid: str, score: float) -> dict[str, Any]:
    return {**region, "id": rid, "score": score}


def _task(result: list, prediction: list | None, tid: int = 7, **extra: Any) -> dict[str, Any]:
    if prediction is not None:
        extra["prediction"] = {"model_version": "seg-1", "result": prediction}
    return one_annotation_task(result, tid, DATA, lead_time=3.0, **extra)


PREDICTION = [
    _scored(poly(L_PCT, "crack"), "p0", 0.9),
    _scored(poly(TRI_PCT, "dent"), "p1", 0.4),
    _scored(rect(80, 5, 10, 10, "scratch"), "r0", 0.3),
]
# The labeler moves the L's inner corner, deletes the triangle and keeps the rectangle.
SUBMITTED = [
    {**poly(L_MOVED, "crack"), "id": "p0"},
    {**rect(80, 5, 10, 10, "scratch"), "id": "r0"},
]


def test_segment_pull_keeps_the_predicted_polygons_with_their_scores() -> None:
    v = judge_task(_task(SUBMITTED, PREDICTION), CLASSES, USERS, polygons=True)
    assert v.rejected is None and v.label is not None, v.rejected
    lab = v.label
    pred = lab.prediction
    assert pred is not None and lab.prediction_model_version == "seg-1"
    assert pred.class_id.tolist() == [2, 1, 0]
    assert pred.confidence is not None and pred.confidence.tolist() == [0.9, 0.4, 0.3]
    np.testing.assert_allclose(pred.xyxy, [[0, 0, 100, 100], [120, 50, 180, 90], [160, 5, 180, 15]])
    assert len(lab.prediction_polygons) == 3 and lab.prediction_polygons[2] == ()
    np.testing.assert_allclose(lab.prediction_polygons[0][0], np.array(L_PCT) * [2, 1])
    np.testing.assert_allclose(lab.prediction_polygons[1][0], np.array(TRI_PCT) * [2, 1])


def test_detect_pull_reads_the_prediction_as_before() -> None:
    """Without polygons kept, a prediction's polygons are not boxes of it (unchanged rule)."""
    v = judge_task(_task(SUBMITTED, PREDICTION), CLASSES, USERS)
    assert v.label is not None and v.label.prediction is not None
    assert v.label.prediction.class_id.tolist() == [0]
    assert v.label.prediction_polygons == ()


def test_corrections_from_the_pulled_polygons_match_by_mask_iou() -> None:
    lab = judge_task(_task(SUBMITTED, PREDICTION), CLASSES, USERS, polygons=True).label
    assert lab is not None and lab.prediction is not None
    item = CorrectionInput(
        lab.sha256,
        lab.task_id,
        lab.prediction,
        lab.detections,
        lab.lead_time,
        predicted_rings=lab.prediction_polygons,
        final_rings=lab.polygons,
    )
    doc = build_corrections([item], CLASSES)
    (image,) = doc["images"]
    assert image["match"] == "mask"
    # the moved L: adjusted by mask IoU (box IoU alone would call it accepted)
    assert doc["per_class"]["crack"] == dict(
        accepted=0, adjusted=1, relabeled=0, removed=0, added=0
    )
    assert doc["per_class"]["dent"]["removed"] == 1  # the deleted triangle
    assert doc["per_class"]["scratch"]["accepted"] == 1  # the rectangle, by box IoU
    assert image["disagreement"] == pytest.approx(1 - (5200 / 7280 + 1.0) / 3, abs=1e-6)
    assert image["predicted_rings"][2] == [] and image["final_rings"][1] == []
    np.testing.assert_allclose(image["predicted_rings"][0][0], np.array(L_PCT) * [2, 1])
    np.testing.assert_allclose(image["final_rings"][0][0], np.array(L_MOVED) * [2, 1])
    # box-only: the document has no ring keys (as before polygons existed)
    boxes = build_corrections(
        [CorrectionInput("b" * 64, 8, lab.prediction, lab.detections)], CLASSES
    )
    assert "predicted_rings" not in boxes["images"][0] and boxes["images"][0]["match"] == "box"
    assert boxes["per_class"]["crack"]["accepted"] == 1


def test_project_pull_writes_mask_corrections(tmp_path: Path) -> None:
    """`Project.pull` hands the prediction's and the label's polygons to the analytics."""
    from loop.config import load_config
    from loop.datasets import assign_split
    from loop.labeling import PullResult
    from loop.project import Project, ScoredImage
    from loop.simulate import OracleGateway, truth_from_yolo_dir
    from loop.synth import write_dataset

    write_dataset(tmp_path / "d", 12, seed=3, size=48)
    cfg = tmp_path / "defect-loop.yaml"
    classes = ["scratch", "pit", "crack", "patch"]
    cfg.write_text(yaml.safe_dump({"task": "segment", "classes": classes}))
    project = Project(load_config(cfg))
    project.ingest(tmp_path / "d" / "images")
    truth = truth_from_yolo_dir(project.pool, tmp_path / "d" / "labels", 4)
    shas = [s for s in sorted(truth) if assign_split(s, project.cfg.split) != "test"][:2]
    shown = as_ring([[4, 4], [30, 4], [30, 40], [4, 40]])
    kept = as_ring([[4, 4], [30, 4], [30, 40], [20, 40], [20, 20], [4, 20]])  # a corner cut out

    class Oracle(OracleGateway):
        def pull(self, project_id: int, class_names: list[str], **kw: Any) -> PullResult:
            out = super().pull(project_id, class_names, **kw)
            first = out.labels[0]
            box = np.array([[4.0, 4.0, 30.0, 40.0]])
            out.labels[0] = type(first)(
                **{
                    **first.__dict__,
                    "detections": Detections(box, np.array([2]), (48, 48)),
                    "polygons": ((kept,),),
                    "prediction": Detections(box, np.array([2]), (48, 48), confidence=[0.7]),
                    "prediction_polygons": ((shown,),),
                }
            )
            return out

    gw = Oracle(truth)
    ranked = [ScoredImage(s, 1.0, Detections.empty((48, 48))) for s in shas]
    assert project.push(gw, ranked, "m").created == 2
    out = project.pull(gw)
    assert out.new_version is not None
    doc = json.loads(project.cfg.paths.corrections(out.new_version).read_text())
    by_sha = {im["sha256"]: im for im in doc["images"]}
    im = by_sha[sorted(shas)[0]]
    assert im["match"] == "mask"
    # box IoU 1.0, mask IoU (936 - 320) / 936 = 0.658: adjusted, not accepted
    assert doc["per_class"]["crack"]["adjusted"] >= 1
    assert im["disagreement"] == pytest.approx(1 - (26 * 36 - 16 * 20) / (26 * 36), abs=1e-6)


# ------------------------------------------------------------------ the annotation log

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
OLD_LINE = {
    "agreement": None,
    "annotations": [
        {
            "annotation_id": 11,
            "annotator": "ann@x",
            "boxes": [["crack", 0.0, 0.0, 100.0, 100.0]],
            "ground_truth": False,
            "lead_time": 3.0,
            "updated_at": "2026-01-01T00:00:00+00:00",
        }
    ],
    "image_wh": [200, 100],
    "pulled_at": WHEN.isoformat(),
    "reference": [["crack", 0.0, 0.0, 100.0, 100.0]],
    "sha256": "a" * 64,
    "status": "single",
    "task_id": 7,
    "version": "v1",
}


def _outcome(record: AnnotationRecord) -> TaskOutcome:
    return TaskOutcome(7, "a" * 64, WHEN, "single", (record,), record.boxes, "v1")


def test_an_old_log_line_still_reads_as_boxes_only(tmp_path: Path) -> None:
    path = tmp_path / "annotation-log.jsonl"
    path.write_text(json.dumps(OLD_LINE, sort_keys=True) + "\n")
    (o,) = read_outcomes(path, CLASSES)
    (rec,) = o.annotations
    assert rec.polygons == () and rec.keypoints == ()
    assert rec.boxes.class_id.tolist() == [2]
    # ... and writes back exactly as it was written
    assert outcome_to_json(o, CLASSES) == OLD_LINE


def test_polygons_and_keypoints_round_trip_losslessly(tmp_path: Path) -> None:
    ring = as_ring(np.array(L_MOVED, dtype=float) * [2, 1] + 0.123456789)
    rec = AnnotationRecord(
        "ann@x",
        11,
        Detections(np.array([[0.1, 0.1, 100.1, 100.1], [160, 5, 180, 15]]), [2, 0], (200, 100)),
        3.0,
        WHEN,
        polygons=((ring,), ()),
        keypoints=((Keypoint("tip_a", 12.5, 40.25), Keypoint("tip_b", 1.0, 2.0, 1)), ()),
    )
    path = tmp_path / "annotation-log.jsonl"
    append_outcomes(path, [_outcome(rec)], CLASSES)
    line = json.loads(path.read_text())
    assert line["annotations"][0]["keypoints"] == [
        [["tip_a", 12.5, 40.25, 2], ["tip_b", 1.0, 2.0, 1]],
        [],
    ]
    (back,) = read_outcomes(path, CLASSES)
    (got,) = back.annotations
    assert np.array_equal(got.polygons[0][0], ring) and got.polygons[1] == ()
    assert got.keypoints == rec.keypoints


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("polygons", [[[[0, 0], [10, 0], [0, 10]]], []], "1 boxes but 2 entries of polygons"),
        ("keypoints", [[["tip", 500, 5, 2]]], "outside"),
        ("polygons", [[[[0, 0], [10, 10]]]], "at least 3"),
    ],
)
def test_a_malformed_polygon_or_keypoint_entry_is_refused(key: str, value: Any, match: str) -> None:
    line = json.loads(json.dumps(OLD_LINE))
    line["annotations"][0][key] = value
    with pytest.raises(DatasetError, match=match):
        json_to_outcome(line, CLASSES)


def test_pull_records_each_annotators_polygons_and_keypoints() -> None:
    kp = {
        "id": "k1",
        "type": "keypointlabels",
        "from_name": "keypoint",
        "to_name": "image",
        "original_width": 200,
        "original_height": 100,
        "parentID": "p0",
        "value": {"x": 10.0, "y": 50.0, "width": 0.5, "keypointlabels": ["crack/tip_a"]},
    }
    t = _task([*SUBMITTED, kp], PREDICTION)
    other = {**t["annotations"][0], "id": 2, "completed_by": 2, "result": [poly(L_PCT, "crack")]}
    other["updated_at"] = "2025-12-31T00:00:00Z"
    t["annotations"].append(other)
    v = judge_task(t, CLASSES, USERS, polygons=True, keypoints={"crack": ["tip_a"]})
    assert v.label is not None, v.rejected
    recs = {r.annotator: r for r in v.label.annotations}
    assert [k.name for k in recs["ann@x"].keypoints[0]] == ["tip_a"]
    assert recs["ann@x"].keypoints[1] == ()
    assert recs["ann@x"].keypoints == v.label.keypoints
    np.testing.assert_allclose(recs["ann@x"].polygons[0][0], np.array(L_MOVED) * [2, 1])
    np.testing.assert_allclose(recs["bob@x"].polygons[0][0], np.array(L_PCT) * [2, 1])
    assert recs["bob@x"].keypoints == ()


# ------------------------------------------------------------------ report thumbnails


def _image(path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(60, 200, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


def _disagreement(image: Path | None, with_rings: bool) -> Any:
    from loop.report import Box, Disagreement

    sq = ((10.0, 12.0), (60.0, 12.0), (60.0, 50.0), (10.0, 50.0))
    hole = ((30.0, 25.0), (40.0, 25.0), (40.0, 35.0), (30.0, 35.0))
    return Disagreement(
        "a" * 64,
        "a.png",
        0.5,
        predicted=(
            Box(10, 12, 60, 50, "crack", 0.83, rings=(sq, hole) if with_rings else ()),
            Box(70, 20, 110, 70, "pit", None),
        ),
        final=(Box(12, 10, 64, 52, "crack", rings=(sq,) if with_rings else ()),),
        image_path=image,
        size=(128, 96),
    )


# sha256 of the PNGs that loop/report/thumbnails.py of main at 18876a4 (boxes only) drew for
# `_disagreement(..., with_rings=False)`: a box-only thumbnail must stay byte for byte the same.
BOX_ONLY_SHA256 = {
    "grey canvas": "6f72fe39d89509f6ffe491e0aa864e8393efca93b6596c89f6d9400aa1406143",
    "image": "7867ce8154d5703e1bbf85e3e765e7607f899074920de86dec0cec2e7ee767e7",
}


@pytest.mark.parametrize("case", sorted(BOX_ONLY_SHA256))
def test_box_only_thumbnails_are_unchanged(case: str, tmp_path: Path) -> None:
    from loop.report import thumbnail_png

    image = _image(tmp_path / "a.png") if case == "image" else None
    png = thumbnail_png(_disagreement(image, with_rings=False))
    assert hashlib.sha256(png).hexdigest() == BOX_ONLY_SHA256[case]


def test_outlines_are_drawn_as_masks(tmp_path: Path) -> None:
    from PIL import Image

    from loop.report import thumbnail_png

    image = _image(tmp_path / "a.png")
    boxes = np.asarray(Image.open(io.BytesIO(thumbnail_png(_disagreement(image, False)))))
    masks = np.asarray(Image.open(io.BytesIO(thumbnail_png(_disagreement(image, True)))))
    assert boxes.shape == masks.shape
    s = 300 / 128  # THUMB_PX on the long side
    inside = (int(20 * s), int(20 * s))  # (row, col): inside both outlines, not in the hole
    in_hole = (int(30 * s), int(35 * s))  # inside the final square, in the predicted hole
    outside = (int(80 * s), int(120 * s))
    diff = masks.astype(int) - boxes.astype(int)
    assert np.abs(diff[inside]).sum() > 30  # tinted by both fills
    assert np.abs(diff[in_hole]).sum() > 0  # the final fill only: the hole is not predicted
    assert np.abs(diff[in_hole]).sum() < np.abs(diff[inside]).sum()
    assert diff[outside].tolist() == [0, 0, 0]  # outside every outline: the image as it was
