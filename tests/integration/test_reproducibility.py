"""The same dataset version, config and seed reproduce the same test metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.config import ProjectConfig, TrainConfig
from loop.model import evaluate, train
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

# Measured with bench/reproducibility.py: two runs from scratch on CPU give identical metrics;
# the tolerance only absorbs float formatting.
TOLERANCE = 1e-6


def test_same_version_config_seed_same_metrics(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(data, 40, seed=5, size=64)
    cfg = ProjectConfig(classes=list(SYNTH_CLASSES), workspace=tmp_path / "ws")
    project = Project(cfg)
    _, version = project.ingest(data / "images", data / "labels")
    assert version is not None and version.split_counts()["test"] > 0
    data_yaml = project.export(version)
    tcfg = TrainConfig(imgsz=64, epochs=2, batch=8, seed=3)
    results = []
    for name in ("a", "b"):
        run = train(data_yaml, tmp_path / "runs", tcfg, cfg.paths.yolo_config, name=name)
        results.append(
            evaluate(run.weights, data_yaml, "test", 64, cfg.paths.yolo_config, list(cfg.classes))
        )
    a, b = results
    for field in ("map50", "map50_95", "precision", "recall"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), abs=TOLERANCE), field
    assert a.per_class_ap50_95 == pytest.approx(b.per_class_ap50_95, abs=TOLERANCE)
    assert a.confusion_matrix == b.confusion_matrix
