"""Issue 13 end to end: a ``segment`` project with keypoints goes init -> ingest (a mask folder in
magnetic-tile's layout) -> cycle -> a labeler corrects the polygon pre-annotations in a real Label
Studio (moves a vertex, deletes a region, adds a keypoint) -> cycle -> report, with real MLflow
(SQLite), Prefect's test harness and a tiny yolov8n-seg trained from the COCO detection
checkpoint (``../shared/models/yolov8n.pt``; the architecture's random weights when absent).

The next dataset version must hold exactly what the labeler submitted for that image and nothing
else may change; the correction analytics must match the suggestions by mask IoU; the annotation
log must keep the keypoint; the report must be written with its mask figures and overlays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from loop.annotation_log import read_outcomes
from loop.config import load_config
from loop.formats.labelstudio_regions import keypoint_to_ls_result, ls_points_to_ring
from loop.keypoints import Keypoint
from loop.offline import deny_network
from loop.polygons import rings_to_mask
from loop.project import Project

pytestmark = pytest.mark.integration

CLASSES = ["crack", "blowhole"]
KEYPOINTS = {"crack": ["tip_a", "tip_b"], "blowhole": ["centre"]}
SIZE = 96
PRETRAINED = (
    Path(os.environ["DEFECT_LOOP_YOLOV8N"])
    if os.environ.get("DEFECT_LOOP_YOLOV8N")
    else Path(__file__).resolve().parents[3] / "shared" / "models" / "yolov8n.pt"
)


def _tile(rng: np.random.Generator, cls: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A grey textured tile with one dark defect of ``cls`` (None: defect-free) and its 0/255
    mask (``(SIZE, SIZE)`` uint8 each)."""
    img = rng.normal(150, 8, (SIZE, SIZE))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if cls == "blowhole":
        cx, cy, r = rng.uniform(25, 70), rng.uniform(25, 70), rng.uniform(7, 12)
        mask[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 255
    elif cls == "crack":
        x0, y0 = rng.uniform(10, 30), rng.uniform(10, 85)
        x1, y1 = rng.uniform(65, 85), rng.uniform(10, 85)
        d = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / np.hypot(x1 - x0, y1 - y0)
        mask[(d <= 2.0) & (xx >= x0) & (xx <= x1)] = 255
    img[mask > 0] -= 90
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _write_tiles(root: Path, n_masked: int, n_pool: int) -> None:
    """``root/tiles/MT_<Class>/Imgs/<stem>.jpg`` with ``<stem>.png`` masks beside them (two
    all-zero masks per class: defect-free images), and ``root/pool/*.jpg`` without labels."""
    rng = np.random.default_rng(13)
    for folder, cls in (("MT_Crack", "crack"), ("MT_Blowhole", "blowhole")):
        out = root / "tiles" / folder / "Imgs"
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n_masked):
            img, mask = _tile(rng, None if i < 2 else cls)
            Image.fromarray(img).save(out / f"{cls}{i:02d}.jpg", quality=95)
            Image.fromarray(mask).save(out / f"{cls}{i:02d}.png")
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for i in range(n_pool):
        img, _ = _tile(rng, CLASSES[i % 2])
        Image.fromarray(img).save(pool / f"p{i:02d}.jpg", quality=95)


@pytest.fixture(scope="module")
def prefect(prefect_harness: None) -> None:
    """Flows run against the session's Prefect test harness (tests/conftest.py)."""


