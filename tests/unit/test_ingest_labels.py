"""Label files are matched to images by relative path, and every label file that is not used is
reported, never dropped or resolved silently (issue 15, finding 4 and the smaller ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config
from loop.errors import ImageError
from loop.project import Project

CLASSES = ["scratch", "pit", "crack"]
SIZE = (40, 30)


def image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(px).save(path)
    return path


def label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def project(tmp_path: Path) -> Project:
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": CLASSES, "workspace": "ws"}))
    return Project(load_config(cfg))


BOX_A = "0 0.5 0.5 0.5 0.5\n"  # scratch, centre
BOX_B = "2 0.25 0.25 0.2 0.2\n"  # crack, top-left


def boxes(p: Project, sha: str) -> list[tuple[int, list[float]]]:
    version = p.current_version()
    assert version is not None
    row = version.by_sha()[sha]
    return [
        (int(c), [round(v, 3) for v in xyxy])
        for xyxy, c in zip(row.boxes.xyxy.tolist(), row.boxes.class_id.tolist(), strict=True)
    ]


def test_same_file_name_in_two_folders_gets_each_folders_label(tmp_path: Path):
    """Finding 4: ``lineA/img1.png`` and ``lineB/img1.png`` were both given the boxes of one
    ``img1.txt`` (matched by stem). Now each reads the label at its own relative path."""
    src, lab = tmp_path / "images", tmp_path / "labels"
    a = image(src / "lineA" / "img1.png", 1)
    b = image(src / "lineB" / "img1.png", 2)
    label(lab / "lineA" / "img1.txt", BOX_A)
    label(lab / "lineB" / "img1.txt", BOX_B)
    p = project(tmp_path)
    report, version = p.ingest(src, lab)
    assert version is not None and len(version) == 2 and report.label_problems == []
    sha = {Path(k).parent.name: v.sha256 for k, v in report.accepted.items()}
    assert boxes(p, sha["lineA"]) == [(0, [10.0, 7.5, 30.0, 22.5])]
    assert boxes(p, sha["lineB"]) == [(2, [6.0, 4.5, 14.0, 10.5])]
    assert {a.parent.name, b.parent.name} == set(sha)


def test_one_flat_label_for_two_different_images_is_an_ambiguity_naming_both(tmp_path: Path):
    src, lab = tmp_path / "images", tmp_path / "labels"
    image(src / "lineA" / "img1.png", 1)
    image(src / "lineB" / "img1.png", 2)
    image(src / "lineB" / "img2.png", 3)
    label(lab / "img1.txt", BOX_A)
    label(lab / "img2.txt", BOX_B)  # flat, but only one image has this name: used
    p = project(tmp_path)
    report, version = p.ingest(src, lab)
    assert version is not None and len(version) == 1  # img2 only
    [problem] = report.label_problems
    assert problem.source == str(lab / "img1.txt")
    assert "ambiguous" in problem.reason
    assert str(src / "lineA" / "img1.png") in problem.reason
    assert str(src / "lineB" / "img1.png") in problem.reason


def test_conflicting_labels_for_one_image_under_two_names_are_reported_not_resolved(
    tmp_path: Path,
):
    src, lab = tmp_path / "images", tmp_path / "labels"
    image(src / "a.png", 1)
    image(src / "copy_of_a.png", 1)  # the same bytes: one pool image
    image(src / "b.png", 2)
    image(src / "copy_of_b.png", 2)
    label(lab / "a.txt", BOX_A)
    label(lab / "copy_of_a.txt", BOX_B)  # disagrees
    label(lab / "b.txt", BOX_B)
    label(lab / "copy_of_b.txt", BOX_B)  # agrees: fine
    p = project(tmp_path)
    report, version = p.ingest(src, lab)
    assert len(p.pool) == 2 and version is not None and len(version) == 1
    [problem] = report.label_problems
    assert "conflicting labels" in problem.reason
    assert str(lab / "a.txt") in problem.reason and str(lab / "copy_of_a.txt") in problem.reason
    sha_a = report.accepted[str(src / "a.png")].sha256
    assert sha_a not in version.by_sha()


def test_label_files_without_an_image_are_reported(tmp_path: Path):
    src, lab = tmp_path / "images", tmp_path / "labels"
    image(src / "a.png", 1)
    label(lab / "a.txt", BOX_A)
    label(lab / "ghost.txt", BOX_B)
    label(lab / "sub" / "a.txt", BOX_B)
    label(lab / "classes.txt", "scratch\npit\ncrack\n")  # a YOLO folder's class list: not a label
    p = project(tmp_path)
    report, version = p.ingest(src, lab)
    assert version is not None and len(version) == 1
    reported = sorted(Path(r.source).relative_to(lab).as_posix() for r in report.label_problems)
    assert reported == ["ghost.txt", "sub/a.txt"]
    assert all("without an image" in r.reason for r in report.label_problems)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("0 0.5 0.5 0.5 0.5\n1 0.5 0.5\n", "line 2: expected 5 fields"),
        ("nan 0.5 0.5 0.5 0.5\n", "line 1: class id nan"),
        ("inf 0.5 0.5 0.5 0.5\n", "line 1: class id inf"),
        ("0 0.5 0.5 0.0 0.5\n", "line 1: box has zero area"),
        ("7 0.5 0.5 0.5 0.5\n", "line 1: class id 7"),
        (b"\xff\xfe\x00bad", "unreadable label file"),
    ],
)
def test_one_bad_label_file_is_reported_with_its_name_and_the_others_are_imported(
    tmp_path: Path, bad, match
):
    src, lab = tmp_path / "images", tmp_path / "labels"
    for i in range(4):
        image(src / f"im{i}.png", i)
        label(lab / f"im{i}.txt", BOX_A)
    bad_file = lab / "im2.txt"
    if isinstance(bad, bytes):
        bad_file.write_bytes(bad)
    else:
        bad_file.write_text(bad)
    p = project(tmp_path)
    report, version = p.ingest(src, lab)
    assert len(p.pool) == 4 and version is not None and len(version) == 3
    [problem] = report.label_problems
    assert problem.source == str(bad_file)
    assert match in problem.reason
    status = p.status()
    assert {"source": str(bad_file), "reason": problem.reason} in status["rejected_files"]


def test_the_cli_prints_label_problems_safely_and_lists_them_in_status(tmp_path: Path):
    src, lab = tmp_path / "images", tmp_path / "labels"
    image(src / "ok.png", 1)
    image(src / "bad[red]x.png", 2)
    label(lab / "ok.txt", BOX_A)
    label(lab / "bad[red]x.txt", "nan 0.5 0.5 0.5 0.5\n")
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": CLASSES, "workspace": "ws"}))
    r = CliRunner().invoke(app, ["ingest", str(src), "--labels", str(lab), "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "1 label files not imported" in r.output
    assert "bad[red]x.txt" in r.output  # printed as written, not swallowed as markup
    r = CliRunner().invoke(app, ["status", "-c", str(cfg)])
    status = json.loads(r.output)
    assert status["labeled_images"] == 1
    assert any("class id nan" in x["reason"] for x in status["rejected_files"])


def test_a_missing_labels_folder_is_an_error(tmp_path: Path):
    image(tmp_path / "images" / "a.png", 1)
    p = project(tmp_path)
    with pytest.raises(ImageError, match=r"labels folder .* does not exist"):
        p.ingest(tmp_path / "images", tmp_path / "nope")
