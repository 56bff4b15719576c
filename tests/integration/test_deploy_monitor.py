"""Deploy and monitor end to end: a tiny YOLO champion (real training, real MLflow on SQLite),
its bundle scored in a process where MLflow cannot even be imported, production moves and
rollback, the monitor flow under Prefect's test harness (alert state and event, MLflow metrics
and tags, restarts), and the push to a real Label Studio serving the queued images first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from loop import model
from loop.bundle import REFERENCE_FILE, load_bundle
from loop.config import load_config
from loop.deploy import deploy
from loop.monitor import read_windows
from loop.project import Project
from loop.review_queue import ReviewQueue
from loop.synth import SYNTH_CLASSES, write_dataset
from loop.tracking import Tracker

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness(prefect_harness: None) -> None:
    """Flows run against the session's Prefect test harness (tests/conftest.py)."""


@pytest.fixture(scope="module")
def trained(ls_server: Any) -> Iterator[Path]:
    """A project below Label Studio's document root with a champion: 90 labeled synthetic
    images (about 27 held out), yolov8n trained 2 epochs at 64 px."""
    root = Path(ls_server.document_root) / "deploy-test"
    synth = root / "synth"
    write_dataset(synth, 90, seed=21, size=64)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "deploy-test",
                "classes": list(SYNTH_CLASSES),
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": "defect-loop deploy test",
                },
                "train": {"imgsz": 64, "epochs": 2, "batch": 8, "threads": 2},
                "select": {"batch_size": 40},
                "deploy": {"min_reference": 10},
                "monitor": {"window_size": 20, "permutations": 1000, "queue_per_window": 4},
            }
        )
    )
    old = os.environ.get("DEFECT_LOOP_LABELSTUDIO__API_TOKEN")
    os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = ls_server.token
    cfg = load_config(cfg_path)
    project = Project(cfg)
    project.ingest(synth / "images", synth / "labels")
    tracker = Tracker(cfg)
    project.record(tracker, project.fit(tracker))
    assert tracker.champion() is not None
    yield cfg_path
    if old is None:
        os.environ.pop("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", None)
    else:
        os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = old


_SCORE_WITHOUT_MLFLOW = """
import json, sys
sys.modules["mlflow"] = None  # any `import mlflow` now raises ImportError
from pathlib import Path
from loop.bundle import load_bundle
bundle = load_bundle(Path(sys.argv[1]))
out = []
for det, emb in bundle.score([Path(p) for p in sys.argv[3:]], Path(sys.argv[2])):
    out.append({"conf": det.confidence.tolist(), "probs": det.class_probs.tolist(), "emb": emb.tolist()})
print(json.dumps(out))
"""


def _entropy(probs: list[list[float]]) -> float:
    from loop.uncertainty import box_entropy

    return float(box_entropy(np.array(probs)).max()) if probs else 0.0


