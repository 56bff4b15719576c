"""One writer at a time: the workspace lock every writing command takes, and atomic state writes
(issue 15, finding 2). Two real ingests at once, in processes, are in
tests/integration/test_integrity.py (with a pull against a real Label Studio)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from loop.config import load_config
from loop.images import atomic_write_text
from loop.project import Project
from loop.scheduling import CycleLock, held_by_this_thread, workspace_lock
from loop.synth import write_dataset


def test_workspace_lock_is_the_cycle_lock_and_reentrant_in_its_thread(tmp_path: Path):
    with workspace_lock(tmp_path, "ingest", 5) as took:
        assert took and held_by_this_thread(tmp_path)
        assert CycleLock(tmp_path).is_locked()  # what a cycle (or a flow) would wait for
        assert CycleLock(tmp_path).holder()["what"] == "ingest"
        with workspace_lock(tmp_path, "pull", 5) as again:
            assert again is False  # re-entered: nothing taken
        assert CycleLock(tmp_path).is_locked()
    assert not CycleLock(tmp_path).is_locked() and not held_by_this_thread(tmp_path)


def test_a_flow_holding_the_lock_can_call_methods_that_take_it(tmp_path: Path):
    holder = CycleLock(tmp_path)
    assert holder.acquire("skip", 1, "pull flow run x")
    try:
        with workspace_lock(tmp_path, "pull", 1) as took:
            assert took is False
    finally:
        holder.release()
    assert not held_by_this_thread(tmp_path)


def test_another_thread_waits_for_the_writer(tmp_path: Path):
    order: list[str] = []
    waited: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with workspace_lock(tmp_path, "first", 10):
            inside.set()
            time.sleep(0.5)
            order.append("first done")

    def second() -> None:
        inside.wait()
        with workspace_lock(tmp_path, "second", 10, on_wait=waited.append, poll_s=0.05):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first done", "second in"]
    assert len(waited) == 1 and "first" in waited[0]


def test_project_writes_reload_what_another_writer_saved(tmp_path: Path):
    """A `Project` made before another command wrote the workspace must not overwrite it."""
    write_dataset(tmp_path / "a", 6, seed=1, size=48)
    write_dataset(tmp_path / "b", 6, seed=2, size=48)
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["scratch", "pit", "crack", "patch"]}))
    first, second = Project(load_config(cfg)), Project(load_config(cfg))  # both see nothing
    _, v1 = first.ingest(tmp_path / "a" / "images", tmp_path / "a" / "labels")
    _, v2 = second.ingest(tmp_path / "b" / "images", tmp_path / "b" / "labels")
    assert v1 is not None and v2 is not None and v2.parent == v1.digest
    fresh = Project(load_config(cfg))
    assert len(fresh.pool) == 12 and len(second.pool) == 12
    current = fresh.current_version()
    assert current is not None and current.digest == v2.digest and len(current) == 12


def test_atomic_writes_from_two_writers_never_collide(tmp_path: Path):
    """Two writers used to share one temporary file name: a lost rename or a half file."""
    target = tmp_path / "state.json"
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(300):
                atomic_write_text(target, f'{{"writer": "{tag}", "i": {i}}}' + " " * 2000)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text().startswith('{"writer": ')
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch):
    target = tmp_path / "pool.json"
    atomic_write_text(target, "old")

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("loop.images.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["pool.json"]


def test_push_and_pull_through_the_oracle_gateway_keep_working(tmp_path: Path):
    """The oracle replay drives `Project.push`/`pull` with a stand-in gateway that reports no task
    data and lists no tasks: the ledger and the rejection log must not get in its way."""
    import numpy as np

    from loop.datasets import assign_split
    from loop.detections import Detections
    from loop.project import ScoredImage
    from loop.simulate import OracleGateway, truth_from_yolo_dir

    write_dataset(tmp_path / "d", 24, seed=3, size=48)
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["scratch", "pit", "crack", "patch"]}))
    project = Project(load_config(cfg))
    project.ingest(tmp_path / "d" / "images")
    truth = truth_from_yolo_dir(project.pool, tmp_path / "d" / "labels", 4)
    shas = [s for s in sorted(truth) if assign_split(s, project.cfg.split) != "test"]
    gw = OracleGateway(truth)
    for chunk in (shas[:4], shas[4:8]):
        ranked = [ScoredImage(s, 1.0, Detections.empty((48, 48))) for s in chunk]
        assert project.push(gw, ranked, "m").created == len(chunk)
        out = project.pull(gw)
        assert out.labeled == len(chunk) and out.rejected == [] and out.open_rejections == 0
    version = project.current_version()
    assert version is not None and sorted(version.by_sha()) == sorted(shas[:8])
    for s in shas[:8]:
        row = version.by_sha()[s]
        assert np.allclose(row.boxes.xyxy, truth[s].xyxy)