@pytest.fixture(scope="module")
def segment_config(ls_server: Any) -> Iterator[Path]:
    """init (CLI) a segment project, then the edits a user makes to its YAML."""
    from loop.cli import app

    root = Path(ls_server.document_root) / "segment-cycle"
    root.mkdir(parents=True, exist_ok=True)
    _write_tiles(root, n_masked=12, n_pool=12)
    cfg_path = root / "defect-loop.yaml"
    args = ["init", "--classes", ",".join(CLASSES), "--task", "segment", "-c", str(cfg_path)]
    if PRETRAINED.is_file():
        args += ["--weights", str(PRETRAINED)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(cfg_path.read_text())
    assert doc["task"] == "segment"
    doc["name"] = "segment-cycle"
    doc["workspace"] = "ws"
    doc["keypoints"] = KEYPOINTS
    doc["labelstudio"] = {
        "url": ls_server.url,
        "document_root": str(ls_server.document_root),
        "project_title": "defect-loop segment cycle test",
        "progress": False,
    }
    doc["train"].update(
        {"imgsz": 64, "epochs": 1, "finetune_epochs": 1, "min_iterations": 0, "batch": 8}
    )
    # A 1-epoch model is sure of nothing: every image keeps its 5 strongest candidates and the
    # labeler sees them all, so there are outlines to move and delete.
    doc["select"] = {
        "strategy": "entropy",
        "batch_size": 4,
        "candidate_conf": 0.5,
        "min_candidates": 5,
        "preannotation_conf": 1e-9,
    }
    doc["advice"] = {"preannotation_min_ap50": 0.0}
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    old = os.environ.get("DEFECT_LOOP_LABELSTUDIO__API_TOKEN")
    os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = ls_server.token
    yield cfg_path
    if old is None:
        os.environ.pop("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", None)
    else:
        os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = old


def _keep_fields(region: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "type", "from_name", "to_name", "original_width", "original_height", "value")
    return {k: region[k] for k in keys if k in region}


def _move_vertex(region: dict[str, Any], k: int, dx: float) -> dict[str, Any]:
    """``region`` (a polygon) with vertex ``k`` moved ``dx`` percent along x."""
    r = {
        **region,
        "value": {**region["value"], "points": [list(p) for p in region["value"]["points"]]},
    }
    x = r["value"]["points"][k][0]
    r["value"]["points"][k][0] = x + dx if x + dx <= 99.0 else x - dx
    return r


def _same_row(a: Any, b: Any) -> bool:
    if (a.path, a.split, a.width, a.height) != (b.path, b.split, b.width, b.height):
        return False
    if a.boxes.class_id.tolist() != b.boxes.class_id.tolist():
        return False
    if not np.array_equal(a.boxes.xyxy, b.boxes.xyxy) or len(a.polygons) != len(b.polygons):
        return False
    for ra, rb in zip(a.polygons, b.polygons, strict=True):
        if len(ra) != len(rb) or not all(np.array_equal(x, y) for x, y in zip(ra, rb, strict=True)):
            return False
    return a.keypoints == b.keypoints


def test_segment_project_full_cycle(prefect: None, segment_config: Path, ls_server: Any) -> None:
    from flows.cycle import cycle_flow
    from loop.cli import app

    root = segment_config.parent
    with deny_network() as attempts:
        # ingest: the mask folder as labels (CLI, as a user would), then unlabeled images.
        r = CliRunner().invoke(
            app,
            [
                "ingest",
                str(root / "tiles"),
                "--masks",
                "--folder-class",
                "MT_Crack=crack",
                "--folder-class",
                "MT_Blowhole=blowhole",
                "-c",
                str(segment_config),
            ],
        )
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["ingest", str(root / "pool"), "-c", str(segment_config)])
        assert r.exit_code == 0, r.output
        project = Project(load_config(segment_config))
        seed = project.current_version()
        assert seed is not None and len(seed) == 24
        assert len(project.pool) == 36
        # every defect became a polygon instance; the two all-zero masks per class, defect-free
        assert sum(len(row.boxes) == 0 for row in seed.rows) == 4
        assert all(all(len(p) > 0 for p in row.polygons) for row in seed.rows if len(row.boxes))

        first = cycle_flow(str(segment_config), pull=True)
        assert first.pull is None  # no Label Studio project yet
        assert first.train is not None and first.train.promoted
        assert first.push.created == 4

        project = Project(load_config(segment_config))
        gw = project.gateway()
        pid = project.state.ls_project_id
        tasks = gw.list_tasks(pid)
        assert len(tasks) == 4

        def polygons(t: dict[str, Any]) -> list[dict[str, Any]]:
            return [r for r in t["predictions"][0]["result"] if r["type"] == "polygonlabels"]

        with_polys = [t for t in tasks if len(polygons(t)) >= 2]
        assert with_polys, "the segmentation model's pushed suggestions carry >= 2 outlines"
        task = with_polys[0]
        sha = task["data"]["sha256"]
        regions = [_keep_fields(r) for r in task["predictions"][0]["result"]]
        poly_at = [i for i, r in enumerate(regions) if r["type"] == "polygonlabels"]
        moved_i, deleted_i = poly_at[0], poly_at[1]
        moved = _move_vertex(regions[moved_i], 0, 2.0)  # ~2 px at 96 px
        cls = moved["value"]["polygonlabels"][0]
        name = KEYPOINTS[cls][0]
        ring = ls_points_to_ring(moved["value"]["points"], (SIZE, SIZE))
        kx, ky = float(ring[:, 0].mean()), float(ring[:, 1].mean())
        keypoint = keypoint_to_ls_result(
            Keypoint(name, kx, ky), cls, (SIZE, SIZE), "kp1", parent_id=moved["id"]
        )
        submitted = [
            moved if i == moved_i else r for i, r in enumerate(regions) if i != deleted_i
        ] + [keypoint]
        gw.annotate_results(task["id"], submitted)

        second = cycle_flow(str(segment_config), pull=True)
        assert second.pull is not None and second.pull.labeled == 1
        assert second.pull.new_version is not None and second.pull.parent == seed.digest
        assert second.train is not None

        # The next version holds exactly what the labeler submitted, and nothing else changed.
        project = Project(load_config(segment_config))
        version = project.current_version()
        assert version is not None and version.digest == second.pull.new_version
        rows, before = version.by_sha(), seed.by_sha()
        assert set(rows) == set(before) | {sha}
        assert all(_same_row(rows[s], before[s]) for s in before)
        row = rows[sha]
        kept = [r for r in submitted if r["type"] != "keypointlabels"]
        assert row.boxes.class_id.tolist() == [
            CLASSES.index(r["value"][r["type"]][0]) for r in kept
        ]
        for got, r in zip(row.polygons, kept, strict=True):
            if r["type"] == "polygonlabels":
                want = ls_points_to_ring(r["value"]["points"], (SIZE, SIZE))
                assert len(got) == 1
                np.testing.assert_allclose(got[0], want, atol=1e-6)
            else:
                assert got == ()
        at = kept.index(moved)
        np.testing.assert_allclose(row.polygons[at][0], ring, atol=1e-6)  # the moved vertex
        assert [(k.name, k.x, k.y, k.visibility) for k in row.keypoints[at]] == [
            (name, pytest.approx(kx), pytest.approx(ky), 2)
        ]
        assert sum(len(k) for k in row.keypoints) == 1

        # Correction analytics matched the suggestions by mask IoU.
        doc = json.loads(project.cfg.paths.corrections(version.digest).read_text())
        (image,) = doc["images"]
        assert image["sha256"] == sha and image["match"] == "mask"
        totals = {
            k: sum(c[k] for c in doc["per_class"].values())
            for k in ("accepted", "adjusted", "relabeled", "removed", "added")
        }
        assert totals["removed"] == 1 and totals["added"] == totals["relabeled"] == 0
        assert totals["accepted"] + totals["adjusted"] == len(kept)
        before_ring = ls_points_to_ring(regions[moved_i]["value"]["points"], (SIZE, SIZE))
        m0 = rings_to_mask((before_ring,), (SIZE, SIZE))
        m1 = rings_to_mask((ring,), (SIZE, SIZE))
        moved_iou = (m0 & m1).sum() / max((m0 | m1).sum(), 1)
        assert totals["adjusted"] == (1 if moved_iou < 0.9 else 0)
        assert len(image["predicted_rings"]) == len(regions)
        assert len(image["final_rings"]) == len(kept)

        # The annotation log keeps the labeler's keypoint.
        (outcome,) = read_outcomes(project.cfg.paths.annotation_log, CLASSES)
        (record,) = outcome.annotations
        assert [(k.name, k.x, k.y) for inst in record.keypoints for k in inst] == [
            (name, pytest.approx(kx), pytest.approx(ky))
        ]
        assert len(record.polygons) == len(kept)

        # The lead report: written, with mask figures and the corrected image's overlay.
        assert second.report is not None
        html, md = second.report
        assert html.exists() and md.exists()
        text = html.read_text()
        assert "measured on instance masks" in text
        assert "round 2" in md.read_text()
        from loop.report import collect_report_data
        from loop.tracking import Tracker

        data = collect_report_data(project, Tracker(project.cfg))
        (dis,) = [d for d in data.disagreements if d.sha256 == sha]
        assert sum(bool(b.rings) for b in dis.predicted) == len(poly_at)
        assert sum(bool(b.rings) for b in dis.final) == len(poly_at) - 1

    assert attempts == [], f"non-loopback connections attempted: {attempts}"
