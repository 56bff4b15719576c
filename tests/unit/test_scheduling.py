"""Unit tests of `loop.scheduling`, the scheduling config sections, batched scoring's merge,
`PrefectService` without a server, `loop.cli.serve` helpers and the deployments' schedules."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loop.config import load_config
from loop.errors import ConfigError, ModelError, ServiceError
from loop.scheduling import (
    CycleBusyError,
    CycleLock,
    CycleStepError,
    annotated_pending,
    batches,
    changed_rows,
    count_trigger_decision,
    cycle_guard,
    deployment_name,
    is_transient,
    merge_in_order,
)
from loop.services import PrefectService, free_port

CLASSES = ["scratch", "pit"]


# --- batching and merging ----------------------------------------------------------------------
def test_batches_keep_order_and_cover_everything():
    ids = [f"id{i}" for i in range(10)]
    out = batches(ids, 4)
    assert out == [ids[0:4], ids[4:8], ids[8:10]]
    assert [x for b in out for x in b] == ids
    assert batches([], 3) == []
    assert batches(ids, 100) == [ids]
    with pytest.raises(ValueError, match=">= 1"):
        batches(ids, 0)


def test_merge_in_order_restores_order_and_refuses_gaps():
    order = ["a", "b", "c", "d"]
    parts = [[("c", 3), ("d", 4)], [("a", 1), ("b", 2)]]
    assert merge_in_order(order, parts) == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    with pytest.raises(Exception, match="1 missing"):
        merge_in_order(order, [[("a", 1), ("b", 2), ("c", 3)]])
    with pytest.raises(Exception, match="twice"):
        merge_in_order(order, [[("a", 1)], [("a", 1)]])
    with pytest.raises(Exception, match="1 unexpected"):
        merge_in_order(["a"], [[("a", 1), ("z", 0)]])


# --- the count trigger ---------------------------------------------------------------------------
def test_annotated_pending_counts_live_annotations_of_pending_tasks():
    pending = {"s1": 11, "s2": 12, "s3": 13}
    exported = [
        {"id": 11, "data": {"sha256": "s1"}, "annotations": [{"was_cancelled": False}]},
        {"id": 12, "data": {"sha256": "s2"}, "annotations": [{"was_cancelled": True}]},
        {"id": 13, "data": {"sha256": "s3"}, "annotations": []},
        {"id": 99, "data": {"sha256": "old"}, "annotations": [{"was_cancelled": False}]},
        {"id": 14, "data": {"sha256": "s3"}, "annotations": [{}]},  # same image, new task id
    ]
    assert annotated_pending(exported, pending) == 2
    assert annotated_pending([], pending) == 0


def test_changed_rows_counts_new_and_relabeled_images():
    trained = {"a": "a|box1", "b": "b|box2"}
    current = {"a": "a|box1", "b": "b|box2-moved", "c": "c|", "d": "d|box"}
    assert changed_rows(current, trained) == 3
    assert changed_rows(current, None) == 4
    assert changed_rows(trained, trained) == 0


@pytest.mark.parametrize(
    ("n", "threshold", "running", "fire", "words"),
    [
        (5, None, False, False, "not set"),
        (2, 3, False, False, "fewer than 3"),
        (3, 3, False, True, ">= 3"),
        (9, 3, True, False, "already running"),
    ],
)
def test_count_trigger_decision(n, threshold, running, fire, words):
    d = count_trigger_decision(n, threshold, cycle_running=running)
    assert d.fire is fire and d.count == n and d.threshold == threshold
    assert words in d.reason


# --- the cycle lock ------------------------------------------------------------------------------
def test_lock_skip_and_wait(tmp_path: Path):
    first, second = CycleLock(tmp_path, poll_s=0.05), CycleLock(tmp_path, poll_s=0.05)
    assert not first.is_locked()
    assert first.acquire("skip", 1, "cycle flow run one")
    assert first.held and second.is_locked()
    assert second.holder()["what"] == "cycle flow run one"
    assert second.holder()["pid"] == os.getpid()
    assert second.acquire("skip", 10, "two") is False
    t0 = time.monotonic()
    with pytest.raises(CycleBusyError, match="cycle flow run one"):
        second.acquire("wait", 0.3, "two")
    assert time.monotonic() - t0 >= 0.3
    first.release()
    assert not second.is_locked()
    assert second.acquire("skip", 1, "two")
    second.release()
    with pytest.raises(ValueError, match="policy"):
        first.acquire("queue", 1)  # type: ignore[arg-type]


def test_lock_wait_gets_it_when_the_holder_finishes(tmp_path: Path):
    holder = CycleLock(tmp_path)
    assert holder.acquire("skip", 1)
    threading.Timer(0.4, holder.release).start()
    waiter = CycleLock(tmp_path, poll_s=0.05)
    t0 = time.monotonic()
    assert waiter.acquire("wait", 10)
    assert 0.3 < time.monotonic() - t0 < 5
    waiter.release()


def test_cycle_guard_never_lets_two_cycles_overlap(tmp_path: Path):
    running = []
    overlaps = []
    ran = []

    def cycle(i: int) -> None:
        with cycle_guard(tmp_path, "wait", 30, f"cycle {i}") as acquired:
            assert acquired
            if running:
                overlaps.append(i)
            running.append(i)
            time.sleep(0.05)
            running.remove(i)
            ran.append(i)

    threads = [threading.Thread(target=cycle, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == [0, 1, 2, 3] and overlaps == []


def test_lock_is_freed_when_its_holder_dies(tmp_path: Path):
    code = textwrap.dedent(
        f"""
        import sys, time
        from loop.scheduling import CycleLock
        lock = CycleLock({str(tmp_path)!r})
        assert lock.acquire("skip", 1, "doomed")
        print("held", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        lock = CycleLock(tmp_path)
        assert lock.is_locked() and lock.holder()["what"] == "doomed"
        assert lock.acquire("skip", 1) is False
        proc.kill()
        proc.wait(10)
        assert lock.acquire("skip", 1)  # the kernel dropped the dead holder's lock
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cycle_step_error_names_the_step_and_cause():
    err = CycleStepError("train", ModelError("weights missing; retrain"))
    assert err.step == "train"
    text = str(err)
    assert "cycle step 'train' failed: ModelError: weights missing; retrain" in text
    assert "half-written" in text


# --- retries -------------------------------------------------------------------------------------
class MlflowException(Exception):  # same name as MLflow's: is_transient matches by name
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.error_code = code


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ServiceError("Label Studio unreachable"), True),
        (ConfigError("bad config"), False),
        (ModelError("no champion"), False),
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (MlflowException("TEMPORARILY_UNAVAILABLE"), True),
        (MlflowException("RESOURCE_DOES_NOT_EXIST"), False),
        (ValueError("a bug"), False),
        (None, False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_requests_connection_errors_are_transient():
    requests = pytest.importorskip("requests")
    assert is_transient(requests.exceptions.ConnectionError("down"))
    assert is_transient(requests.exceptions.ReadTimeout("slow"))
    assert not is_transient(requests.exceptions.InvalidURL("bad"))


# --- config ----------------------------------------------------------------------------------
def _write_cfg(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "defect-loop.yaml"
    path.write_text(yaml.safe_dump({"name": "line 3/A", "classes": CLASSES, **sections}))
    return path


def test_schedule_and_scoring_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = load_config(_write_cfg(tmp_path))
    assert cfg.schedule.cycle_cron is None and cfg.schedule.count_trigger is None
    assert cfg.schedule.concurrency == "skip"
    assert cfg.scoring.batch_size == 256 and cfg.scoring.dask_address is None
    assert cfg.prefect.port == 4200
    cfg = load_config(
        _write_cfg(
            tmp_path,
            schedule={"cycle_cron": " 0  2 * * * ", "count_trigger": 50, "concurrency": "wait"},
            scoring={"batch_size": 64, "dask_address": "tcp://10.0.0.5:8786"},
        )
    )
    assert cfg.schedule.cycle_cron == "0 2 * * *" and cfg.schedule.count_trigger == 50
    assert cfg.schedule.concurrency == "wait"
    assert cfg.scoring.dask_address == "tcp://10.0.0.5:8786"
    monkeypatch.setenv("DEFECT_LOOP_SCORING__DASK_ADDRESS", "")
    assert load_config(_write_cfg(tmp_path)).scoring.dask_address is None
    monkeypatch.setenv("DEFECT_LOOP_SCORING__DASK_ADDRESS", "tcp://scheduler:8786")
    assert load_config(_write_cfg(tmp_path)).scoring.dask_address == "tcp://scheduler:8786"


@pytest.mark.parametrize(
    "sections",
    [
        {"schedule": {"cycle_cron": "every night"}},
        {"schedule": {"concurrency": "queue"}},
        {"schedule": {"count_trigger": 0}},
        {"scoring": {"batch_size": 0}},
        {"schedule": {"surprise": 1}},
    ],
)
def test_bad_schedule_config_is_refused(tmp_path: Path, sections: dict[str, Any]):
    with pytest.raises(ConfigError):
        load_config(_write_cfg(tmp_path, **sections))


def test_deployment_name():
    assert deployment_name("defect-loop") == "defect-loop"
    assert deployment_name("line 3/A") == "line-3-A"
    with pytest.raises(ValueError):
        deployment_name(" / ")


# --- batched scoring is independent of the batches -----------------------------------------------
# --- PrefectService without starting it ----------------------------------------------------------
def test_prefect_service_env_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")
    monkeypatch.setenv("PREFECT_PROFILE", "odd")
    svc = PrefectService(home=tmp_path / "ph", port=4321)
    assert svc.api_url == "http://127.0.0.1:4321/api" and svc.url == "http://127.0.0.1:4321"
    env = svc.server_env()
    assert "PREFECT_API_URL" not in env and "PREFECT_PROFILE" not in env
    assert env["PREFECT_HOME"] == str(tmp_path / "ph")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["DO_NOT_TRACK"] == "true"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("sqlite+aiosqlite:///")
    cmd = svc.command()
    assert cmd[1:5] == ["-m", "prefect", "server", "start"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "4321"
    st = svc.status()
    assert st["running"] is False and st["healthy"] is False and st["pid"] is None
    assert svc.stop() is False


def test_prefect_service_refuses_a_taken_port(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        svc = PrefectService(home=tmp_path / "ph", port=s.getsockname()[1])
        with pytest.raises(ServiceError, match="already in use"):
            svc.start(timeout_s=5)


# --- loop.cli.serve helpers ---------------------------------------------------------------------------
def test_serve_needs_a_prefect_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from loop.cli.serve import check_api, resolve_api_url

    cfg = load_config(_write_cfg(tmp_path, prefect={"port": free_port()}))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ServiceError, match="prefect-server start"):
        resolve_api_url(cfg)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert resolve_api_url(cfg) == "http://127.0.0.1:9/api"
    with pytest.raises(ServiceError, match="unreachable"):
        check_api(f"http://127.0.0.1:{free_port()}/api", timeout_s=2)


def test_serve_command_explains_a_missing_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from loop.cli.serve import standalone_app

    path = _write_cfg(tmp_path, prefect={"port": free_port()})
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(standalone_app(), ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "needs a Prefect server" in result.output


# --- deployments (built, not served) -------------------------------------------------------------
def test_deployments_carry_the_config_schedules(tmp_path: Path):
    from flows.deployments import build_deployments

    path = _write_cfg(
        tmp_path,
        schedule={
            "cycle_cron": "0 2 * * *",
            "timezone": "Europe/Berlin",
            "count_trigger": 25,
            "check_interval_s": 600,
        },
    )
    deps = {d.flow_name: d for d in build_deployments(path)}
    assert set(deps) >= {"cycle", "check-annotations", "ingest", "train", "score", "push", "pull"}
    assert "review-labels" in deps and not deps["review-labels"].schedules  # on demand only
    assert {d.name for d in deps.values()} == {"line-3-A"}
    for d in deps.values():
        assert d.parameters["config_path"] == str(path.resolve())
        assert d.entrypoint.startswith("flows.")
    (cycle,) = deps["cycle"].schedules
    assert cycle.schedule.cron == "0 2 * * *" and cycle.schedule.timezone == "Europe/Berlin"
    (check,) = deps["check-annotations"].schedules
    assert check.schedule.interval.total_seconds() == 600
    assert not deps["train"].schedules
    # Without a cron or count trigger nothing runs by itself.
    plain = {d.flow_name: d for d in build_deployments(_write_cfg(tmp_path))}
    assert not plain["cycle"].schedules and not plain["check-annotations"].schedules
