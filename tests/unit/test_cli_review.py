"""`defect-loop review-labels --dry-run` end to end, with YOLO training and prediction faked.

The synthetic set is ingested with one box deleted from one label file; the fake model predicts
the TRUE boxes of every image (from the generator), so the image with the deleted box must be
the top suspect, reported as a missing box (overlooked).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from loop import model
from loop.cli import app
from loop.cli.common import console
from loop.detections import Detections, box_iou
from loop.formats.yolo import detections_to_yolo_lines
from loop.images import sha256_file
from loop.synth import SynthSample, generate, write_dataset

runner = CliRunner()
N, SEED, SIZE = 30, 4, 64


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, str]:
    """A project with N synthetic images ingested; returns the config and the sha256 of the
    image whose label file lost a box."""
    data = tmp_path / "data"
    paths = write_dataset(data, N, seed=SEED, size=SIZE)
    samples = list(generate(N, seed=SEED, size=SIZE))
    victim = next(i for i, s in enumerate(samples) if _isolated_box(s) is not None)
    s = samples[victim]
    drop = _isolated_box(s)
    kept = s.labels[np.arange(len(s.labels)) != drop]
    (data / "labels" / f"{s.name}.txt").write_text(
        "".join(f"{ln}\n" for ln in detections_to_yolo_lines(kept))
    )
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "classes": ["scratch", "pit", "crack", "patch"],
                "split": {"val": 0.3, "test": 0.1},
                "train": {"model": "yolov8n.yaml", "epochs": 1, "imgsz": 64},
            }
        )
    )
    r = runner.invoke(
        app, ["ingest", str(data / "images"), "--labels", str(data / "labels"), "-c", str(cfg)]
    )
    assert r.exit_code == 0, r.output
    return cfg, sha256_file(paths[victim])


def _isolated_box(s: SynthSample) -> int | None:
    if not len(s.labels):
        return None
    iou = box_iou(s.labels.xyxy, s.labels.xyxy)
    np.fill_diagonal(iou, 0.0)
    free = np.flatnonzero(iou.max(axis=1) == 0.0)
    return int(free[0]) if len(free) else None


def _fake_model(monkeypatch: pytest.MonkeyPatch, data: Path) -> list[str]:
    """Fake training that only records the run, fake prediction of each image's true boxes
    (the pool names images by sha256: matched through the written dataset's files)."""
    truth = {
        sha256_file(data / "images" / f"{s.name}.png"): s.labels
        for s in generate(N, seed=SEED, size=SIZE)
    }
    runs: list[str] = []

    def fake_train(data_yaml: Path, out_dir: Path, cfg: Any, ycd: Path, **kw: Any) -> Any:
        runs.append(kw["name"])
        return type("R", (), {"weights": out_dir / kw["name"] / "best.pt"})()

    def fake_predict(weights: Path, images: Iterable[Path], *a: Any, **kw: Any) -> Any:
        out = []
        for p in images:
            t = truth[sha256_file(Path(p))]
            out.append(Detections(t.xyxy, t.class_id, t.image_wh, confidence=np.full(len(t), 0.98)))
        return out

    monkeypatch.setattr(model, "train", fake_train)
    monkeypatch.setattr(model, "predict", fake_predict)
    return runs


def test_dry_run_prints_the_image_with_the_missing_box_first(
    workspace: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg, victim = workspace
    runs = _fake_model(monkeypatch, tmp_path / "data")
    monkeypatch.setattr(console, "_width", 200)  # the test terminal would truncate the table
    out = tmp_path / "suspects.json"
    r = runner.invoke(
        app,
        [
            "review-labels",
            "--dry-run",
            "--folds",
            "3",
            "--top",
            "5",
            "--out",
            str(out),
            "-c",
            str(cfg),
        ],
    )
    assert r.exit_code == 0, r.output
    assert len(runs) == 3 and all("-k3-fold" in name for name in runs)
    doc = json.loads(out.read_text())
    first = doc["suspects"][0]
    assert first["sha256"] == victim and first["rank"] == 1 and first["issue"] == "overlooked"
    assert first["flagged"] is True
    assert not any(s["flagged"] for s in doc["suspects"][1:])
    assert first["source"].endswith(".png") and Path(first["source"]).stem.startswith("synth_")
    lines = [ln for ln in r.output.splitlines() if victim[:12] in ln]
    assert len(lines) == 1 and "overlooked" in lines[0] and "yes" in lines[0]
    assert "cross-fit: fold 3/3" in r.output
    splits = {s["split"] for s in doc["suspects"]}
    assert splits <= {"train", "val"}


def test_a_second_run_on_the_same_version_trains_nothing(
    workspace: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg, victim = workspace
    runs = _fake_model(monkeypatch, tmp_path / "data")
    monkeypatch.setattr(console, "_width", 200)
    doc = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**doc, "label_review": {"folds": 3, "top_k": 2}}))
    first = runner.invoke(app, ["review-labels", "--dry-run", "-c", str(cfg)])
    assert first.exit_code == 0, first.output
    assert len(runs) == 3  # label_review.folds
    second = runner.invoke(app, ["review-labels", "--dry-run", "-c", str(cfg)])
    assert second.exit_code == 0, second.output
    assert len(runs) == 3 and second.output.count("cached predictions") == 3
    assert victim[:12] in second.output
    third = runner.invoke(app, ["review-labels", "--dry-run", "--no-cache", "-c", str(cfg)])
    assert third.exit_code == 0 and len(runs) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "--folds", "50"], "cannot fill 50 folds"),
        ([], "is unreachable"),  # checked before any training
    ],
    ids=["too-few-images", "label-studio-down"],
)
def test_clear_errors_before_any_training(
    workspace: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    cfg, _ = workspace
    doc = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**doc, "labelstudio": {"url": f"http://127.0.0.1:{_closed()}"}}))
    runs = _fake_model(monkeypatch, tmp_path / "data")
    monkeypatch.setattr(console, "_width", 300)
    r = runner.invoke(app, ["review-labels", *args, "-c", str(cfg)])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert runs == []


def test_without_a_dataset_version_it_says_what_to_do(tmp_path: Path) -> None:
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["scratch"]}))
    r = runner.invoke(app, ["review-labels", "--dry-run", "-c", str(cfg)])
    assert r.exit_code == 2 and "no labeled dataset version" in r.output


def _closed() -> int:
    from loop.services import free_port

    return free_port()


def test_help_says_what_it_costs_and_does() -> None:
    r = runner.invoke(app, ["review-labels", "--help"])
    assert r.exit_code == 0
    for text in ("--folds", "--top", "--dry-run", "--no-cache", "trainings", "cached",
                 "Label review", "review:crossfit", "pull"):  # fmt: skip
        assert text in r.output, text
    cycle = runner.invoke(app, ["cycle", "--help"])
    assert "--review-labels" in cycle.output
