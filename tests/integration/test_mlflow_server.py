"""Tracker against a real `mlflow server` (SQLite backend, proxied artifacts), started here.

One server for the module (~12 s to start with one worker and job execution off); killed at the
end. Logs runs with fake training results (no YOLO): dataset read-back through the run's
artifacts and through ``mlflow.data.get_source``, registry aliases, the promotion gate and the
champion's weights download all go through the server's REST API and artifact proxy.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from loop.config import ProjectConfig
from loop.datasets import DatasetStore, DatasetVersion, LabeledImage
from loop.detections import Detections
from loop.model import EvalResult, TrainResult
from loop.services import free_port
from loop.tracking import CANDIDATE, CHAMPION, Tracker, manifest_source

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "pit"]


@dataclass(frozen=True)
class MlflowServer:
    url: str
    start_s: float
    root: Path


def _mlflow_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    cmd = [
        *_mlflow_cmd(),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'm.db'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    log = (root / "server.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {proc.returncode}:\n"
                    + (root / "server.log").read_text()[-3000:]
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 90:
                pytest.fail(
                    "mlflow server did not answer /health within 90 s:\n"
                    + (root / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield MlflowServer(url, time.monotonic() - t0, root)
    finally:
        # The server's workers live in its own session: stop that group, nothing else.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _version(n: int = 9) -> DatasetVersion:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        s = hashlib.sha256(f"server-{i}".encode()).hexdigest()
        k = i % 3
        xy = rng.uniform(0, 20, (k, 2))
        rows.append(
            LabeledImage(
                s,
                f"{s[:2]}/{s}.png",
                32,
                32,
                ("train", "val", "test")[i % 3],
                Detections(np.hstack([xy, xy + 5]).reshape(-1, 4), np.arange(k) % 2, (32, 32)),
                {"source": "test"},
            )
        )
    return DatasetVersion.create(CLASSES, rows)


def _eval(overall: float, scratch: float, pit: float) -> EvalResult:
    return EvalResult(
        overall + 0.2,
        overall,
        0.7,
        0.6,
        {"scratch": scratch + 0.2, "pit": pit + 0.2},
        {"scratch": scratch, "pit": pit},
        {"scratch": 3, "pit": 2},
        [[2, 0, 1], [0, 2, 0], [1, 0, 0]],
        3,
    )


def _train(tmp: Path, val: EvalResult) -> TrainResult:
    w = tmp / uuid.uuid4().hex[:8] / "best.pt"
    w.parent.mkdir(parents=True)
    w.write_bytes(b"weights " + uuid.uuid4().bytes)
    epochs = [{"epoch": e, "train/box_loss": 1.0 / (e + 1)} for e in range(3)]
    return TrainResult(w, w.parent, epochs, val, 1.0)


def test_tracker_through_a_server(mlflow_server: MlflowServer, tmp_path: Path):
    import mlflow

    print(f"\nmlflow server start: {mlflow_server.start_s:.1f} s")
    cfg = ProjectConfig(
        classes=CLASSES,
        workspace=tmp_path / "ws",
        mlflow={"tracking_uri": mlflow_server.url, "registered_model": "server-test"},
    )
    store = DatasetStore(cfg.paths.datasets)
    version = _version()
    store.save(version)
    tracker = Tracker(cfg)

    t0 = time.monotonic()
    run1 = tracker.log_training(
        version=version,
        store=store,
        result=_train(tmp_path, _eval(0.4, 0.4, 0.4)),
        test=_eval(0.5, 0.6, 0.4),
        params={"train.epochs": 3},
        round_index=1,
        config_text="classes: [scratch, pit]\nworkspace: ws\n",
    )
    print(f"logged run (server): {time.monotonic() - t0:.2f} s")
    run = tracker.client.get_run(run1)
    # the server chose the artifact location: nothing was written into the workspace
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert not (cfg.workspace / "mlartifacts").exists()
    assert run.data.metrics["test_ap50_95_pit"] == 0.4

    # dataset back through the run's artifacts (verified digest) ...
    t0 = time.monotonic()
    back = tracker.load_dataset_version(run1, store=DatasetStore(tmp_path / "copy"))
    print(f"load_dataset_version (server): {time.monotonic() - t0:.2f} s")
    assert back.digest == version.digest
    assert [r.provenance for r in back.rows] == [r.provenance for r in version.rows]
    # ... and through mlflow.data, for a runs:/ and an mlflow-artifacts:/ URI
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == version.digest[:36]
    src = mlflow.data.get_source(inp)
    assert src.uri == f"runs:/{run1}/dataset/manifest.parquet"  # type: ignore[attr-defined]
    local = src.load(dst_path=str(tmp_path / "a"))
    assert pq.read_table(local).num_rows == len(version)
    proxied = manifest_source(f"{run.info.artifact_uri}/dataset/manifest.parquet", version.digest)
    assert pq.read_table(proxied.load(dst_path=str(tmp_path / "b"))).num_rows == len(version)
    cfg_text = mlflow.artifacts.load_text(f"runs:/{run1}/config/defect-loop.yaml")
    assert cfg_text.startswith("classes: [scratch, pit]")

    # registry + gate through the server
    mv1 = tracker.register(run1)
    assert tracker.promote_if_better(mv1, run1).promoted
    run2 = tracker.log_training(
        version=version,
        store=store,
        result=_train(tmp_path, _eval(0.4, 0.4, 0.4)),
        test=_eval(0.55, 0.8, 0.3),  # better overall, pit drops by 0.1
        params={},
        round_index=2,
    )
    mv2 = tracker.register(run2)
    decision = tracker.promote_if_better(mv2, run2)
    assert not decision.promoted and dict(decision.class_drops) == pytest.approx({"pit": 0.1})
    assert "class 'pit'" in tracker.client.get_run(run2).data.tags["defect_loop.promotion_reason"]
    client = tracker.client
    assert str(client.get_model_version_by_alias("server-test", CHAMPION).version) == mv1
    assert str(client.get_model_version_by_alias("server-test", CANDIDATE).version) == mv2

    t0 = time.monotonic()
    champ = tracker.champion()
    print(f"champion download (server): {time.monotonic() - t0:.2f} s")
    assert champ is not None and champ.version == mv1 and champ.run_id == run1
    assert champ.weights.is_file() and champ.weights.read_bytes().startswith(b"weights ")
    assert champ.weights.is_relative_to(cfg.workspace / "models")
    assert tracker.last_trained_digest() == version.digest
    assert [r["promoted"] for r in tracker.training_runs()] == ["true", "false"]
