"""Flows under the Prefect test harness (ingest, the cycle lock, a failed step's state, the
count trigger), then the served deployments against a real Prefect server: `defect-loop serve`
in a subprocess, two cycle triggers giving one cycle, and the count trigger started from the
Prefect CLI (`prefect deployment run ... --watch`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loop.config import load_config
from loop.project import Project
from loop.scheduling import CycleLock, deployment_name
from loop.services import PrefectService, free_port
from loop.synth import SYNTH_CLASSES, write_dataset
from loop.tracking import Tracker

pytestmark = pytest.mark.integration
CLASSES = list(SYNTH_CLASSES)
TINY_TRAIN = {"imgsz": 64, "epochs": 1, "batch": 8, "finetune_epochs": 1, "threads": 2}


def _write_project(root: Path, n_images: int = 24, **sections: Any) -> Path:
    synth = root / "synth"
    if not (synth / "images").exists():
        write_dataset(synth, n_images, seed=5, size=64)
    cfg_path = root / "defect-loop.yaml"
    doc = {"name": "flows-test", "classes": CLASSES, "workspace": "ws", "train": TINY_TRAIN}
    doc.update(sections)
    cfg_path.write_text(yaml.safe_dump(doc))
    return cfg_path


@pytest.fixture(scope="module")
def harness(prefect_harness: None) -> None:
    """Flows run against the session's Prefect test harness (tests/conftest.py)."""


# --- under the test harness -------------------------------------------------------------------
def test_ingest_flow_then_a_failed_step_says_which_and_why(harness: None, tmp_path: Path):
    from flows.cycle import cycle_flow
    from flows.ingest import ingest_flow

    cfg_path = _write_project(tmp_path, train={**TINY_TRAIN, "model": "no-such-model.yaml"})
    synth = tmp_path / "synth"
    out = ingest_flow(str(cfg_path), str(synth / "images"), str(synth / "labels"), 16)
    assert out.added == 24 and out.duplicates == 0 and out.rejected == []
    assert out.pool_size == 24 and out.dataset_version is not None

    state = cycle_flow(str(cfg_path), return_state=True)
    assert state.is_failed()
    assert "cycle step 'train' failed: ModelError" in (state.message or "")
    assert "no-such-model.yaml" in (state.message or "")
    with pytest.raises(Exception, match="cycle step 'train' failed"):
        state.result()
    cfg = load_config(cfg_path)
    project = Project(cfg)
    # The version the ingest wrote is intact and current; nothing half-written is left behind.
    assert project.state.current_version == out.dataset_version
    assert project.current_version() is not None
    assert sorted(p.name for p in cfg.paths.datasets.iterdir()) == [out.dataset_version]
    assert not CycleLock(cfg.workspace).is_locked()  # released on failure


def test_cycle_skips_or_waits_while_another_holds_the_workspace(harness: None, tmp_path: Path):
    from flows.cycle import CycleOutcome, cycle_flow

    cfg_path = _write_project(tmp_path, train={**TINY_TRAIN, "model": "no-such-model.yaml"})
    cfg = load_config(cfg_path)
    Project(cfg).ingest(tmp_path / "synth" / "images", tmp_path / "synth" / "labels", 16)
    holder = CycleLock(cfg.workspace)
    assert holder.acquire("skip", 1, "cycle flow run first-one")
    try:
        state = cycle_flow(str(cfg_path), return_state=True)
        assert state.is_completed() and state.name == "Skipped"
        assert "another cycle is running (cycle flow run first-one" in (state.message or "")
        outcome = state.result()
        assert isinstance(outcome, CycleOutcome) and outcome.skipped
        assert outcome.train is None and outcome.push is None
    finally:
        holder.release()

    # concurrency: wait -> it waits for the holder, then runs (and fails at 'train' here).
    _write_project(
        tmp_path,
        train={**TINY_TRAIN, "model": "no-such-model.yaml"},
        schedule={"concurrency": "wait", "wait_timeout_s": 120},
    )
    assert holder.acquire("skip", 1, "cycle flow run first-one")
    threading.Timer(2.0, holder.release).start()
    t0 = time.monotonic()
    state = cycle_flow(str(cfg_path), return_state=True)
    assert time.monotonic() - t0 >= 2.0
    assert state.is_failed() and "cycle step 'train'" in (state.message or "")


def test_count_trigger_flow(harness: None, tmp_path: Path):
    from flows.triggers import check_annotations_flow

    cfg_path = _write_project(tmp_path, schedule={"count_trigger": 100})
    cfg = load_config(cfg_path)
    Project(cfg).ingest(tmp_path / "synth" / "images", tmp_path / "synth" / "labels", 16)
    decision = check_annotations_flow(str(cfg_path))
    # Never trained: every labeled image counts as new.
    assert not decision.fire and decision.count == 16 and "fewer than 100" in decision.reason

    _write_project(tmp_path, schedule={"count_trigger": 5})
    state = check_annotations_flow(str(cfg_path), return_state=True)
    # It fires, but without `defect-loop serve` there is no cycle deployment: it says so.
    assert state.is_failed()
    assert "deployment 'cycle/flows-test' does not exist" in (state.message or "")
    assert "defect-loop serve" in (state.message or "")


