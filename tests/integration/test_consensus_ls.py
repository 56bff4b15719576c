"""Overlap on purpose, consensus at pull and the review queue against a real Label Studio 1.23.2
(session fixture `ls_server`): two Label Studio users label the same tasks, a lead resolves a
disagreement, and the annotation log keeps everyone's work."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import yaml

from loop.annotation_log import read_outcomes
from loop.config import load_config
from loop.datasets import assign_split
from loop.detections import Detections
from loop.errors import LabelStudioError
from loop.formats.labelstudio import detections_to_ls_results as to_ls
from loop.labelstudio import LabelStudioGateway
from loop.ledger import TaskLedger
from loop.project import Project, ScoredImage
from loop.synth import write_dataset

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent", "crack"]
WH = (64, 64)
_PASSWORD = "Consensus-test-pw-1"


def _headers(ls_server) -> dict[str, str]:
    return {"Authorization": f"Token {ls_server.token}"}


def _create_user(ls_server, email: str) -> int:
    r = httpx.post(
        f"{ls_server.url}/api/users",
        json={"email": email, "username": email.split("@")[0]},
        headers=_headers(ls_server),
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    return int(r.json()["id"])


def _user_token(ls_server, email: str) -> str:
    """A second Label Studio user that works with its own API token: its password is set with
    Label Studio's own CLI, then it logs in and reads its token, as a person would."""
    svc = ls_server.service
    subprocess.run(
        [str(svc.executable), "reset_password", "--username", email, "--password", _PASSWORD,
         "--data-dir", str(svc.data_dir)],
        env=svc.server_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    with httpx.Client(base_url=ls_server.url, timeout=30) as s:
        s.get("/user/login/")
        csrf = s.cookies.get("csrftoken")
        r = s.post(
            "/user/login/",
            data={"email": email, "password": _PASSWORD, "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{ls_server.url}/user/login/"},
        )
        assert r.status_code == 302, r.text[:300]
        return str(s.get("/api/current-user/token").json()["token"])


def _project(ls_server, monkeypatch, name: str, quality: dict) -> tuple[Project, list[str]]:
    root = Path(ls_server.document_root) / name
    write_dataset(root / "synth", 12, seed=5, size=64)
    cfg_path = root / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "classes": CLASSES,
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": f"defect-loop {name}",
                    "progress": False,
                },
                "select": {"batch_size": 3},
                "quality": quality,
            }
        )
    )
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    project = Project(load_config(cfg_path))
    report, _ = project.ingest(root / "synth" / "images")
    shas = sorted(
        p.sha256 for p in report.added if assign_split(p.sha256, project.cfg.split) == "train"
    )
    return project, shas


def _det(*boxes: tuple[float, float, float, float, int]) -> Detections:
    arr = np.array([b[:4] for b in boxes], dtype=np.float64).reshape(-1, 4)
    return Detections(arr, np.array([b[4] for b in boxes], dtype=np.int64), WH)


