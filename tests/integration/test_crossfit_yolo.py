"""`loop.crossfit.project_cross_fit` with real Ultralytics training and prediction (tiny: 2 folds,
1 epoch from yolov8n.yaml on 64 px synthetic images), then cleanlab on its predictions.

Nothing about detection quality is asserted (one epoch from scratch finds ~nothing); this checks
that the real training and prediction entry points plug into cross-fitting: one run per fold,
one prediction per labeled image with confidences and class probabilities of that image's size,
a second run served from the fold cache without training (the same predictions, bit for bit),
and `find_label_errors` accepting them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from loop import model
from loop.config import load_config
from loop.crossfit import project_cross_fit
from loop.label_errors import find_label_errors, label_checks
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration


def test_two_fold_cross_fit_with_real_yolo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path / "d", 16, seed=2, size=64)
    cfg_path = tmp_path / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "classes": list(SYNTH_CLASSES),
                "split": {"val": 0.3, "test": 0.1},
                "train": {"model": "yolov8n.yaml", "epochs": 1, "imgsz": 64, "batch": 4},
            }
        )
    )
    project = Project(load_config(cfg_path))
    project.ingest(tmp_path / "d" / "images", tmp_path / "d" / "labels")
    version, out = project_cross_fit(project, k=2)

    labeled = {r.sha256: r for r in version.rows if r.split != "test"}
    assert set(out) == set(labeled)
    assert {o.fold for o in out.values()} == {0, 1}
    runs = sorted(p.name for p in project.cfg.paths.runs.iterdir())
    assert runs == [f"crossfit-{version.short}-k2-fold0", f"crossfit-{version.short}-k2-fold1"]
    for sha, o in out.items():
        det = o.predictions
        assert det.image_wh == (labeled[sha].width, labeled[sha].height)
        assert det.confidence is not None and det.class_probs is not None
        assert det.class_probs.shape == (len(det), len(SYNTH_CLASSES))

    # Cached: a second run on the same version trains nothing and gives the same predictions.
    def no_training(*a: object, **kw: object) -> None:
        raise AssertionError("the cached folds must not train again")

    monkeypatch.setattr(model, "train", no_training)
    monkeypatch.setattr(model, "predict", no_training)
    _, again = project_cross_fit(project, k=2)
    for sha, o in out.items():
        a, b = o.predictions, again[sha].predictions
        assert a.same_boxes(b) and again[sha].fold == o.fold
        assert np.array_equal(a.confidence, b.confidence)
        assert np.array_equal(a.class_probs, b.class_probs)
    suspects = find_label_errors(
        label_checks(version, {s: o.predictions for s, o in out.items()}), len(SYNTH_CLASSES)
    )
    assert sorted(s.sha256 for s in suspects) == sorted(labeled)
