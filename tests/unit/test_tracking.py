"""Tracker against a real local MLflow store (SQLite + file artifacts in tmp); no YOLO training."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from loop.config import ProjectConfig
from loop.datasets import DatasetStore, DatasetVersion, LabeledImage
from loop.detections import Detections
from loop.errors import DatasetError
from loop.model import EvalResult, TrainResult
from loop.tracking import (
    CANDIDATE,
    CHAMPION,
    Promotion,
    Tracker,
    class_metric,
    gate,
    manifest_source,
)

CLASSES = ["scratch", "pit hole"]  # a space: metric keys must be sanitised


def synthetic_version(n: int = 12, seed: int = 0) -> DatasetVersion:
    """``n`` images, splits cycling train/val/test, 0-2 boxes each (image 0 defect-free)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        s = hashlib.sha256(f"img{seed}-{i}".encode()).hexdigest()
        k = i % 3
        xy = rng.uniform(0, 20, (k, 2))
        boxes = np.hstack([xy, xy + 5]).reshape(-1, 4)
        ids = np.arange(k) % len(CLASSES)
        split = ("train", "val", "test")[i % 3]
        rows.append(
            LabeledImage(
                s,
                f"{s[:2]}/{s}.png",
                32,
                32,
                split,
                Detections(boxes, ids, (32, 32)),
                {"n": str(i)},
            )
        )
    return DatasetVersion.create(CLASSES, rows)


def fake_eval(map50_95: float, per_class: dict[str, float]) -> EvalResult:
    return EvalResult(
        map50=min(1.0, map50_95 + 0.2),
        map50_95=map50_95,
        precision=0.7,
        recall=0.6,
        per_class_ap50={c: min(1.0, v + 0.2) for c, v in per_class.items()},
        per_class_ap50_95=dict(per_class),
        n_instances=dict.fromkeys(per_class, 3),
        confusion_matrix=[[2, 0, 1], [0, 3, 0], [1, 0, 0]],
        n_images=4,
    )


def fake_train(tmp: Path, map50_95: float = 0.4) -> TrainResult:
    weights = tmp / f"w-{uuid.uuid4().hex[:6]}" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"fake weights " + uuid.uuid4().bytes)
    epochs = [
        {"epoch": e, "train/box_loss": 2.0 - 0.1 * e, "metrics/mAP50-95(B)": 0.1 * e}
        for e in range(3)
    ]
    val = fake_eval(map50_95, {"scratch": map50_95, "pit hole": map50_95})
    return TrainResult(weights, weights.parent, epochs, val, 1.5)


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (a fresh one costs ~2 s); tests use their own names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"


def make_cfg(tmp_path: Path, db_uri: str) -> ProjectConfig:
    tag = uuid.uuid4().hex[:8]
    return ProjectConfig(
        classes=CLASSES,
        workspace=tmp_path / "ws",
        mlflow={"tracking_uri": db_uri, "experiment": f"e-{tag}", "registered_model": f"m-{tag}"},
    )


# ------------------------------------------------------------------ the gate, pure


def _m(overall: float, scratch: float, pit: float) -> dict[str, float]:
    return {
        "test_map50_95": overall,
        class_metric("test", "ap50_95", "scratch"): scratch,
        class_metric("test", "ap50_95", "pit hole"): pit,
    }


@pytest.mark.parametrize(
    ("candidate", "tolerance", "promoted", "drops", "needle"),
    [
        (_m(0.52, 0.70, 0.34), 0.0, False, {"pit hole": 0.06}, "class 'pit hole' test AP50-95"),
        (_m(0.49, 0.58, 0.40), 0.02, True, {}, "0.4900 >= champion v3 0.5000 - 0.02"),
        (_m(0.49, 0.60, 0.40), 0.0, False, {}, "0.4900 < champion v3 0.5000 - 0"),
        (_m(0.50, 0.55, 0.40), 0.0, True, {}, "no class AP50-95 dropped by more than 0.05"),
        (_m(0.60, 0.40, 0.30), 0.0, False, {"scratch": 0.2, "pit hole": 0.1}, "(drop 0.2000)"),
    ],
)
def test_gate_known_answers(candidate, tolerance, promoted, drops, needle):
    champion = _m(0.50, 0.60, 0.40)
    p = gate(candidate, champion, CLASSES, tolerance, 0.05, "3")
    assert p.promoted is promoted
    assert dict(p.class_drops) == pytest.approx(drops)
    assert needle in p.reason