def test_deploy_builds_a_bundle_that_scores_without_mlflow_like_the_champion(
    trained: Path, tmp_path: Path
) -> None:
    cfg = load_config(trained)
    project, tracker = Project(cfg), Tracker(cfg)
    out = deploy(project, tracker, moved_by="ana@line3", reason="first")
    champ = tracker.champion()
    assert champ is not None and out.detector_version == champ.version
    assert tracker.production_version() == out.bundle_version
    assert out.production is not None and out.production.moved_by == "ana@line3"

    bundle = load_bundle(out.bundle_dir)  # verifies every sha256
    spec = json.loads((out.bundle_dir / "bundle.json").read_text())
    assert spec["classes"] == list(SYNTH_CLASSES) and spec["imgsz"] == 64
    assert spec["class_map"] == {str(i): c for i, c in enumerate(SYNTH_CLASSES)}
    assert spec["defect_conf"] == cfg.select.preannotation_conf
    assert {"pad_value", "stride", "layout"} <= set(spec["preprocessing"])
    card = bundle.card
    assert card["model"]["run_id"] == champ.run_id
    version = project.current_version()
    assert version is not None and card["dataset"]["digest"] == version.digest
    assert card["dataset"]["n_images"] == len(version) == 90
    assert set(card["test_metrics"]["per_class"]) == set(SYNTH_CLASSES)
    assert set(card["files"]) == {"bundle.json", "model.onnx", REFERENCE_FILE}
    assert "sha256" in (out.bundle_dir / "model_card.md").read_text()
    held = sum(1 for r in version.rows if r.split != "train")
    assert card["reference"]["images"] == held and len(bundle.reference().features) == held

    # Copied anywhere, the bundle scores in a process that cannot import MLflow ...
    copy = shutil.copytree(out.bundle_dir, tmp_path / "shipped")
    images = sorted((trained.parent / "synth" / "images").iterdir())[:12]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _SCORE_WITHOUT_MLFLOW,
            str(copy),
            str(tmp_path / "rt"),
            *map(str, images),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = json.loads(proc.stdout.strip().splitlines()[-1])
    # ... and gives the champion's scores (its torch weights through the loop's predict).
    reference = list(
        model.predict(
            champ.weights,
            images,
            cfg.train.imgsz,
            cfg.select.candidate_conf,
            cfg.paths.yolo_config,
            len(SYNTH_CLASSES),
            min_candidates=cfg.select.min_candidates,
        )
    )
    assert len(shipped) == len(reference) == 12
    # The embedding: [average of layer 15 (64), average of layer 21 (256)] for yolov8n; the
    # second part is what the loop's torch `embed` computes.
    assert [(p["layer"], p["pool"], p["channels"]) for p in spec["embedding_parts"]] == [
        (15, "avg", 64),
        (21, "avg", 256),
    ]
    torch_emb = model.embed(champ.weights, images, cfg.train.imgsz, cfg.paths.yolo_config)
    np.testing.assert_allclose(
        np.array([g["emb"] for g in shipped])[:, 64:], torch_emb, rtol=1e-3, atol=1e-5
    )
    for got, want in zip(shipped, reference, strict=True):
        assert len(got["emb"]) == bundle.spec.embedding_dim == 320
        assert len(got["conf"]) == len(want)
        np.testing.assert_allclose(sorted(got["conf"]), sorted(want.confidence.tolist()), atol=1e-3)
        assert abs(_entropy(got["probs"]) - _entropy(want.class_probs.tolist())) < 1e-3

    # tampering is caught
    (copy / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(Exception, match="does not match its model card"):
        load_bundle(copy)


def test_a_second_deploy_int8_and_a_rollback(trained: Path) -> None:
    cfg = load_config(trained)
    tracker = Tracker(cfg)
    before = tracker.production_version()
    assert before is not None
    int8 = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"int8": True})})
    out = deploy(Project(int8), Tracker(int8), moved_by="bo@line3")
    assert tracker.production_version() == out.bundle_version != before
    shipped = load_bundle(out.bundle_dir)
    assert (
        shipped.spec.scoring_model == "model.int8.onnx" and shipped.spec.fp32_model == "model.onnx"
    )
    assert "model.int8.onnx" in shipped.card["files"]
    assert len(shipped.reference().features) == shipped.card["reference"]["images"]
    move = tracker.rollback_production("cy@qa", "new bundle flags everything")
    assert (move.version, move.previous) == (before, out.bundle_version)
    prod = tracker.production()
    assert prod is not None and prod.version == before
    registered = tracker.client.get_model_version(tracker.bundle_model, before)
    assert load_bundle(prod.path).digest == registered.tags["bundle_digest"]  # the first bundle
    assert load_bundle(prod.path).spec.scoring_model == "model.onnx"
    assert [m.action for m in tracker.production_history()][-3:] == ["deploy", "deploy", "rollback"]
    # The same from the command line.
    from typer.testing import CliRunner

    from loop.cli import app

    r = CliRunner().invoke(app, ["deploy", "history", "-c", str(trained)])
    assert r.exit_code == 0, r.output
    assert (
        "rollback" in r.output
        and "cy@qa" in r.output
        and f"production now: bundle v{before}" in r.output
    )
    r = CliRunner().invoke(app, ["deploy", "verify", str(out.bundle_dir)])
    assert r.exit_code == 0 and "files match the model card" in r.output
    image = sorted((trained.parent / "synth" / "images").iterdir())[0]
    r = CliRunner().invoke(
        app,
        [
            "deploy",
            "score",
            str(out.bundle_dir),
            str(image),
            "--workdir",
            str(trained.parent / "rt"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["image"] == str(image)


def _camera_change(src: Path, dst: Path) -> None:
    """Out of focus and brighter: a Gaussian blur (sigma 2) and +40 grey levels."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        im = cv2.imread(str(p)).astype(np.float64)
        im = cv2.GaussianBlur(im, (0, 0), 2.0) + 40
        cv2.imwrite(str(dst / p.name), np.clip(im, 0, 255).astype(np.uint8))


def _stripes(src: Path, dst: Path) -> None:
    """Dark stripes across every image, 6 px apart."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        im = cv2.imread(str(p)).astype(np.float64)
        im[::6] *= 0.2
        cv2.imwrite(str(dst / p.name), np.clip(im, 0, 255).astype(np.uint8))


def _alert_events(name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from flows.monitor import ALERT_EVENT

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[ALERT_EVENT])), limit=50)
    return [e for e in page.events if e.resource.id == f"defect-loop.project.{name}"]


def test_monitor_alerts_on_a_camera_change_not_on_clean_images(
    trained: Path, harness: None, tmp_path: Path
) -> None:
    from flows.monitor import monitor_flow

    cfg = load_config(trained)
    line = tmp_path / "line"
    clean = write_dataset(tmp_path / "clean", 40, seed=77, size=64)
    shutil.copytree(clean[0].parent, line / "day1")
    state = monitor_flow(str(trained), str(line), return_state=True)
    assert state.is_completed() and state.name == "Completed"
    out = state.result()
    assert out.scan.new == 40 and [w.alert for w in out.windows] == [False, False]

    shifted = write_dataset(tmp_path / "shifted", 20, seed=78, size=64)
    _camera_change(shifted[0].parent, line / "day2")
    state = monitor_flow(str(trained), str(line), return_state=True)
    assert state.is_completed() and state.name == "Drift alert"
    out = state.result()
    (w,) = out.windows
    assert w.index == 2 and w.alert and "sharpness_ks" in w.fired
    assert "sharpness" in (state.message or "")

    # A pattern the model never saw (stripes across the surface): novel images, queued.
    patterned = write_dataset(tmp_path / "new-defect", 20, seed=79, size=64)
    _stripes(patterned[0].parent, line / "day3")
    state = monitor_flow(str(trained), str(line), return_state=True)
    assert state.name == "Drift alert"
    (w3,) = state.result().windows
    assert "novelty" in w3.fired and w3.metrics["novelty_rate"] >= 0.5
    assert state.result().queued == len(w3.candidates) > 0
    assert all(c.reason == "novel" for c in w3.candidates)

    # MLflow: metrics at step = window index, the alert as tags of the bundle's monitor run.
    tracker = Tracker(cfg)
    runs = tracker.client.search_runs(
        [tracker.experiment_id()], filter_string="tags.`defect_loop.kind` = 'monitor'"
    )
    (run,) = [r for r in runs if r.data.tags["defect_loop.bundle_version"] == w.bundle_version]
    assert run.data.tags["defect_loop.alert.w2"] == w.message
    assert run.data.tags["defect_loop.alert"] == w3.message  # the latest
    assert run.data.tags["defect_loop.alert_count"] == "2"
    hist = tracker.client.get_metric_history(run.info.run_id, "p_sharpness_ks")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)][2] == w.p_values()["sharpness_ks"]

    # The Prefect event (delivered asynchronously).
    deadline = time.monotonic() + 30
    events: list[Any] = []
    while time.monotonic() < deadline and len(events) < 2:
        events = _alert_events(cfg.name)
        time.sleep(0.5)
    assert sorted(e.payload["window"] for e in events) == [2, 3]
    first = next(e for e in events if e.payload["window"] == 2)
    assert "sharpness_ks" in first.payload["fired"] and first.payload["message"] == w.message

    # A restart (a new flow run): nothing is checked or queued again; the record is intact.
    queued = [e.sha256 for e in ReviewQueue(cfg.paths.monitor).entries()]
    again = monitor_flow(str(trained), str(line), return_state=True).result()
    assert again.scan.new == 0 and again.windows == [] and again.queued == 0
    assert [x.alert for x in read_windows(cfg.paths.monitor)] == [False, False, True, True]
    assert [e.sha256 for e in ReviewQueue(cfg.paths.monitor).entries()] == queued
    from typer.testing import CliRunner

    from loop.cli import app

    r = CliRunner().invoke(app, ["monitor", "status", "-c", str(trained)])
    assert r.exit_code == 0, r.output
    status = json.loads(r.output)
    assert status["windows"] == 4 and status["alerts"] == 2 and status["images"] == {"done": 80}
    r = CliRunner().invoke(app, ["monitor", "alerts", "-c", str(trained)])
    assert "window 2" in r.output and "window 3" in r.output


