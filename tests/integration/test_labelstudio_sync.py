"""Project set-up, queue order, refresh, incremental pull, rejections and reliability against a
real Label Studio 1.23.2 (session fixture `ls_server`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.datasets import assign_split
from loop.detections import Detections
from loop.errors import ServiceError
from loop.formats.labelstudio import UnsafeImagePathError, detections_to_ls_results
from loop.labelstudio import LabelStudioGateway, PushItem
from loop.labelstudio import transport as ls_transport
from loop.labelstudio.projects import PRIORITY_VIEW_TITLE
from loop.project import Project, ScoredImage
from loop.synth import write_dataset

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent", "crack"]
GUIDE = "Box every defect tightly.\n\nIf unsure, ask the line lead."
WH = (64, 48)


@pytest.fixture()
def gw(ls_server):
    with LabelStudioGateway(ls_server.url, ls_server.token) as g:
        yield g


def _headers(ls_server) -> dict[str, str]:
    return {"Authorization": f"Token {ls_server.token}"}


def _item(i: int, priority: float, n_boxes: int = 2) -> PushItem:
    rng = np.random.default_rng(i)
    x1 = rng.uniform(0, 30, n_boxes)
    y1 = rng.uniform(0, 20, n_boxes)
    xyxy = np.stack([x1, y1, x1 + rng.uniform(4, 30, n_boxes), y1 + rng.uniform(4, 25, n_boxes)], 1)
    det = Detections(
        xyxy, np.arange(n_boxes) % len(CLASSES), WH, confidence=rng.uniform(0.3, 0.9, n_boxes)
    )
    return PushItem(f"{i:064x}", f"/data/local-files/?d=images/s{i}.png", det, priority)


def _by_sha(gw, pid) -> dict[str, dict[str, Any]]:
    return {t["data"]["sha256"]: t for t in gw.list_tasks(pid)}


def _next_task(ls_server, pid: int, view: int | None = None) -> int:
    params = {"view": view} if view is not None else {}
    r = httpx.get(
        f"{ls_server.url}/api/projects/{pid}/next",
        params=params,
        headers=_headers(ls_server),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return int(r.json()["id"])


# --- project set-up ----------------------------------------------------------------------------
def test_project_setup_from_config_is_guided_and_keeps_its_identity(gw, ls_server):
    title = "defect-loop: setup"
    pid = gw.ensure_project(title, CLASSES, GUIDE, polygons=True)
    info = gw.project_info(pid)
    assert info["classes"] == CLASSES and info["polygons"]
    assert info["show_instruction"] is True
    assert "Box every defect tightly." in info["expert_instruction"]
    assert "NO regions" in info["expert_instruction"]
    assert 'name="verdict"' in info["label_config"] and "defect-free" in info["label_config"]
    assert info["label_config"].count('background="#') == 2 * len(CLASSES)
    views = httpx.get(
        f"{ls_server.url}/api/dm/views",
        params={"project": pid},
        headers=_headers(ls_server),
        timeout=30,
    ).json()
    (view,) = [v for v in views if v["data"].get("title") == PRIORITY_VIEW_TITLE]
    assert view["data"]["ordering"] == ["-tasks:data.priority"]
    # Idempotent: same project, same single view.
    assert gw.ensure_project(title, CLASSES, GUIDE, polygons=True) == pid
    assert gw.ensure_priority_view(pid) == view["id"]
    # Renamed in the UI: the remembered id still finds it; the title is left as the user set it.
    gw._client.projects.update(pid, title="renamed by a lead")
    assert gw.ensure_project(title, CLASSES, GUIDE, project_id=pid) == pid
    assert gw.project_info(pid)["title"] == "renamed by a lead"
    # Polygons off again: the config is updated in place.
    assert gw.ensure_project(title, CLASSES, GUIDE, project_id=pid) == pid
    assert gw.project_info(pid)["polygons"] is False


# --- push: refresh and queue order ------------------------------------------------------------
def test_new_model_version_refreshes_waiting_tasks_and_uncertainty_follows_it(gw, ls_server):
    pid = gw.ensure_project("defect-loop: refresh", CLASSES, GUIDE)
    items = [_item(i, p) for i, p in enumerate([9.0, 5.0, 2.0, 1.0])]
    s1 = gw.push(pid, items, "m1", CLASSES, progress=False)
    assert (s1.created, s1.refreshed, s1.skipped, s1.failed) == (4, 0, 0, 0)
    # Same images, new model: priorities reversed (the old top is now the least valuable).
    new_prio = [0.0, 1.0, 2.0, 3.0]
    again = [
        PushItem(it.sha256, it.image_url, it.detections[:1], p)
        for it, p in zip(items, new_prio, strict=True)
    ]
    t0 = time.monotonic()
    s2 = gw.push(pid, again, "m2", CLASSES, progress=False)
    refresh_s = time.monotonic() - t0
    assert (s2.created, s2.refreshed, s2.skipped, s2.failed) == (0, 4, 0, 0)
    assert s2.task_ids == s1.task_ids
    s3 = gw.push(pid, again, "m2", CLASSES, progress=False)  # same version again: nothing to do
    assert (s3.created, s3.refreshed, s3.skipped) == (0, 0, 4)
    tasks = _by_sha(gw, pid)
    assert len(tasks) == 4
    for it, p in zip(again, new_prio, strict=True):
        t = tasks[it.sha256]
        assert [pr["model_version"] for pr in t["predictions"]] == ["m1", "m2"]
        latest = t["predictions"][-1]
        assert latest["score"] == pytest.approx(1 / (1 + p))
        assert len(latest["result"]) == 1 and latest["result"][0]["score"] > 0
        assert t["data"]["priority"] == p  # the view's sort key follows
    assert gw.project_info(pid)["model_version"] == "m2"
    # The old top (m1 score 0.1) must not win: only m2 predictions count.
    assert _next_task(ls_server, pid) == s1.task_ids[items[3].sha256]
    print(f"refresh of 4 tasks {refresh_s:.2f}s")


def test_priority_view_orders_label_all_tasks(gw, ls_server):
    pid = gw.ensure_project("defect-loop: view order", CLASSES, GUIDE)
    prios = [1.0, 3.0, 0.5, 2.0]  # pushed out of rank order on purpose: ids do not follow rank
    items = [_item(10 + i, p) for i, p in enumerate(prios)]
    s = gw.push(pid, items, "m1", CLASSES, progress=False)
    view = gw.ensure_priority_view(pid)
    by_rank = [s.task_ids[it.sha256] for it in sorted(items, key=lambda it: -it.priority)]
    listed = httpx.get(
        f"{ls_server.url}/api/tasks",
        params={"project": pid, "view": view, "include": "id"},
        headers=_headers(ls_server),
        timeout=30,
    ).json()["tasks"]
    assert [t["id"] for t in listed] == by_rank
    # Sequential sampling with the view ("Label All Tasks" from that tab) serves the top first.
    gw._client.projects.update(pid, sampling="Sequential sampling")
    assert _next_task(ls_server, pid, view=view) == by_rank[0] != min(by_rank)


# --- pull -------------------------------------------------------------------------------------
def _rect(x, y, w, h, label, **value):
    return {
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": WH[0],
        "original_height": WH[1],
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, **value,
                  "rectanglelabels": [label]},
    }  # fmt: skip


def test_incremental_pull_sees_new_updated_and_deleted_annotations(gw):
    pid = gw.ensure_project("defect-loop: incremental", CLASSES, GUIDE)
    items = [_item(20 + i, float(i)) for i in range(4)]
    ids = [gw.push(pid, items, "m1", CLASSES, progress=False).task_ids[it.sha256] for it in items]
    a0 = gw.annotate_results(ids[0], [_rect(10, 10, 20, 20, "dent")], lead_time=4.0)
    a1 = gw.annotate_results(ids[1], [])
    first = gw.pull(pid, CLASSES)
    assert first.full and first.cursor
    assert sorted(lb.task_id for lb in first.labels) == [ids[0], ids[1]]
    known = {lb.task_id: lb.sha256 for lb in first.labels}

    nothing = gw.pull(pid, CLASSES, since=first.cursor, known_labeled=known)
    assert not nothing.full and nothing.labels == [] and nothing.unlabeled_task_ids == []
    assert nothing.cursor == first.cursor

    gw._client.annotations.update(a0, result=[_rect(1, 1, 5, 5, "crack")])
    gw.delete_annotation(a1)
    gw.annotate_results(ids[2], [_rect(50, 50, 10, 10, "scratch")])
    gw.annotate_results(ids[3], [], was_cancelled=True)
    second = gw.pull(pid, CLASSES, since=first.cursor, known_labeled=known)
    by = {lb.task_id: lb for lb in second.labels}
    assert sorted(by) == [ids[0], ids[2]]
    assert by[ids[0]].detections.class_id.tolist() == [CLASSES.index("crack")]
    assert second.unlabeled_task_ids == [ids[1]]
    assert second.unlabeled_sha256 == [items[1].sha256]
    assert second.skipped_task_ids == [ids[3]]
    assert second.cursor is not None and second.cursor > first.cursor
    third = gw.pull(pid, CLASSES, since=second.cursor, known_labeled=known)
    assert third.labels == [] and third.unlabeled_task_ids == [ids[1]]  # still unlabeled


def test_bad_tasks_are_rejected_with_their_id_and_never_block_the_others(gw, ls_server):
    pid = gw.ensure_project("defect-loop: rejections", CLASSES, GUIDE)
    items = [_item(30 + i, 1.0) for i in range(4)]
    ids = [gw.push(pid, items, "m1", CLASSES, progress=False).task_ids[it.sha256] for it in items]
    gw.annotate_results(ids[0], [_rect(10, 10, 20, 20, "dent")])  # good
    gw.annotate_results(ids[1], [_rect(10, 10, 20, 20, "hole")])  # unknown label
    gw.annotate_results(ids[2], [_rect(10, 10, 20, 20, "dent", rotation=15)])  # rotated
    gw.annotate_results(ids[3], [_rect(90, 10, 20, 20, "dent")])  # x + width > 100 %
    escaping = gw._raw(
        "POST",
        f"api/projects/{pid}/import",
        params={"return_task_ids": "true"},
        body=[
            {
                "data": {
                    "image": "/data/local-files/?d=../../etc/passwd",
                    "sha256": "e" * 64,
                    "width": WH[0],
                    "height": WH[1],
                    "priority": 0.0,
                },
                "annotations": [{"result": [_rect(1, 1, 5, 5, "dent")]}],
            }
        ],
    ).json()["task_ids"][0]
    res = gw.pull(pid, CLASSES, document_root=ls_server.document_root)
    assert [lb.task_id for lb in res.labels] == [ids[0]]
    rej = {r.task_id: r for r in res.rejected}
    assert sorted(rej) == sorted([ids[1], ids[2], ids[3], escaping])
    assert "UnknownLabelError" in str(rej[ids[1]]) and "hole" in rej[ids[1]].reason
    assert "rotated" in rej[ids[2]].reason
    assert "outside the image" in rej[ids[3]].reason
    assert isinstance(rej[escaping].__cause__, UnsafeImagePathError)


def test_polygons_defect_free_choice_and_several_annotators(gw, ls_server):
    pid = gw.ensure_project("defect-loop: polygons", CLASSES, GUIDE, polygons=True)
    items = [_item(40 + i, 1.0) for i in range(3)]
    ids = [gw.push(pid, items, "m1", CLASSES, progress=False).task_ids[it.sha256] for it in items]
    poly = {
        "type": "polygonlabels",
        "from_name": "polygon",
        "to_name": "image",
        "original_width": WH[0],
        "original_height": WH[1],
        "value": {"points": [[25, 25], [50, 20], [40, 75]], "polygonlabels": ["crack"]},
    }
    gw.annotate_results(ids[0], [poly])
    verdict = {
        "type": "choices",
        "from_name": "verdict",
        "to_name": "image",
        "value": {"choices": ["defect-free"]},
    }
    gw.annotate_results(ids[1], [verdict])
    r = httpx.post(
        f"{ls_server.url}/api/users",
        json={"email": "second.labeler@defect-loop.local", "username": "second-labeler"},
        headers=_headers(ls_server),
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    second = int(r.json()["id"])
    box = detections_to_ls_results(Detections(np.array([[5.0, 5, 30, 30]]), [1], WH), CLASSES)
    other = detections_to_ls_results(Detections(np.array([[6.0, 5, 30, 31]]), [1], WH), CLASSES)
    gw.annotate_results(ids[2], box, lead_time=3.0)
    gw.annotate_results(ids[2], other, lead_time=5.0, completed_by=second)
    res = gw.pull(pid, CLASSES)
    by = {lb.task_id: lb for lb in res.labels}
    assert res.rejected == []
    np.testing.assert_allclose(by[ids[0]].detections.xyxy, [[16.0, 9.6, 32.0, 36.0]], atol=1e-6)
    assert len(by[ids[1]].detections) == 0  # defect-free by the choice
    multi = by[ids[2]]
    assert multi.annotator == "second.labeler@defect-loop.local"  # the latest wins
    assert set(multi.annotators) == {ls_server.service.username, multi.annotator}
    assert multi.agreement == pytest.approx(1.0)
    assert len(multi.per_annotator) == 2


# --- reliability -------------------------------------------------------------------------------
def test_push_interrupted_by_a_stopped_server_completes_on_the_next_run(ls_server, monkeypatch):
    monkeypatch.setattr(ls_transport, "_BACKOFF_S", 0.01)
    svc = ls_server.service
    items = [_item(50 + i, float(10 - i)) for i in range(6)]
    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        pid = gw.ensure_project("defect-loop: interrupted", CLASSES, GUIDE)
        real = gw._raw
        imports = []

        def stop_before_second_batch(method, path, **kw):
            if method == "POST" and path.endswith("/import"):
                imports.append(path)
                if len(imports) == 2:
                    svc.stop()
            return real(method, path, **kw)

        monkeypatch.setattr(gw, "_raw", stop_before_second_batch)
        try:
            with pytest.raises(ServiceError) as info:
                gw.push(pid, items, "m1", CLASSES, batch_size=2, progress=False)
        finally:
            svc.start()
    msg = str(info.value)
    assert "push interrupted after 2 of 6 new tasks" in msg and "run the push again" in msg
    assert "unreachable" in msg
    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        s = gw.push(pid, items, "m1", CLASSES, batch_size=2, progress=False)
        assert (s.created, s.skipped, s.failed) == (4, 2, 0)
        tasks = gw.list_tasks(pid)
    shas = [t["data"]["sha256"] for t in tasks]
    assert sorted(shas) == sorted(it.sha256 for it in items) and len(set(shas)) == 6


# --- the Project steps: push, pull, corrections.json, deletions ---------------------------------
def test_project_pull_writes_corrections_and_drops_deleted_labels(ls_server, monkeypatch):
    root = Path(ls_server.document_root) / "project-sync"
    write_dataset(root / "synth", 10, seed=3, size=64)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "project-sync",
                "classes": CLASSES,
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": "defect-loop project sync test",
                    "progress": False,
                },
                "select": {"batch_size": 3},
            }
        )
    )
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    project = Project(load_config(cfg_path))
    report, _ = project.ingest(root / "synth" / "images")
    # Test-split images are never pushed (the test split is frozen).
    shas = sorted(
        p.sha256 for p in report.added if assign_split(p.sha256, project.cfg.split) != "test"
    )[:4]
    ranked = [
        ScoredImage(
            sha,
            float(4 - k),
            Detections(np.array([[4.0, 4, 20, 20], [30, 30, 50, 40]]), [0, 1], (64, 64),
                       confidence=[0.8, 0.4]),
        )
        for k, sha in enumerate(shas)
    ]  # fmt: skip
    gw = project.gateway()
    s = project.push(gw, ranked, "m1")
    assert (s.created, s.refreshed) == (3, 0)  # select.batch_size
    assert set(project.state.pending) == set(shas[:3])
    tid = project.state.pending
    url = gw.list_tasks(project.state.ls_project_id)[0]["data"]["image"]
    assert url.startswith("/data/local-files/?d=") and ".." not in url
    assert (
        httpx.get(ls_server.url + url, headers=_headers(ls_server), timeout=30).status_code == 200
    )

    # Accept one suggestion and move the other; say the second image is defect-free.
    w = (64, 64)
    gw.annotate(tid[shas[0]], Detections(np.array([[4.0, 4, 20, 20], [40, 30, 60, 40]]), [0, 1], w),
                CLASSES, lead_time=7.0)  # fmt: skip
    gw.annotate(tid[shas[1]], Detections.empty(w), CLASSES, lead_time=2.0)
    out = project.pull(gw)
    assert out.labeled == 2 and out.new_version is not None and out.unlabeled == []
    doc = json.loads((project.store.path(out.new_version) / "corrections.json").read_text())
    assert doc["tasks"] == 2 and sorted(doc["lead_times"]) == [2.0, 7.0]
    assert doc["per_class"]["scratch"]["accepted"] == 1
    assert doc["per_class"]["scratch"]["removed"] == 1
    assert doc["per_class"]["dent"]["removed"] == 2 and doc["per_class"]["dent"]["added"] == 1
    assert {im["sha256"] for im in doc["images"]} == {shas[0], shas[1]}
    assert out.corrections["corrections.tasks"] == 2.0
    assert out.cursor == project.state.pull_cursor
    version = project.current_version()
    assert version is not None and {shas[0], shas[1]} <= set(version.by_sha())
    assert version.by_sha()[shas[0]].provenance["project_id"] == str(project.state.ls_project_id)
    assert shas[0] not in project.state.pending

    # Nothing changed: no new version.
    again = project.pull(gw)
    assert again.labeled == 0 and again.new_version is None

    # The labeler deletes an annotation: the image loses its label and waits again.
    task = next(t for t in gw.list_tasks(project.state.ls_project_id)
                if t["data"]["sha256"] == shas[1])  # fmt: skip
    gw.delete_annotation(task["annotations"][0]["id"])
    dropped = project.pull(gw)
    assert dropped.unlabeled == [shas[1]] and dropped.new_version is not None
    assert shas[1] not in project.current_version().by_sha()
    assert project.state.pending[shas[1]] == task["id"]

    # A new model version refreshes what still waits (ranked again, pending included).
    s2 = project.push(gw, ranked, "m2")
    assert s2.refreshed == 2 and s2.created == 1 and s2.skipped == 1