def test_gate_edge_cases():
    assert gate({}, None, CLASSES, 0, 0.05) == Promotion(True, "first model: no champion yet")
    assert not gate({}, _m(0.5, 0.5, 0.5), CLASSES, 0, 0.05).promoted  # no test metrics
    assert gate(_m(0.1, 0.1, 0.1), {}, CLASSES, 0, 0.05, "1").promoted  # champion untested
    # classes missing on either side are not compared
    only_overall = {"test_map50_95": 0.5}
    assert gate(_m(0.5, 0.0, 0.0), only_overall, CLASSES, 0, 0.05).promoted


# ------------------------------------------------------------------ against a SQLite store


def test_log_training_round_trip(tmp_path: Path, db_uri: str):
    import mlflow

    cfg = make_cfg(tmp_path, db_uri)
    store = DatasetStore(cfg.paths.datasets)
    version = synthetic_version()
    store.save(version)
    tracker = Tracker(cfg)
    result = fake_train(tmp_path)
    test = fake_eval(0.35, {"scratch": 0.5, "pit hole": 0.2})
    run_id = tracker.log_training(
        version=version,
        store=store,
        result=result,
        test=test,
        params={"train.epochs": 3},
        round_index=1,
        config_text="classes: [scratch, pit hole]\n",
    )
    client = tracker.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["defect_loop.dataset_digest"] == version.digest
    assert tags["defect_loop.test_split_digest"] == version.split_digest("test")
    assert tags["defect_loop.dataset_uri"] == f"runs:/{run_id}/dataset/manifest.parquet"
    assert run.data.params["dataset_digest"] == version.digest
    assert metrics["test_map50_95"] == 0.35 and metrics["test_ap50_95_pit_hole"] == 0.2
    assert metrics["val_precision"] == 0.7 and metrics["test_recall"] == 0.6
    history = client.get_metric_history(run_id, "epoch_metrics/mAP50-95_B_")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    artifacts = {
        f.path
        for d in ("dataset", "eval", "config", "weights")
        for f in client.list_artifacts(run_id, d)
    }
    assert artifacts == {
        "dataset/manifest.parquet",
        "dataset/meta.json",
        "eval/confusion_matrix.json",
        "config/defect-loop.yaml",
        "weights/best.pt",
    }
    cm = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/eval/confusion_matrix.json"))
    assert cm == {"classes": CLASSES, "matrix": test.confusion_matrix}

    # the mlflow.data input carries our digest and a source that loads back
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == version.digest[:36]
    assert inp.dataset.source_type == "defect_loop_manifest"
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    source = mlflow.data.get_source(inp)
    assert source.to_dict() == {"uri": tags["defect_loop.dataset_uri"], "digest": version.digest}
    local = Path(source.load(dst_path=str(tmp_path / "dl")))
    assert pq.read_table(local).column("sha256").to_pylist() == [r.sha256 for r in version.rows]
    file_src = manifest_source((store.path(version.digest) / "manifest.parquet").as_uri())
    assert pq.read_table(file_src.load(dst_path=str(tmp_path / "f"))).num_rows == len(version)

    # the version itself, verified
    other = DatasetStore(tmp_path / "elsewhere")
    back = tracker.load_dataset_version(run_id, store=other)
    assert back.digest == version.digest and back.parent == version.parent
    assert other.load(version.digest[:8]).digest == version.digest

    # registry: candidate, then champion (first model), weights download
    mv = tracker.register(run_id)
    name = cfg.mlflow.registered_model
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == mv
    assert client.get_model_version(name, mv).tags["dataset_digest"] == version.digest
    decision = tracker.promote_if_better(mv, run_id)
    assert decision.promoted and decision.reason == "first model: no champion yet"
    champ = tracker.champion()
    assert champ is not None and champ.version == mv and champ.run_id == run_id
    assert champ.weights.read_bytes() == result.weights.read_bytes()
    assert champ.test_map50_95 == 0.35
    assert tracker.last_trained_digest() == version.digest
    (summary,) = tracker.training_runs()
    assert summary["run_id"] == run_id and summary["promoted"] == "true"


def test_log_training_refuses_an_unsaved_version(tmp_path: Path, db_uri: str):
    cfg = make_cfg(tmp_path, db_uri)
    tracker = Tracker(cfg)
    with pytest.raises(DatasetError, match=r"DatasetStore.save"):
        tracker.log_training(
            version=synthetic_version(3),
            store=DatasetStore(cfg.paths.datasets),
            result=fake_train(tmp_path),
            test=None,
            params={},
            round_index=1,
        )


