"""Pull keeps polygons (issue 13, step 3): with polygons kept (``segment`` projects) a Label
Studio polygon region becomes a pixel polygon instance with its box derived from it. Pure rules on
plain dicts, as in test_pull_rules.py, then the wiring from `Project.pull` to the dataset version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ls_json import one_annotation_task, poly, rect, task_data

from loop.config import load_config
from loop.errors import ConfigError, ConversionError
from loop.formats.labelstudio_pull import judge_task
from loop.formats.labelstudio_regions import (
    ls_points_to_ring,
    ls_results_to_instances,
    ring_to_ls_points,
)
from loop.polygons import as_ring, ring_self_intersects

CLASSES = ["scratch", "dent", "crack"]
DATA = task_data()


def task(result: list, tid: int = 7) -> dict[str, Any]:
    return one_annotation_task(result, tid, DATA)


TRI_PCT = [[10, 10], [30, 5], [20, 40]]  # of 200 x 100 px
TRI_PX = [[20, 10], [60, 5], [40, 40]]

# (case, result, expected boxes in px, class ids, expected rings per instance in px)
KEPT = [
    (
        "a polygon: its ring in pixels, its box derived",
        [poly(TRI_PCT)],
        [[20, 5, 60, 40]],
        [1],
        [[TRI_PX]],
    ),
    (
        "a rectangle beside it has no ring",
        [rect(50, 50, 10, 10, "crack"), poly(TRI_PCT, "scratch")],
        [[100, 50, 120, 60], [20, 5, 60, 40]],
        [2, 0],
        [[], [TRI_PX]],
    ),
    ("rectangles only: no polygons at all", [rect(10, 10, 20, 20)], [[20, 10, 60, 30]], [1], []),
    ("no regions: defect-free", [], [], [], []),
    (
        "a closing point repeating the first is dropped",
        [poly([*TRI_PCT, TRI_PCT[0]])],
        [[20, 5, 60, 40]],
        [1],
        [[TRI_PX]],
    ),
    (
        "a concave outline (an L) is kept as drawn",
        [poly([[0, 0], [50, 0], [50, 20], [20, 20], [20, 100], [0, 100]])],
        [[0, 0, 100, 100]],
        [1],
        [[[[0, 0], [100, 0], [100, 20], [40, 20], [40, 100], [0, 100]]]],
    ),
]


@pytest.mark.parametrize(("case", "result", "xyxy", "ids", "rings"), KEPT, ids=[c[0] for c in KEPT])
def test_pull_keeps_polygons(case: str, result: list, xyxy: list, ids: list, rings: list):
    v = judge_task(task(result), CLASSES, {}, polygons=True)
    assert v.rejected is None and v.label is not None, v.rejected
    lab = v.label
    assert np.allclose(lab.detections.xyxy, np.array(xyxy, dtype=float).reshape(-1, 4))
    assert lab.detections.class_id.tolist() == ids
    assert len(lab.polygons) == len(rings)
    for got, want in zip(lab.polygons, rings, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert np.allclose(g, np.array(w, dtype=float))


def test_without_keeping_polygons_a_polygon_stays_its_bounding_box():
    v = judge_task(task([poly(TRI_PCT)]), CLASSES, {})
    assert v.label is not None and v.label.polygons == ()
    assert np.allclose(v.label.detections.xyxy, [[20, 5, 60, 40]])


REFUSED = [
    (
        "a bow-tie crosses itself",
        [poly([[0, 0], [50, 50], [50, 0], [0, 50]])],
        "crosses or touches",
    ),
    (
        "a loop back through a vertex",
        [poly([[0, 0], [40, 0], [20, 20], [40, 40], [0, 40], [20, 20]])],
        "crosses or touches",
    ),
    ("two points", [poly([[0, 0], [50, 50]])], "at least 3"),
    ("three points on a line", [poly([[0, 0], [10, 10], [20, 20]])], "zero area"),
    ("a point outside the image", [poly([[0, 0], [101, 0], [50, 50]])], "outside the image"),
    ("an unknown label", [poly(TRI_PCT, "rust")], "not one of the project's classes"),
    ("non-numeric points", [poly([["a", 0], [1, 1], [2, 0]])], "non-numeric"),
]


@pytest.mark.parametrize(("case", "result", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_polygons_reject_the_task_with_its_id(case: str, result: list, reason: str):
    v = judge_task(task(result, tid=41), CLASSES, {}, polygons=True)
    assert v.label is None and v.rejected is not None
    assert v.rejected.task_id == 41 and reason in v.rejected.reason


@pytest.mark.parametrize(
    ("ring", "crosses"),
    [
        ([[0, 0], [4, 0], [4, 4], [0, 4]], False),
        ([[0, 0], [4, 0], [2, 3]], False),
        ([[0, 0], [4, 0], [4, 4], [2, 1], [0, 4]], False),  # concave
        ([[0, 0], [4, 4], [4, 0], [0, 4]], True),  # bow-tie
        ([[0, 0], [4, 0], [2, 2], [4, 4], [0, 4], [2, 2]], True),  # touches at a vertex
        ([[0, 0], [4, 0], [4, 4], [4, 8], [4, 2], [0, 4]], True),  # an edge runs back over another
        ([[0, 0], [4, 0], [8, 0], [4, 0], [4, 4]], True),  # a zero-width spike
    ],
)
def test_ring_self_intersects_known_answers(ring: list, crosses: bool):
    assert ring_self_intersects(np.array(ring, dtype=float)) is crosses


def test_ls_percent_to_pixel_and_back_round_trips():
    rng = np.random.default_rng(13)
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(16, 4000, size=2))
        k = int(rng.integers(3, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
        radius = rng.uniform(5, 45, size=k)  # star-shaped around the centre: never self-crossing
        pct = np.stack([50 + radius * np.cos(angles), 50 + radius * np.sin(angles)], axis=1)
        ring = ls_points_to_ring(pct.tolist(), (w, h))
        assert ring.shape == (k, 2)
        assert np.allclose(ring, pct / 100 * [w, h], rtol=0, atol=1e-9)
        back = ring_to_ls_points(ring, (w, h))
        assert np.allclose(back, pct, rtol=0, atol=1e-9)
        assert np.allclose(ls_points_to_ring(back, (w, h)), ring, rtol=0, atol=1e-9)


def test_instances_size_from_the_regions_and_refuse_a_missing_one():
    det, polys = ls_results_to_instances([poly(TRI_PCT)], CLASSES)
    assert det.image_wh == (200, 100) and len(polys) == 1
    with pytest.raises(ConversionError):
        ls_results_to_instances("nope", CLASSES)  # type: ignore[arg-type]


# ------------------------------------------------------------------ config and wiring


def test_segment_projects_always_offer_polygons(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "segment", "classes": CLASSES}))
    assert load_config(cfg).labelstudio.polygons is True
    cfg.write_text(yaml.safe_dump({"classes": CLASSES}))
    assert load_config(cfg).labelstudio.polygons is False  # the default is not shared
    cfg.write_text(
        yaml.safe_dump({"task": "segment", "classes": CLASSES, "labelstudio": {"polygons": False}})
    )
    with pytest.raises(ConfigError, match="segment needs polygons"):
        load_config(cfg)


def test_project_pull_writes_polygons_into_the_next_version(tmp_path: Path):
    """`Project.pull` asks the backend to keep polygons in a segment project and the next
    dataset version holds exactly the pulled rings."""
    from loop.datasets import assign_split
    from loop.detections import Detections
    from loop.labeling import PullResult
    from loop.project import Project, ScoredImage
    from loop.simulate import OracleGateway, truth_from_yolo_dir
    from loop.synth import write_dataset

    write_dataset(tmp_path / "d", 12, seed=3, size=48)
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(
        yaml.safe_dump({"task": "segment", "classes": ["scratch", "pit", "crack", "patch"]})
    )
    project = Project(load_config(cfg))
    project.ingest(tmp_path / "d" / "images")
    truth = truth_from_yolo_dir(project.pool, tmp_path / "d" / "labels", 4)
    shas = [s for s in sorted(truth) if assign_split(s, project.cfg.split) != "test"][:3]
    ring = as_ring([[4, 4], [30, 6], [12, 40]])
    asked: list[Any] = []

    class PolygonOracle(OracleGateway):
        def pull(self, project_id: int, class_names: list[str], **kw: Any) -> PullResult:
            asked.append(kw.get("polygons"))
            out = super().pull(project_id, class_names, **kw)
            first = out.labels[0]
            det = Detections(np.array([[4.0, 4.0, 30.0, 40.0]]), np.array([2]), (48, 48))
            out.labels[0] = type(first)(
                **{**first.__dict__, "detections": det, "polygons": ((ring,),)}
            )
            return out

    gw = PolygonOracle(truth)
    ranked = [ScoredImage(s, 1.0, Detections.empty((48, 48))) for s in shas]
    assert project.push(gw, ranked, "m").created == 3
    out = project.pull(gw)
    assert asked == [True] and out.labeled == 3
    version = project.current_version()
    assert version is not None and version.has_polygons
    first = sorted(shas)[0]  # the oracle answers in push order: shas are sorted
    row = version.by_sha()[first]
    assert len(row.polygons) == 1 and np.array_equal(row.polygons[0][0], ring)
    assert row.boxes.class_id.tolist() == [2]
    assert version.mask_counts()["crack"] == 1
