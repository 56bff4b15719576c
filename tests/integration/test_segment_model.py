"""Segment projects with a real (tiny) segmentation model (issue 13, step 4): yolov8n-seg seeded
from the COCO detector, mask metrics logged to real MLflow, the promotion gate on mask mAP,
predictions with outlines and the mask-aware strategy through the one scoring path.

Needs the COCO-pretrained ``yolov8n.pt`` (``../shared/models/`` or ``$DEFECT_LOOP_YOLOV8N``);
skips without it. 1 epoch at 64 px: the figures are near 0, so the test checks where they come
from (mask matches, mask keys), never how good they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PRETRAINED = Path(
    os.environ.get("DEFECT_LOOP_YOLOV8N") or REPO.parent / "shared" / "models" / "yolov8n.pt"
)
CLASSES = list(SYNTH_CLASSES)


@pytest.mark.skipif(
    not PRETRAINED.is_file(),
    reason=f"the COCO-pretrained yolov8n.pt is not at {PRETRAINED}: set $DEFECT_LOOP_YOLOV8N",
)
def test_segment_rounds_train_masks_and_gate_on_mask_map(tmp_path: Path) -> None:
    from loop.project import Project
    from loop.scoring import ScoringModels, plan_scoring, score_batch
    from loop.tracking import TAG, Tracker, class_metric

    synth = tmp_path / "synth"
    write_dataset(synth, 60, seed=5, size=64, polygons=True)
    cfg_path = tmp_path / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "classes": CLASSES,
                "task": "segment",
                "workspace": "ws",
                "train": {"imgsz": 64, "epochs": 1, "batch": 8, "weights": str(PRETRAINED)},
                "split": {"val": 0.2, "test": 0.3},
                "evaluation": {"resamples": 200},
                "select": {"strategy": "mask_stability", "tta": ["hflip"]},
            }
        )
    )
    cfg = load_config(cfg_path)
    project, tracker = Project(cfg), Tracker(cfg)
    _, version = project.ingest(synth / "images", synth / "labels")
    assert version is not None and version.split_counts()["test"] > 5
    assert any(r.polygons and any(r.polygons) for r in version.rows)

    fit = project.fit(tracker)
    t = fit.result.transfer
    # The detector seeded the whole backbone and most of the rest (all but the head's
    # class and mask branches).
    assert t is not None and t.backbone_transferred == t.backbone_total > 0
    assert t.transferred / t.total > 0.7
    assert fit.test is not None and fit.test.has_masks and fit.result.val.has_masks
    first = project.record(tracker, fit)
    assert first.promoted
    assert first.reason.startswith("first model: no champion yet (test mask mAP50")
    run = tracker.client.get_run(first.run_id)
    m, params = run.data.metrics, run.data.params
    for key in ("test_mask_map50", "test_mask_map50_95", "val_mask_map50", "test_map50"):
        assert key in m
    for c in CLASSES:
        assert class_metric("test", "mask_ap50_95", c) in m
    assert m["test_mask_map50"] == pytest.approx(fit.test.mask_map50)
    assert m["test_mask_map50_lo"] <= m["test_mask_map50_hi"]
    assert params["backbone_transferred"] == f"{t.backbone_transferred}/{t.backbone_total}"
    rec = json.loads((cfg.workspace / "evaluation.json").read_text())
    # The record's figures are the mask figures, from the mask matches of the same pass.
    assert rec["map50"][0] == pytest.approx(fit.test.mask_map50, abs=1e-9)
    assert rec["map50_95"][0] == pytest.approx(fit.test.mask_map50_95, abs=1e-9)

    second = project.record(tracker, project.fit(tracker))
    run = tracker.client.get_run(second.run_id)
    m, tags = run.data.metrics, run.data.tags
    assert {"gate_diff_mask_map50_95", "compared_test_mask_map50"} <= set(m)
    assert not any(k.startswith("gate_diff_map50") for k in m)
    assert tags[TAG + "promotion_reason"].startswith("test mask mAP50-95 ")
    assert f"vs champion v{first.model_version}" in tags[TAG + "promotion_reason"]

    # Production scoring: outlines on the shown predictions, mask_stability over TTA views.
    plan = plan_scoring(project, ScoringModels(weights=fit.result.weights, name="seg"))
    assert "tta" in plan.needs
    shas = project.candidates()[:4] or [r.sha256 for r in version.rows[:4]]
    scored = score_batch(project, plan, shas)
    assert [s.sha256 for s in scored] == shas
    assert all(np.isfinite(s.score) and 0.0 <= s.score <= 1.0 for s in scored)
    assert all(s.shown.polygons is not None for s in scored)