def test_load_dataset_version_detects_tampering_and_foreign_runs(tmp_path: Path, db_uri: str):
    cfg = make_cfg(tmp_path, db_uri)
    store = DatasetStore(cfg.paths.datasets)
    version = synthetic_version(6, seed=3)
    store.save(version)
    tracker = Tracker(cfg)
    run_id = tracker.log_training(
        version=version,
        store=store,
        result=fake_train(tmp_path),
        test=None,
        params={},
        round_index=1,
    )
    art = Path(tracker.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    manifest = art / "dataset" / "manifest.parquet"
    pq.write_table(pq.read_table(manifest).slice(0, 5), manifest)
    with pytest.raises(DatasetError, match="does not match its digest"):
        tracker.load_dataset_version(run_id)
    foreign = tracker.client.create_run(tracker.experiment_id()).info.run_id
    with pytest.raises(DatasetError, match="no dataset version"):
        tracker.load_dataset_version(foreign)


def _fake_run(tracker: Tracker, tmp_path: Path, metrics: dict[str, float]) -> tuple[str, str]:
    """A finished run with ``metrics`` and a dummy weights file, registered; (version, run id)."""
    client = tracker.client
    run_id = client.create_run(tracker.experiment_id(), tags={"defect_loop.kind": "train"})
    rid = run_id.info.run_id
    for k, v in metrics.items():
        client.log_metric(rid, k, v)
    w = tmp_path / rid / "best.pt"
    w.parent.mkdir(parents=True)
    w.write_bytes(rid.encode())
    client.log_artifact(rid, str(w), "weights")
    client.set_tag(rid, "defect_loop.weights_file", "best.pt")
    client.set_terminated(rid, "FINISHED")
    return tracker.register(rid), rid


def test_promotion_gate_against_the_registry(tmp_path: Path, db_uri: str):
    cfg = make_cfg(tmp_path, db_uri)
    tracker = Tracker(cfg)
    client, name = tracker.client, cfg.mlflow.registered_model

    v1, r1 = _fake_run(tracker, tmp_path, _m(0.50, 0.60, 0.40))
    assert tracker.promote_if_better(v1, r1).promoted

    # better overall but one class drops by 0.06 > 0.05 (config default): refused, reason tagged
    v2, r2 = _fake_run(tracker, tmp_path, _m(0.52, 0.70, 0.34))
    d2 = tracker.promote_if_better(v2, r2)
    assert not d2.promoted and dict(d2.class_drops) == pytest.approx({"pit hole": 0.06})
    tags = client.get_run(r2).data.tags
    assert tags["defect_loop.promoted"] == "false"
    assert tags["defect_loop.compared_to"] == v1
    assert json.loads(tags["defect_loop.class_drops"]) == pytest.approx({"pit hole": 0.06})
    assert (
        "class 'pit hole' test AP50-95 0.3400 < champion v1 0.4000 - 0.05 (drop 0.0600)"
        in (tags["defect_loop.promotion_reason"])
    )
    assert client.get_model_version(name, v2).tags["promoted"] == "false"
    assert client.get_model_version_by_alias(name, CHAMPION).version == int(v1)
    assert client.get_model_version_by_alias(name, CANDIDATE).version == int(v2)

    # the same run passes with a looser per-class limit
    assert tracker.promote_if_better(v2, r2, max_class_drop=0.1).promoted
    assert client.get_model_version_by_alias(name, CHAMPION).version == int(v2)

    # slightly worse overall: refused at tolerance 0, promoted within the config's tolerance
    v3, r3 = _fake_run(tracker, tmp_path, _m(0.51, 0.69, 0.34))
    assert not tracker.promote_if_better(v3, r3).promoted
    loose = make_cfg(tmp_path, db_uri).model_copy(
        update={
            "mlflow": cfg.mlflow,
            "promotion": cfg.promotion.model_copy(update={"tolerance": 0.02}),
        }
    )
    d3 = Tracker(loose).promote_if_better(v3, r3)
    assert d3.promoted and "0.5100 >= champion v2 0.5200 - 0.02" in d3.reason
    champ = tracker.champion()
    assert champ is not None and champ.version == v3 and champ.weights.read_bytes() == r3.encode()
