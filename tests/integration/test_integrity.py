"""Nothing lost, nothing forged (issue 15), against a real Label Studio 1.23 server (`ls_server`):

- malformed annotations that Label Studio stores reject their own task only (finding 1);
- two ingests and a pull at once lose nothing (finding 2);
- a forged task (``data.sha256`` or ``data.image`` edited, or a task made by hand) cannot change
  a label, and the frozen test split only changes through an explicit import (finding 3);
- rejected tasks stay listed until they change (finding 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config
from loop.datasets import assign_split
from loop.detections import Detections
from loop.formats.labelstudio import detections_to_ls_results
from loop.project import Project, ScoredImage
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

CLASSES = list(SYNTH_CLASSES)
SIZE = 64


def _setup(ls_server: Any, name: str, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> Path:
    root = Path(ls_server.document_root) / name
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": name,
        "classes": CLASSES,
        "workspace": "ws",
        "labelstudio": {
            "url": ls_server.url,
            "document_root": str(ls_server.document_root),
            "project_title": f"defect-loop integrity {name}",
            "progress": False,
        },
        "select": {"batch_size": 50},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "defect-loop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    return path


def _headers(ls_server: Any) -> dict[str, str]:
    return {"Authorization": f"Token {ls_server.token}"}


def _push(project: Project, shas: list[str]) -> dict[str, int]:
    """Push ``shas`` (no suggestions); sha256 -> task id."""
    ranked = [
        ScoredImage(sha, float(len(shas) - i), Detections.empty((SIZE, SIZE)))
        for i, sha in enumerate(shas)
    ]
    with project.gateway() as gw:
        summary = project.push(gw, ranked, "m1")
    assert summary.failed == 0, summary.failures
    return {sha: summary.task_ids[sha] for sha in shas}


def _box(x1: float, y1: float, x2: float, y2: float, cls: int = 0) -> list[dict[str, Any]]:
    det = Detections(np.array([[x1, y1, x2, y2]]), [cls], (SIZE, SIZE))
    return detections_to_ls_results(det, CLASSES)


def _annotate_raw(ls_server: Any, task_id: int, result: Any) -> None:
    """Store an annotation as a script would. Label Studio may answer 500 for a malformed
    region and still keep it (measured); either way the annotation must now exist."""
    r = httpx.post(
        f"{ls_server.url}/api/tasks/{task_id}/annotations",
        json={"result": result, "was_cancelled": False},
        headers=_headers(ls_server),
        timeout=60,
    )
    task = httpx.get(
        f"{ls_server.url}/api/tasks/{task_id}", headers=_headers(ls_server), timeout=60
    ).json()
    stored = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not stored:
        pytest.skip(f"Label Studio refused to store this annotation ({r.status_code}: {r.text})")


def _patch_data(ls_server: Any, task_id: int, **changes: Any) -> None:
    task = httpx.get(
        f"{ls_server.url}/api/tasks/{task_id}", headers=_headers(ls_server), timeout=60
    ).json()
    r = httpx.patch(
        f"{ls_server.url}/api/tasks/{task_id}",
        json={"data": {**task["data"], **changes}},
        headers=_headers(ls_server),
        timeout=60,
    )
    assert r.status_code == 200, r.text


def _ingested(cfg_path: Path, n: int, seed: int, labels: bool = True) -> tuple[Project, list[str]]:
    root = cfg_path.parent
    write_dataset(root / f"synth{seed}", n, seed=seed, size=SIZE)
    project = Project(load_config(cfg_path))
    report, _ = project.ingest(
        root / f"synth{seed}" / "images", root / f"synth{seed}" / "labels" if labels else None
    )
    return project, sorted(p.sha256 for p in report.accepted.values())


# --- finding 3: forged tasks ------------------------------------------------------------------
def test_a_forged_task_cannot_relabel_a_frozen_test_image(ls_server, monkeypatch):
    """PATCH a task's data.sha256 to a test image's hash and annotate it: the pull relabeled that
    test image with a box drawn on a different image. It must be rejected as tampered, and the
    test label must stay what was imported."""
    cfg_path = _setup(ls_server, "forged", monkeypatch)
    project, shas = _ingested(cfg_path, 40, seed=11)
    before = project.current_version()
    assert before is not None and len(before) == 40
    split = {s: assign_split(s, project.cfg.split) for s in shas}
    test_imgs = [s for s in shas if split[s] == "test"]
    train_imgs = [s for s in shas if split[s] == "train"]
    assert test_imgs and len(train_imgs) >= 3
    victim = test_imgs[0]
    tasks = _push(project, train_imgs[:3])
    forged_sha, forged_url, honest = (tasks[s] for s in train_imgs[:3])
    urls = {s: project.image_url(s) for s in shas}

    _patch_data(ls_server, forged_sha, sha256=victim)  # the attack of the issue
    _patch_data(ls_server, forged_url, image=urls[victim])  # same, through the image path
    with project.gateway() as gw:
        pid = project.ensure_ls_project(gw)
        for tid in (forged_sha, forged_url, honest):
            gw.annotate_results(tid, _box(1, 1, 9, 9, cls=3))
        # A task made by hand (never pushed) claiming the test image.
        made = httpx.post(
            f"{ls_server.url}/api/projects/{pid}/import",
            params={"return_task_ids": "true"},
            json=[{"image": urls[victim], "sha256": victim, "width": SIZE, "height": SIZE}],
            headers=_headers(ls_server),
            timeout=60,
        ).json()["task_ids"][0]
        gw.annotate_results(made, _box(2, 2, 8, 8, cls=3))
        out = project.pull(gw)

    assert out.labeled == 1  # only the honest task
    rejected = {int(r.split(":")[0].split()[-1]): r for r in out.rejected}
    assert sorted(rejected) == sorted([forged_sha, forged_url, made])
    assert "tampered task data" in rejected[forged_sha] and "data.sha256" in rejected[forged_sha]
    assert "tampered task data" in rejected[forged_url] and "data.image" in rejected[forged_url]
    assert "never pushed" in rejected[made]
    after = project.current_version()
    assert after is not None
    old, new = before.by_sha(), after.by_sha()
    for sha in test_imgs:  # every test label exactly as imported
        assert new[sha].split == "test"
        assert new[sha].box_keys(CLASSES) == old[sha].box_keys(CLASSES)
        assert new[sha].provenance["source"] == "import"
    assert new[train_imgs[0]].box_keys(CLASSES) == old[train_imgs[0]].box_keys(CLASSES)
    assert new[train_imgs[2]].provenance["task_id"] == str(honest)
    assert sorted(r["task_id"] for r in project.status()["rejected_tasks"]) == sorted(rejected)

    # Only an explicit import changes a test label.
    lab = cfg_path.parent / "relabel"
    (lab / "images").mkdir(parents=True)
    (lab / "labels").mkdir()
    src = project.pool.abs_path(victim)
    (lab / "images" / src.name).write_bytes(src.read_bytes())
    (lab / "labels" / f"{src.stem}.txt").write_text("1 0.5 0.5 0.25 0.25\n")
    _, version = project.ingest(lab / "images", lab / "labels")
    assert version is not None
    assert version.by_sha()[victim].box_keys(CLASSES) == ["pit:24.000,24.000,40.000,40.000"]


def test_push_refuses_a_task_whose_image_was_swapped(ls_server, monkeypatch):
    cfg_path = _setup(ls_server, "swapped", monkeypatch)
    project, shas = _ingested(cfg_path, 12, seed=12, labels=False)
    train = [s for s in shas if assign_split(s, project.cfg.split) != "test"][:3]
    tasks = _push(project, train[:2])
    _patch_data(ls_server, tasks[train[0]], image=project.image_url(train[1]))
    ranked = [ScoredImage(s, 1.0, Detections.empty((SIZE, SIZE))) for s in train]
    with project.gateway() as gw:
        summary = project.push(gw, ranked, "m2")
    assert summary.failed == 1 and "changed outside defect-loop" in summary.failures[train[0]]
    assert summary.created == 1 and summary.refreshed == 1


# --- findings 1 and 5: malformed annotations, rejections that stay listed -----------------------
MALFORMED = {
    "rotation is text": lambda r: {**r, "value": {**r["value"], "rotation": "abc"}},
    "value is a list": lambda r: {**r, "value": [r["value"]["x"], r["value"]["y"]]},
    "original_width is text": lambda r: {**r, "original_width": "abc"},
}


def test_malformed_annotations_reject_their_task_and_stay_listed_until_it_changes(
    ls_server, monkeypatch
):
    cfg_path = _setup(ls_server, "malformed", monkeypatch)  # labelstudio.max_regions: 1000
    project, shas = _ingested(cfg_path, 30, seed=13, labels=False)
    train = [s for s in shas if assign_split(s, project.cfg.split) != "test"][:8]
    tasks = _push(project, train)
    ids = [tasks[s] for s in train]
    bad = dict(zip(MALFORMED, ids[:3], strict=True))
    for what, tid in bad.items():
        _annotate_raw(ls_server, tid, [MALFORMED[what](_box(4, 4, 20, 20)[0])])
    unknown, crowded, zero = ids[3], ids[4], ids[5]
    with project.gateway() as gw:
        gw.annotate_results(unknown, [{**_box(4, 4, 20, 20)[0], "value": {
            **_box(4, 4, 20, 20)[0]["value"], "rectanglelabels": ["dent"]}}])  # fmt: skip
        many = [r for i in range(1001) for r in _box(i % 60, i % 50, i % 60 + 2, i % 50 + 3)]
        gw.annotate_results(crowded, many)
        _annotate_raw(ls_server, zero, [{**_box(4, 4, 20, 20)[0], "value": {
            **_box(4, 4, 20, 20)[0]["value"], "width": 0}}])  # fmt: skip
        for tid in ids[6:]:
            gw.annotate_results(tid, _box(8, 8, 30, 30, cls=1))
        first = project.pull(gw)
    expected = {*bad.values(), unknown, crowded, zero}
    assert first.labeled == 2  # the good ones went through
    got = {int(r.split(":")[0].split()[-1]) for r in first.rejected}
    assert got == expected and first.open_rejections == len(expected)
    reasons = " ".join(first.rejected)
    assert "rotation must be a number" in reasons and "value must be an object" in reasons
    assert "original_width" in reasons and "1001 regions" in reasons and "zero area" in reasons

    # Nothing changed: the next pull reports nothing new, but nothing is forgotten.
    with project.gateway() as gw:
        second = project.pull(gw)
    assert second.rejected == [] and second.open_rejections == len(expected)
    assert {r["task_id"] for r in Project(load_config(cfg_path)).status()["rejected_tasks"]} == (
        expected
    )
    shown = CliRunner().invoke(app, ["rejections", "-c", str(cfg_path)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    for tid in expected:
        assert f"/data?task={tid}" in shown.output

    # A fixed task leaves the list; a deleted one too.
    with project.gateway() as gw:
        gw.annotate_results(unknown, _box(4, 4, 20, 20, cls=2))
        httpx.delete(
            f"{ls_server.url}/api/tasks/{crowded}", headers=_headers(ls_server), timeout=60
        ).raise_for_status()
        third = project.pull(gw)
    assert third.labeled == 1 and third.rejected == []
    assert {r.task_id for r in project.rejections()} == expected - {unknown, crowded}
    version = project.current_version()
    assert version is not None and version.by_sha()[train[3]].provenance["task_id"] == str(unknown)


# --- finding 2: writers at the same time ----------------------------------------------------
def test_two_ingests_and_a_pull_at_once_lose_nothing(ls_server, monkeypatch):
    """Two ingests of 300 images each both said "pool now 300 images"; the pool held 300 entries
    while 600 files sat on disk, and the current version held only one run's labels."""
    cfg_path = _setup(ls_server, "concurrent", monkeypatch)
    root = cfg_path.parent
    project, shas = _ingested(cfg_path, 20, seed=14, labels=False)
    train = [s for s in shas if assign_split(s, project.cfg.split) != "test"][:6]
    tasks = _push(project, train)
    with project.gateway() as gw:
        for tid in tasks.values():
            gw.annotate_results(tid, _box(3, 3, 12, 12, cls=2))
    for seed in (21, 22):
        write_dataset(root / f"batch{seed}", 300, seed=seed, size=SIZE)
    cli = [sys.executable, "-c", "from loop.cli import app; app()", "ingest"]
    procs = [
        subprocess.Popen(
            [*cli, str(root / f"batch{s}" / "images"), "--labels",
             str(root / f"batch{s}" / "labels"), "-c", str(cfg_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for s in (21, 22)
    ]  # fmt: skip
    pulled: list[Any] = []
    puller = Project(load_config(cfg_path))  # made before the ingests write anything
    thread = threading.Thread(target=lambda: pulled.append(puller.pull(puller.gateway())))
    thread.start()
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    thread.join(timeout=600)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(pulled) == 1 and pulled[0].labeled == 6

    final = Project(load_config(cfg_path))
    on_disk = [p for p in (final.cfg.paths.images).rglob("*.png")]
    assert len(final.pool) == len(on_disk) == 20 + 600
    version = final.current_version()
    assert version is not None and len(version) == 600 + 6
    for seed in (21, 22):
        labels = root / f"batch{seed}" / "labels"
        for img in sorted((root / f"batch{seed}" / "images").iterdir())[::37]:
            sha = next(p.sha256 for p in final.pool if p.source == str(img))
            row = version.by_sha()[sha]
            assert row.provenance["file"] == str(labels / f"{img.stem}.txt")
    for sha, tid in tasks.items():
        assert version.by_sha()[sha].provenance["task_id"] == str(tid)
    counts = sorted(int(o.split("pool now ")[1].split()[0]) for o in outputs)
    assert counts == [320, 620]  # the second one saw the first one's images
    # The lineage is a chain: every version was built on the one before it.
    chain, digest = [], version.digest
    while digest:
        chain.append(digest)
        meta = json.loads((final.store.path(digest) / "meta.json").read_text())
        digest = meta.get("parent")
    assert len(chain) == 3  # two imports and one pull, each on top of the one before