def test_network_tasks_retry_only_transient_failures(harness: None):
    from prefect import flow, task

    from flows.common import NETWORK_TASK
    from loop.errors import ConfigError, ServiceError

    calls: list[str] = []
    options = {**NETWORK_TASK, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(**options)
    def flaky(kind: str) -> str:
        calls.append(kind)
        if kind == "config":
            raise ConfigError("bad token")
        if len(calls) < 3:
            raise ServiceError("Label Studio unreachable")
        return "ok"

    @flow
    def network(kind: str) -> str:
        return flaky(kind)

    assert network("transient") == "ok" and calls == ["transient"] * 3  # 2 retries
    calls.clear()
    state = network("config", return_state=True)
    assert state.is_failed() and calls == ["config"], "a named, permanent error is not retried"


# --- served deployments against a real Prefect server -----------------------------------------
@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectService]:
    """A real Prefect server (SQLite) on a free port. Its scheduler service is off so that no
    run starts by itself during the test; the deployments' schedules are checked as data."""
    svc = PrefectService(
        home=tmp_path_factory.mktemp("prefect-server"),
        port=free_port(),
        extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
    )
    svc.start(timeout_s=180)
    try:
        yield svc
    finally:
        svc.stop()


def serve_command(cfg_path: Path) -> list[str]:
    """`defect-loop serve` (what the Docker worker runs) once it is registered in `loop.cli`,
    else the same command through `python -m loop.cli.serve`."""
    from loop.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    if "serve" in names:
        exe = Path(sys.executable).with_name("defect-loop")
        return [str(exe), "serve", "--config", str(cfg_path)]
    return [sys.executable, "-m", "loop.cli.serve", "serve", "--config", str(cfg_path)]


def _client_env(api_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            **extra,
        }
    )
    return env


def _wait_final(client: Any, run_ids: list[Any], timeout_s: float, log: Path) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [client.read_flow_run(i) for i in run_ids]
        if all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            states = [(r.name, r.state and r.state.name) for r in runs]
            pytest.fail(f"runs not finished after {timeout_s} s: {states}\n{_tail(log)}")
        time.sleep(1.0)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture
def served(prefect_server: PrefectService, ls_server: Any, tmp_path: Path) -> Iterator[Any]:
    """A project whose deployments `defect-loop serve` serves; yields (cfg_path, name, log)."""
    tag = uuid.uuid4().hex[:8]
    root = Path(ls_server.document_root) / f"served-{tag}"
    cfg_path = _write_project(
        root,
        n_images=32,
        name="served-test",
        labelstudio={
            "url": ls_server.url,
            "document_root": str(ls_server.document_root),
            "project_title": f"defect-loop served test {tag}",
        },
        select={
            "batch_size": 4,
            "candidate_conf": 0.5,
            "min_candidates": 3,
            "preannotation_conf": 1e-9,
        },
        scoring={"batch_size": 16},
        schedule={
            "cycle_cron": "0 3 * * *",
            "count_trigger": 2,
            "check_interval_s": 3600,
            "concurrency": "skip",
        },
    )
    cfg = load_config(cfg_path)
    Project(cfg).ingest(root / "synth" / "images", root / "synth" / "labels", 16)
    log = root / "serve.log"
    env = _client_env(
        prefect_server.api_url,
        DEFECT_LOOP_LABELSTUDIO__API_TOKEN=ls_server.token,
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    with log.open("w") as fh:
        proc = subprocess.Popen(
            serve_command(cfg_path),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    try:
        yield cfg_path, deployment_name(cfg.name), log, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_served_deployments_two_triggers_one_cycle_and_the_count_trigger(
    served: Any, prefect_server: PrefectService, ls_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg_path, name, log, proc = served
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    with (
        temporary_settings({PREFECT_API_URL: prefect_server.api_url}),
        get_client(sync_client=True) as client,
    ):
        # 1. `defect-loop serve` registers every deployment with the config's schedules.
        deadline = time.monotonic() + 180
        while True:
            try:
                client.read_deployment_by_name(f"pull/{name}")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not register its deployments:\n{_tail(log)}")
                time.sleep(1.0)
        cycle_dep = client.read_deployment_by_name(f"cycle/{name}")
        assert [s.schedule.cron for s in cycle_dep.schedules] == ["0 3 * * *"]
        check_dep = client.read_deployment_by_name(f"check-annotations/{name}")
        assert [s.schedule.interval.total_seconds() for s in check_dep.schedules] == [3600]
        assert cycle_dep.parameters == {"config_path": str(cfg_path.resolve())}

        # 2. Two triggers while none runs: one cycle runs, the other is skipped.
        ids = [run_deployment(f"cycle/{name}", timeout=0).id for _ in range(2)]
        runs = _wait_final(client, ids, 600, log)
        states = sorted((r.state.type.value, r.state.name) for r in runs)
        assert states == [("COMPLETED", "Completed"), ("COMPLETED", "Skipped")], _tail(log)
        skipped = next(r for r in runs if r.state.name == "Skipped")
        assert "another cycle is running" in (skipped.state.message or "")
        cfg = load_config(cfg_path)
        assert len(Tracker(cfg).training_runs()) == 1
        project = Project(cfg)
        assert len(project.state.pending) == 4

        # 3. Two annotations -> the count trigger (run from the Prefect CLI) starts a cycle.
        gw = project.gateway()
        tasks = gw.list_tasks(project.state.ls_project_id)
        for t in tasks[:2]:
            gw.annotate_results(t["id"], [])  # defect-free images
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "deployment",
                "run",
                f"check-annotations/{name}",
                "--watch",
            ],
            env=_client_env(prefect_server.api_url),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr + _tail(log)
        triggered = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["count-trigger"]))
        )
        assert len(triggered) == 1, "the count trigger started exactly one cycle"
        (run,) = _wait_final(client, [triggered[0].id], 600, log)
        assert run.state.type.value == "COMPLETED" and run.state.name == "Completed", _tail(log)

    runs_after = Tracker(load_config(cfg_path)).training_runs()
    assert len(runs_after) == 2, "the triggered cycle pulled the 2 labels and trained again"
    project = Project(load_config(cfg_path))
    assert len(project.state.pending) == 2 + 4
    assert proc.poll() is None, "serve keeps running"
