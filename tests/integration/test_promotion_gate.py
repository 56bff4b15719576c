"""Real (tiny) YOLO training: the paired gate calls two models that differ only by their seed
noise and a real improvement an improvement; the per-image statistics of one evaluation pass
reproduce Ultralytics' own figures exactly; the record step end to end with real MLflow.

The seed test fine-tunes the COCO-pretrained yolov8n (``../shared/models/yolov8n.pt``, or
``$DEFECT_LOOP_YOLOV8N``) on synthetic defects, so that both models detect well (test mAP50
about 0.8) and still differ: it skips without the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from loop import model
from loop.config import load_config
from loop.evaluation import BootstrapSettings, box_metrics, paired_bootstrap, paired_gate
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PRETRAINED = Path(
    os.environ.get("DEFECT_LOOP_YOLOV8N") or REPO.parent / "shared" / "models" / "yolov8n.pt"
)
CLASSES = list(SYNTH_CLASSES)
SIZE = 128
SETTINGS = BootstrapSettings(resamples=1000, confidence=0.95, seed=0)


def _split_dataset(root: Path, sizes: dict[str, int], seed: int = 3) -> Path:
    """Synthetic defects written as a YOLO dataset with train / val / test folders."""
    src = root / "synth"
    write_dataset(src, sum(sizes.values()), seed=seed, size=SIZE)
    images = sorted((src / "images").glob("*.png"))
    i = 0
    for split, n in sizes.items():
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True)
        for p in images[i : i + n]:
            shutil.copy(p, root / split / "images" / p.name)
            shutil.copy(src / "labels" / f"{p.stem}.txt", root / split / "labels" / f"{p.stem}.txt")
        i += n
    data = {
        "path": str(root),
        **{split: str(root / split / "images") for split in sizes},
        "names": dict(enumerate(CLASSES)),
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


_TRAIN = """
import sys
from pathlib import Path
from loop import model
from loop.config import TrainConfig
data_yaml, root, ycd, name, seed, epochs, size, weights = sys.argv[1:]
cfg = TrainConfig(model="yolov8n.yaml", imgsz=int(size), epochs=int(epochs), batch=16, seed=int(seed))
res = model.train(Path(data_yaml), Path(root) / "runs", cfg, Path(ycd), init_weights=Path(weights), name=name)
print(res.weights)
"""


def _train_in_fresh_process(
    data_yaml: Path, root: Path, ycd: Path, name: str, seed: int, epochs: int
) -> Path:
    """Train in a new interpreter: a seeded training is bit-identical from run to run in a
    fresh process (checked twice: test mAP50-95 0.53518 and 0.50367 both times), but inside
    the test session it was not (once the seed-1 model came out 0.07 worse), so what earlier
    tests left in the process must not decide this test's models."""
    args = [str(data_yaml), str(root), str(ycd), name, str(seed), str(epochs), str(SIZE)]
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN, *args, str(PRETRAINED)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def seed_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three fine-tunes on the same 80 images: seeds 0 and 1 for 12 epochs, and seed 0 for
    1 epoch (a model that has barely started), all evaluated on the same 60 test images."""
    if not PRETRAINED.is_file():
        pytest.skip(f"COCO-pretrained yolov8n not found at {PRETRAINED}")
    root = tmp_path_factory.mktemp("seeds")
    data_yaml = _split_dataset(root, {"train": 80, "val": 16, "test": 60})
    ycd = root / "ultralytics"
    out: dict[str, Any] = {"data_yaml": data_yaml, "ycd": ycd}
    for name, seed, epochs in (("s0", 0, 12), ("s1", 1, 12), ("weak", 0, 1)):
        weights = _train_in_fresh_process(data_yaml, root, ycd, name, seed, epochs)
        ev = model.evaluate(weights, data_yaml, "test", SIZE, ycd, CLASSES)
        ev2, matches = model.evaluate_matches(weights, data_yaml, "test", SIZE, ycd, CLASSES)
        assert ev2 is ev  # the same evaluation pass, not a second one
        out[name] = (ev, matches)
    return out


def test_statistics_reproduce_ultralytics_figures(seed_models: dict[str, Any]) -> None:
    for name in ("s0", "s1", "weak"):
        ev, m = seed_models[name]
        assert m.n_images == ev.n_images == 60
        mine = box_metrics(m)
        assert mine.map50 == pytest.approx(ev.map50, abs=1e-9)
        assert mine.map50_95 == pytest.approx(ev.map50_95, abs=1e-9)
        assert mine.precision == pytest.approx(ev.precision, abs=1e-9)
        assert mine.recall == pytest.approx(ev.recall, abs=1e-9)
        for c, cls in enumerate(CLASSES):
            if ev.n_instances[cls]:
                assert mine.ap50_95[c] == pytest.approx(ev.per_class_ap50_95[cls], abs=1e-9)
        assert m.n_targets().tolist() == [ev.n_instances[c] for c in CLASSES]
        # The concatenated statistics through Ultralytics' ap_per_class say the same.
        ref = model.ultralytics_box_metrics(
            m.tp, m.conf, m.pred_cls.astype(float), m.target_cls.astype(float)
        )
        assert ref["map50_95"] == pytest.approx(ev.map50_95, abs=1e-9)


def test_gate_calls_seed_noise_noise(seed_models: dict[str, Any]) -> None:
    (ev0, m0), (ev1, m1) = seed_models["s0"], seed_models["s1"]
    assert ev0.map50 > 0.5 and ev1.map50 > 0.5, "both models must detect well"
    assert ev0.map50_95 != ev1.map50_95, "the seeds must give different models"
    for cand, champ in ((m1, m0), (m0, m1)):
        comp = paired_bootstrap(cand, champ, CLASSES, SETTINGS)
        g = paired_gate(comp, tolerance=0.0, max_class_drop=0.05, champion_version="1")
        assert g.verdict == "noise", g.reason
        assert not g.promoted, g.reason
        assert g.difference.lo < 0 < g.difference.hi
    # The old point-estimate rule promotes whichever seed happened to score higher.
    from loop.tracking import gate

    def metrics(ev: Any) -> dict[str, float]:
        return {"test_map50_95": ev.map50_95}

    old = [
        gate(metrics(a), metrics(b), CLASSES, 0.0, 0.05).promoted
        for a, b in ((ev1, ev0), (ev0, ev1))
    ]
    assert sorted(old) == [False, True]


def test_gate_calls_a_real_improvement_an_improvement(seed_models: dict[str, Any]) -> None:
    (ev_weak, weak), (ev0, m0) = seed_models["weak"], seed_models["s0"]
    assert ev0.map50_95 > ev_weak.map50_95 + 0.1
    comp = paired_bootstrap(m0, weak, CLASSES, SETTINGS)
    g = paired_gate(comp, tolerance=0.0, max_class_drop=0.05, champion_version="1")
    assert g.verdict == "improvement" and g.promoted, g.reason
    back = paired_gate(paired_bootstrap(weak, m0, CLASSES, SETTINGS), 0.0, 0.05, "2")
    assert back.verdict == "worse" and not back.promoted


def test_record_step_with_real_models_and_mlflow(tmp_path: Path) -> None:
    """Two rounds through Project.fit / Project.record: the second is gated against the
    champion, which is downloaded from MLflow and evaluated on the same test images."""
    from loop.project import Project
    from loop.report import collect_report_data
    from loop.tracking import TAG, Tracker

    synth = tmp_path / "synth"
    write_dataset(synth, 60, seed=5, size=64)
    cfg_path = tmp_path / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "classes": CLASSES,
                "workspace": "ws",
                "train": {"imgsz": 64, "epochs": 1, "batch": 8},
                "split": {"val": 0.2, "test": 0.3},
                "evaluation": {"resamples": 200},
            }
        )
    )
    cfg = load_config(cfg_path)
    project, tracker = Project(cfg), Tracker(cfg)
    _, version = project.ingest(synth / "images", synth / "labels")
    assert version is not None and version.split_counts()["test"] > 5
    first = project.record(tracker, project.fit(tracker))
    assert first.promoted and first.reason.startswith("first model: no champion yet (test mAP50")
    rec = json.loads((cfg.workspace / "evaluation.json").read_text())
    assert rec["model_version"] == first.model_version and rec["gate"] is None
    second = project.record(tracker, project.fit(tracker))
    run = tracker.client.get_run(second.run_id)
    m, tags = run.data.metrics, run.data.tags
    assert m["test_map50_lo"] <= m["test_map50_hi"] and "test_map50" in m
    assert {"gate_diff_map50_95_lo", "gate_diff_map50_95_hi", "compared_test_map50"} <= set(m)
    assert tags[TAG + "gate_verdict"] in {"improvement", "noise", "worse"}
    assert tags[TAG + "compared_to"] == first.model_version
    assert "200 resamples, 95%, seed 0" in tags[TAG + "bootstrap"]
    assert f"vs champion v{first.model_version}" in tags[TAG + "promotion_reason"]
    assert isinstance(json.loads(tags[TAG + "test_split_warnings"]), list)
    rec = json.loads((cfg.workspace / "evaluation.json").read_text())
    assert rec["round"] == 2 and rec["gate"]["verdict"] == tags[TAG + "gate_verdict"]
    assert rec["model_version"] == (
        second.model_version if second.promoted else first.model_version
    )
    status = project.status()["test_split"]
    assert status["images"] == version.split_counts()["test"]
    assert status["map50_halfwidth"] is not None and status["champion"] == rec["model_version"]
    data = collect_report_data(project, tracker)
    assert data.candidate_map50_ci is not None and data.gate_verdict == rec["gate"]["verdict"]
    assert [p.map50_lo is not None for p in data.curve] == [True, True]
    assert data.map50_halfwidth is not None and data.map50_halfwidth >= 0