def test_the_next_push_serves_the_queued_images_first(
    trained: Path, harness: None, tmp_path: Path
) -> None:
    from flows.sync import push_flow

    cfg = load_config(trained)
    queued = ReviewQueue(cfg.paths.monitor).entries("queued")
    assert queued, "the monitor test (run before this one) queues the novel images it found"
    assert all(e.in_pool for e in queued)
    project = Project(cfg)
    # Unlabeled images of the usual kind compete for the same push.
    others = write_dataset(tmp_path / "unlabeled", 12, seed=80, size=64)
    project.ingest(others[0].parent)
    push_flow(str(trained))
    gw = project.gateway()
    pid = Project(cfg).state.ls_project_id
    assert pid is not None
    tasks = gw.list_tasks(pid)
    by_sha = {t["data"]["sha256"]: t for t in tasks}
    heads = [t["data"]["sha256"] for t in tasks[: len(queued)]]
    expected = [e.sha256 for e in queued if e.sha256 in by_sha]
    assert expected and heads[: len(expected)] == expected  # lowest task ids, in queue order
    rest = [t for t in tasks if t["data"]["sha256"] not in set(expected)]
    assert rest, "the push also holds images the monitor did not queue"
    top = max(t["data"]["priority"] for t in rest)
    assert all(by_sha[s]["data"]["priority"] > top for s in expected)
    after = {e.sha256: e for e in ReviewQueue(cfg.paths.monitor).entries()}
    assert all(
        after[s].status == "pushed" and after[s].task_id == by_sha[s]["id"] for s in expected
    )


def test_the_report_shows_production(trained: Path) -> None:
    from loop.report import write_report

    cfg = load_config(trained)
    html_path, md_path = write_report(Project(cfg), Tracker(cfg))
    html = html_path.read_text()
    assert '<section id="production">' in html and 'id="alerts"' in html
    assert html.count("drift alert, window 2") >= 1
    assert 'id="novel-images"' in html
    assert "## Production" in md_path.read_text()