def _view_task_ids(ls_server, pid: int, url: str) -> list[int]:
    view = int(parse_qs(urlsplit(url).query)["tab"][0])
    r = httpx.get(
        f"{ls_server.url}/api/tasks",
        params={"project": pid, "view": view, "include": "id"},
        headers=_headers(ls_server),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return sorted(int(t["id"]) for t in r.json()["tasks"])


def test_overlap_consensus_review_queue_and_ground_truth(ls_server, monkeypatch):
    project, shas = _project(
        ls_server,
        monkeypatch,
        "consensus",
        {"overlap_share": 0.67, "overlap_rule": "uncertain", "agreement_threshold": 0.7},
    )
    assert len(shas) >= 4
    # Priorities 4 > 3 > 2: "uncertain" gives overlap to the 2 highest of the 3 pushed.
    shown = Detections(np.array([[4.0, 4, 20, 20]]), np.array([0]), WH, confidence=[0.6])
    ranked = [ScoredImage(sha, float(4 - k), shown) for k, sha in enumerate(shas[:4])]
    gw = project.gateway()
    summary = project.push(gw, ranked, "m1")
    pid = int(project.state.ls_project_id)
    t = [summary.task_ids[s] for s in shas[:3]]
    assert summary.created == 3 and summary.overlap == {shas[0]: 2, shas[1]: 2}

    # The overlap is applied in Label Studio as the config says, and recorded.
    info = httpx.get(f"{ls_server.url}/api/projects/{pid}", headers=_headers(ls_server)).json()
    assert info["show_overlap_first"] is True and info["maximum_annotations"] == 1
    tasks = {x["id"]: x for x in gw.list_tasks(pid)}
    for tid, want in zip(t, (2, 2, 1), strict=True):
        got = httpx.get(f"{ls_server.url}/api/tasks/{tid}", headers=_headers(ls_server)).json()
        assert got["overlap"] == want
        assert tasks[tid]["data"].get("overlap", 1) == want
    ledger = TaskLedger(project.cfg.paths.ledger)
    assert [(ledger.get(pid, x).overlap, ledger.get(pid, x).overlap_rule) for x in t] == [
        (2, "uncertain"),
        (2, "uncertain"),
        (1, ""),
    ]

    # Two Label Studio users: ann (annotated through the admin's token as herself) and bob
    # (his own token, so Label Studio's next-task logic serves him as itself).
    ann = _create_user(ls_server, "ann.consensus@defect-loop.local")
    _create_user(ls_server, "bob.consensus@defect-loop.local")
    bob_token = _user_token(ls_server, "bob.consensus@defect-loop.local")
    agree_a, agree_b = _det((4, 4, 20, 20, 0)), _det((6, 4, 22, 20, 0))  # IoU 0.78
    clash_a, clash_b = _det((10, 10, 40, 40, 0)), _det((10, 10, 40, 40, 1))  # other class
    results = gw.annotate_results
    results(t[0], to_ls(agree_a, CLASSES), lead_time=4.0, completed_by=ann)
    results(t[1], to_ls(clash_a, CLASSES), lead_time=5.0, completed_by=ann)
    with LabelStudioGateway(ls_server.url, bob_token) as bob:
        # Task t[0] still needs a second annotator: Label Studio serves it to bob first.
        nxt = httpx.get(
            f"{ls_server.url}/api/projects/{pid}/next",
            headers={"Authorization": f"Token {bob_token}"},
            timeout=30,
        )
        assert nxt.status_code == 200 and nxt.json()["id"] == t[0]
        bob.annotate(t[0], agree_b, CLASSES, lead_time=6.0)
        bob.annotate(t[1], clash_b, CLASSES, lead_time=7.0)
    # t[2] had no overlap: one annotator is enough.
    results(t[2], to_ls(_det((30, 30, 50, 50, 2)), CLASSES), completed_by=ann)
    # One more overlap task with only one annotator: it waits.
    more = project.push(gw, ranked[3:], "m1")
    t3 = more.task_ids[shas[3]]
    results(t3, to_ls(agree_a, CLASSES), completed_by=ann)

    out = project.pull(gw)
    assert (out.labeled, out.merged, out.waiting, out.review, out.review_new) == (2, 1, 1, 1, 1)
    version = project.current_version()
    assert version is not None and out.new_version == version.digest
    rows = version.by_sha()
    assert shas[1] not in rows and shas[3] not in rows  # in review / waiting: no label
    merged = rows[shas[0]]
    np.testing.assert_allclose(merged.boxes.xyxy, [[5.0, 4.0, 21.0, 20.0]], atol=1e-3)
    assert merged.provenance["consensus"] == "merged"
    assert "consensus" not in rows[shas[2]].provenance  # single: as before
    assert out.review_url is not None and f"/projects/{pid}/data?tab=" in out.review_url
    assert _view_task_ids(ls_server, pid, out.review_url) == [t[1]]

    log = read_outcomes(project.cfg.paths.annotation_log, CLASSES)
    by_task = {o.task_id: o for o in log}
    assert set(by_task) == {t[0], t[1], t[2]}  # the waiting task is not judged yet
    assert by_task[t[1]].status == "review" and by_task[t[1]].version is None
    assert by_task[t[1]].agreement == pytest.approx(0.0)
    who = {a.annotator for a in by_task[t[1]].annotations}
    assert who == {"ann.consensus@defect-loop.local", "bob.consensus@defect-loop.local"}
    assert by_task[t[0]].status == "merged" and by_task[t[0]].version == version.digest
    assert sorted(a.lead_time for a in by_task[t[0]].annotations) == [4.0, 6.0]

    # A lead resolves the disagreement with a ground-truth annotation: it wins on the next pull.
    lead_boxes = _det((10, 10, 40, 40, 1))
    results(t[1], to_ls(lead_boxes, CLASSES), ground_truth=True)
    again = project.pull(gw)
    assert again.labeled == 1 and again.review == 0 and again.new_version is not None
    row = project.current_version().by_sha()[shas[1]]
    np.testing.assert_allclose(row.boxes.xyxy, lead_boxes.xyxy, atol=1e-3)
    assert row.boxes.class_id.tolist() == [1]
    assert row.provenance["consensus"] == "ground_truth"
    assert _view_task_ids(ls_server, pid, again.review_url) == []
    last = read_outcomes(project.cfg.paths.annotation_log, CLASSES)[-1]
    assert (last.task_id, last.status, last.version) == (t[1], "ground_truth", again.new_version)
    assert len(last.annotations) == 3 and sum(a.ground_truth for a in last.annotations) == 1


def test_a_project_whose_label_studio_cohort_would_redraw_overlap_is_refused(ls_server):
    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        pid = gw.ensure_project("defect-loop: cohort", CLASSES)
        gw.ensure_overlap_settings(pid, overlap_first=False)  # fine: 1 annotation per task
        httpx.patch(
            f"{ls_server.url}/api/projects/{pid}",
            json={"maximum_annotations": 2, "overlap_cohort_percentage": 50},
            headers=_headers(ls_server),
            timeout=30,
        ).raise_for_status()
        with pytest.raises(LabelStudioError, match="overlap cohort to 100 %"):
            gw.ensure_overlap_settings(pid, overlap_first=True)


def test_push_sets_and_repairs_the_per_task_overlap(ls_server):
    from loop.labelstudio import PushItem

    det = Detections(np.array([[4.0, 4, 20, 20]]), np.array([0]), WH, confidence=[0.5])
    items = [
        PushItem(f"{0xC0 + i:064x}", f"/data/local-files/?d=images/c{i}.png", det, 1.0, overlap=n)
        for i, n in enumerate((3, 1))
    ]
    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        pid = gw.ensure_project("defect-loop: overlap repair", CLASSES)
        ids = gw.push(pid, items, "m1", CLASSES, progress=False).task_ids
        t3, t1 = ids[items[0].sha256], ids[items[1].sha256]

        def overlap(tid: int) -> int:
            return int(gw._json("read", "GET", f"api/tasks/{tid}")["overlap"])

        assert (overlap(t3), overlap(t1)) == (3, 1)
        # A push cut off between the import and the overlap: the next push completes it.
        gw._json("reset", "PATCH", f"api/tasks/{t3}", body={"overlap": 1})
        again = gw.push(pid, items, "m1", CLASSES, progress=False)
        assert again.created == 0 and (overlap(t3), overlap(t1)) == (3, 1)
