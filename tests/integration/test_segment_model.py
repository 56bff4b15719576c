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
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.offline import deny_network
from loop.synth import SYNTH_CLASSES, generate, write_dataset

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

    with deny_network() as attempts:  # nothing may download (weights, fonts, assets)
        fit = project.fit(tracker)
    assert attempts == []
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

    # The lead report shows the mask figures, as the gate judged them.
    from loop.report import collect_report_data

    data = collect_report_data(project, tracker)
    assert data.candidate_map50 == pytest.approx(m["test_mask_map50"])
    assert data.candidate_map50_95 == pytest.approx(m["test_mask_map50_95"])
    assert any(n.startswith("Segment project: every mAP") for n in data.notes)
    assert [p.test_map50 for p in data.curve][-1] == pytest.approx(m["test_mask_map50"])

    # Production scoring: outlines on the shown predictions, mask_stability over TTA views.
    plan = plan_scoring(project, ScoringModels(weights=fit.result.weights, name="seg"))
    assert "tta" in plan.needs
    shas = project.candidates()[:4] or [r.sha256 for r in version.rows[:4]]
    scored = score_batch(project, plan, shas)
    assert [s.sha256 for s in scored] == shas
    assert all(np.isfinite(s.score) and 0.0 <= s.score <= 1.0 for s in scored)
    assert all(s.shown.polygons is not None for s in scored)


def test_ultralytics_training_masks_over_cover_the_exact_labels(tmp_path: Path) -> None:
    """The convention, measured: stored rings are pixel-edge outlines, exact under pixel-centre
    sampling (`loop.polygons.rings_to_mask`). Ultralytics rasterises the exported polygon with
    ``cv2.fillPoly``, which also fills the pixels its edges run along: its training mask holds
    every labeled pixel plus a border about one pixel wide. On these synthetic defects (thin
    scratches and cracks) the IoU of the two is 0.50 at worst, ~0.74 in the median, and above
    0.9 for regions of 1,000 px or more; mask metrics and the model's masks follow Ultralytics'
    (over-covering) masks."""
    from loop.formats.yolo import merge_rings
    from loop.offline import configure_ultralytics
    from loop.polygons import mask_iou

    configure_ultralytics(tmp_path / "yolo", threads=1)
    from ultralytics.data.utils import polygon2mask

    ious, areas = [], []
    for sample in generate(40, seed=1, size=128, defect_free_fraction=0.0):
        for rings, exact in zip(sample.polygons(), sample.masks, strict=True):
            flat = merge_rings(rings).reshape(-1)
            drawn = polygon2mask((128, 128), [flat], color=1, downsample_ratio=1).astype(bool)
            assert (drawn | ~exact).all()  # never misses a labeled pixel
            ious.append(mask_iou(drawn, exact))
            areas.append(int(exact.sum()))
    iou, area = np.array(ious), np.array(areas)
    assert iou.min() >= 0.45 and 0.6 <= float(np.median(iou)) <= 0.85
    assert (iou[area >= 1000] >= 0.9).all() and (area >= 1000).any()


def test_a_checkpoint_of_another_scale_is_refused(tmp_path: Path) -> None:
    """A yolov8s detector cannot seed yolov8n-seg (almost no tensor has the same shape):
    training stops before it starts instead of silently training from scratch."""
    from loop import model
    from loop.config import TrainConfig
    from loop.errors import ModelError
    from loop.offline import configure_ultralytics

    configure_ultralytics(tmp_path / "yolo", threads=1)
    from ultralytics import YOLO

    other = tmp_path / "yolov8s-random.pt"
    YOLO("yolov8s.yaml").save(str(other))
    data = tmp_path / "ds"
    write_dataset(data / "train", 4, seed=1, size=64, polygons=True)
    (data / "data.yaml").write_text(
        yaml.safe_dump(
            {"path": str(data), "train": "train/images", "val": "train/images", "names": CLASSES}
        )
    )
    cfg = TrainConfig(model="yolov8n.yaml", epochs=1, imgsz=64, batch=4)
    with pytest.raises(ModelError, match=r"seeds only \d+ of \d+ backbone tensors"):
        model.train(
            data / "data.yaml",
            tmp_path / "runs",
            cfg,
            tmp_path / "yolo",
            init_weights=other,
            task="segment",
        )


# One seeded segment training after ``draws`` random numbers (the process's random state moved,
# as between the rounds of a replay); prints the weights' path.
_TRAIN_SEGMENT = """
import sys
from pathlib import Path
import torch
from loop import model
from loop.config import TrainConfig
data_yaml, root, name, draws, pretrained = sys.argv[1:]
torch.rand(int(draws))
cfg = TrainConfig(model="yolov8n.yaml", epochs=1, imgsz=64, batch=4, seed=3)
res = model.train(Path(data_yaml), Path(root) / "runs", cfg, Path(root) / "yolo",
                  init_weights=Path(pretrained), name=name, task="segment")
print(res.weights)
"""


@pytest.mark.skipif(
    not PRETRAINED.is_file(),
    reason=f"the COCO-pretrained yolov8n.pt is not at {PRETRAINED}: set $DEFECT_LOOP_YOLOV8N",
)
def test_same_seed_segment_trainings_ignore_the_process_random_state(tmp_path: Path) -> None:
    """The mask head the detector does not seed is initialised from ``train.seed``, not from
    whatever random state the process is in (found: mask mAP50 0.089 vs 0.158 for the same
    round-0 training of the magnetic-tile replay). Each training runs in a fresh interpreter
    that first draws a different number of random numbers. Run one after the other inside the
    test session, the two once differed (from layer 0 on) in a CI run of code that had passed
    there before, as the promotion-gate models did: some state earlier tests leave in the
    process, cause not found. Without the seeding this test fails (checked)."""
    import torch

    from loop.offline import configure_ultralytics

    # torch.load unpickles Ultralytics classes: import Ultralytics configured, or it writes its
    # settings under ~/.config when this test runs alone.
    configure_ultralytics(tmp_path / "yolo", threads=1)

    data = tmp_path / "ds"
    write_dataset(data / "train", 8, seed=2, size=64, polygons=True)
    (data / "data.yaml").write_text(
        yaml.safe_dump(
            {"path": str(data), "train": "train/images", "val": "train/images", "names": CLASSES}
        )
    )
    weights = []
    for name, draws in (("a", 0), ("b", 97)):
        args = [str(data / "data.yaml"), str(tmp_path), name, str(draws), str(PRETRAINED)]
        out = subprocess.run(
            [sys.executable, "-c", _TRAIN_SEGMENT, *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        path = Path(out.stdout.strip().splitlines()[-1])
        weights.append(torch.load(path, weights_only=False)["model"].float().state_dict())
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
