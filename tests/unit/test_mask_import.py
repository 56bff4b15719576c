"""Importing mask PNG folders (issue 13, step 5): pairing masks with images, classes from
folders, and `Project.ingest_masks` / `defect-loop ingest --masks` on a folder the test draws
(holes, a thin crack, several regions, a tiny region dropped with its reason, unusable masks
listed) and on a few real magnetic-tile images (skipped when the dataset is absent)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config
from loop.errors import ConfigError
from loop.mask_import import class_of_image, pair_mask_files, parse_folder_classes
from loop.polygons import rings_to_mask
from loop.project import Project

CLASSES = ["crack", "blowhole"]
MAGNETIC_TILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "magnetic-tile"


def test_pair_mask_files():
    root = Path("/d")
    files = [
        root / "A" / "a.jpg",
        root / "A" / "a.png",  # a's mask
        root / "A" / "b.png",  # an image without a partner: an image
        root / "A" / "c.jpg",
        root / "A" / "c.bmp",
        root / "A" / "c.png",  # claimed by two images: neither
        root / "B" / "a.png",  # another folder: not a's mask
        root / "README.md",
    ]
    out = pair_mask_files(files)
    assert out.masks == {root / "A" / "a.jpg": root / "A" / "a.png"}
    # the ambiguous mask is neither an image nor a mask: it is reported
    assert set(out.images) == set(files) - {root / "A" / "a.png", root / "A" / "c.png"}
    assert [(Path(p.source).name, "2 images" in p.reason) for p in out.problems] == [
        ("c.png", True)
    ]


@pytest.mark.parametrize(
    ("pairs", "expected", "error"),
    [
        ([], {}, None),
        (
            ["MT_Crack=crack", " MT_Blowhole = blowhole "],
            {"MT_Crack": "crack", "MT_Blowhole": "blowhole"},
            None,
        ),
        (["MT_Crack"], None, "FOLDER=CLASS"),
        (["MT_Crack=rust"], None, "not one of the project's classes"),
        (["X=crack", "X=blowhole"], None, "twice"),
    ],
)
def test_parse_folder_classes(pairs, expected, error):
    if error is None:
        assert parse_folder_classes(pairs, CLASSES) == expected
    else:
        with pytest.raises(ConfigError, match=error):
            parse_folder_classes(pairs, CLASSES)


@pytest.mark.parametrize(
    ("rel", "mapping", "expected"),
    [
        ("MT_Crack/Imgs/a.jpg", {"MT_Crack": "crack"}, "crack"),
        ("Crack/a.jpg", {}, "crack"),
        ("BLOWHOLE/x/y/a.jpg", {}, "blowhole"),
        ("MT_Free/Imgs/a.jpg", {}, None),
        ("a.jpg", {}, None),  # no folder: no class
    ],
)
def test_class_of_image(rel: str, mapping, expected):
    assert class_of_image(Path("/d") / rel, Path("/d"), mapping, CLASSES) == expected


def _image(path: Path, seed: int, wh: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (wh[1], wh[0]), dtype=np.uint8))


def _mask(path: Path, m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), m)


def _make_folder(root: Path) -> np.ndarray:
    """A small magnetic-tile-like folder; returns the mask of MT_Crack/Imgs/a."""
    a = np.zeros((30, 40), np.uint8)
    a[2:12, 2:14] = 255
    a[5:8, 5:8] = 0  # a hole
    for i in range(15, 28):
        a[i, i + 5] = 200  # a thin diagonal crack
    a[25:28, 2:6] = 255  # another region
    a[0, 39] = 255  # 1 px: dropped
    _image(root / "MT_Crack" / "Imgs" / "a.jpg", 1)
    _mask(root / "MT_Crack" / "Imgs" / "a.png", a)
    _image(root / "MT_Free" / "Imgs" / "b.jpg", 2)
    _mask(root / "MT_Free" / "Imgs" / "b.png", np.zeros((30, 40), np.uint8))
    _image(root / "Other" / "c.jpg", 3)
    _mask(root / "Other" / "c.png", a)  # a folder without a class
    _image(root / "MT_Crack" / "Imgs" / "d.jpg", 4)
    _mask(root / "MT_Crack" / "Imgs" / "d.png", np.zeros((10, 10), np.uint8))  # wrong size
    _image(root / "MT_Crack" / "Imgs" / "e.jpg", 5)
    _mask(root / "MT_Crack" / "Imgs" / "e.png", (a > 0).astype(np.uint8))  # 0/1 values
    _image(root / "MT_Crack" / "Imgs" / "f.jpg", 6)  # no mask: pool only
    return a


def _project(tmp_path: Path, task: str) -> Project:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"task": task, "classes": CLASSES}))
    return Project(load_config(cfg))


def test_ingest_masks_in_a_segment_project(tmp_path: Path):
    src = tmp_path / "src"
    a = _make_folder(src)
    project = _project(tmp_path, "segment")
    report, version = project.ingest_masks(src, {"MT_Crack": "crack"})
    assert len(report.added) == 6 and report.rejected == []
    assert version is not None and version.has_polygons and len(version) == 2
    by_name = {Path(r.provenance["file"]).name: r for r in version.rows}
    assert set(by_name) == {"a.png", "b.png"}
    row_a, row_b = by_name["a.png"], by_name["b.png"]
    assert len(row_b.boxes) == 0  # an all-zero mask: defect-free
    assert len(row_a.boxes) == 3 and set(row_a.boxes.class_id.tolist()) == {0}
    rebuilt = np.zeros(a.shape, bool)
    for rings in row_a.polygons:
        rebuilt |= rings_to_mask(rings, (40, 30))
    expected = a >= 128
    expected[0, 39] = False
    assert np.array_equal(rebuilt, expected)  # holes and the 1-px crack exactly
    assert "1 px at (39, 0, 40, 1)" in row_a.provenance["dropped_regions"]
    reasons = {Path(p.source).name: p.reason for p in report.label_problems}
    assert "a.png" not in reasons  # imported; only its tiny region was left out
    assert [(Path(d.source).name, d.reason) for d in report.dropped_regions] == [
        ("a.png", "region of 1 px at (39, 0, 40, 1): 1 px, smaller than the minimum of 4 px")
    ]
    assert "1 mask regions dropped" in report.summary
    assert "names no class" in reasons["c.png"] and "--folder-class" in reasons["c.png"]
    assert "10x10 px but its image is 40x30 px" in reasons["d.png"]
    assert "below the threshold 128" in reasons["e.png"]
    assert "b.png" not in reasons
    status = project.status()
    assert any("c.png" in str(r) for r in status["rejected_files"])


def test_ingest_masks_in_a_detect_project_keeps_boxes_only(tmp_path: Path):
    src = tmp_path / "src"
    _make_folder(src)
    _, seg = _project(tmp_path / "s", "segment").ingest_masks(src, {"MT_Crack": "crack"})
    _, det = _project(tmp_path / "d", "detect").ingest_masks(src, {"MT_Crack": "crack"})
    assert seg is not None and det is not None and not det.has_polygons
    for r_seg, r_det in zip(seg.rows, det.rows, strict=True):
        assert r_det.polygons == () and r_seg.boxes.same_boxes(r_det.boxes)


def test_cli_ingest_masks(tmp_path: Path):
    src = tmp_path / "src"
    _make_folder(src)
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"task": "segment", "classes": CLASSES}))
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "ingest",
            str(src),
            "--masks",
            "--folder-class",
            "MT_Crack=crack",
            "--min-area",
            "2",
            "-c",
            str(cfg),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "6 added" in r.output and "labels: dataset version" in r.output
    assert "names no class" in r.output and "dropped" in r.output
    bad = runner.invoke(app, ["ingest", str(src), "--masks", "--labels", str(src), "-c", str(cfg)])
    assert bad.exit_code != 0 and "drop --labels" in bad.output


def test_ingest_a_few_magnetic_tile_images(tmp_path: Path):
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"magnetic-tile dataset not found at {MAGNETIC_TILE.resolve()}")
    src = tmp_path / "mt"
    picked = 0
    for cls in ("MT_Crack", "MT_Blowhole", "MT_Free"):
        for jpg in sorted((MAGNETIC_TILE / cls / "Imgs").glob("*.jpg"))[:3]:
            dest = src / cls / "Imgs"
            dest.mkdir(parents=True, exist_ok=True)
            (dest / jpg.name).symlink_to(jpg)  # read in place, never copied
            (dest / jpg.with_suffix(".png").name).symlink_to(jpg.with_suffix(".png"))
            picked += 1
    project = _project(tmp_path, "segment")
    folders = {"MT_Crack": "crack", "MT_Blowhole": "blowhole"}
    report, version = project.ingest_masks(src, folders, min_area=1)
    assert picked == 9 and len(report.added) == 9 and version is not None and len(version) == 9
    for row in version.rows:
        mask_file = Path(row.provenance["file"])
        m = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
        rebuilt = np.zeros(m.shape, bool)
        for rings in row.polygons:
            rebuilt |= rings_to_mask(rings, (row.width, row.height))
        assert np.array_equal(rebuilt, m >= 128), mask_file
        assert (len(row.boxes) == 0) == ("MT_Free" in str(mask_file))
