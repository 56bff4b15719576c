"""Label review tasks against a real Label Studio 1.23.2 (session fixture `ls_server`).

The out-of-sample predictions are faked (each image's own labels, confident, plus one extra
confident box on one imported image: a box its label is missing), so no model trains; the
ranking is cleanlab's and everything sent to and read from Label Studio is real:

- suspects whose image already has a labeler's task get that task marked (no second task),
  imported images get a new task holding their current label as a (non ground-truth)
  annotation, and every review task shows the model's disagreeing boxes as a "review:crossfit"
  prediction, listed by the "Label review" view in rank order; the project's model version (the
  labeling queue's) is untouched;
- a pull right after the push makes no new version and credits no imported label to anyone;
- a test labeler corrects the imported image's label in its review task, and the next pull makes
  a new version that differs from the previous one by exactly that correction;
- pushing again duplicates neither tasks nor review predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.dataset_diff import diff_versions
from loop.datasets import assign_split
from loop.detections import Detections
from loop.formats.labelstudio import detections_to_ls_results
from loop.formats.labelstudio_review import REVIEW_MODEL_VERSION, REVIEW_VIEW_TITLE
from loop.label_errors import find_label_errors, label_checks, suspects_to_json
from loop.project import Project, ScoredImage
from loop.review_tasks import ReviewRecord, Suspects, push_review_tasks
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

CLASSES = list(SYNTH_CLASSES)


def _api(ls_server: Any, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(
        method,
        f"{ls_server.url}/{path}",
        headers={"Authorization": f"Token {ls_server.token}"},
        timeout=30,
        **kw,
    )
    assert r.status_code < 400, r.text
    return r.json() if r.content else None


def _confident(d: Detections) -> Detections:
    return Detections(d.xyxy, d.class_id, d.image_wh, confidence=np.full(len(d), 0.95))


def _free_corner(d: Detections) -> np.ndarray:
    """A 14 px box in a corner that overlaps no labeled box."""
    w, h = d.image_wh
    for x, y in ((1, 1), (w - 15, 1), (1, h - 15), (w - 15, h - 15)):
        box = np.array([x, y, x + 14, y + 14], dtype=float)
        if not len(d) or not np.any(
            (d.xyxy[:, 0] < box[2]) & (d.xyxy[:, 2] > box[0])
            & (d.xyxy[:, 1] < box[3]) & (d.xyxy[:, 3] > box[1])
        ):  # fmt: skip
            return box
    raise AssertionError("no free corner")


@pytest.fixture()
def project(ls_server, monkeypatch, tmp_path_factory) -> Project:
    root = Path(ls_server.document_root) / tmp_path_factory.mktemp("review").name
    cfg_path = root / "defect-loop.yaml"
    root.mkdir(parents=True)
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": root.name,
                "classes": CLASSES,
                "workspace": "ws",
                "split": {"val": 0.25, "test": 0.1},
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "project_title": f"defect-loop review {root.name}",
                    "progress": False,
                },
                "select": {"batch_size": 3},
            }
        )
    )
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    write_dataset(root / "imported", 10, seed=11, size=64)
    write_dataset(root / "labeled", 8, seed=12, size=64)
    return Project(load_config(cfg_path))


def test_suspects_become_review_tasks_and_a_correction_makes_a_version(project, ls_server):
    root = project.cfg.paths.root.parent
    project.ingest(root / "imported" / "images", root / "imported" / "labels")
    report, _ = project.ingest(root / "labeled" / "images")
    imported = {r.sha256 for r in project.current_version().rows}

    # Three new images go through the normal loop: pushed, labeled by a labeler, pulled.
    fresh = sorted(
        p.sha256 for p in report.added if assign_split(p.sha256, project.cfg.split) != "test"
    )[:3]
    gw = project.gateway()
    wh = (64, 64)
    ranked = [
        ScoredImage(s, float(3 - i), _confident(Detections(np.array([[5.0, 5, 30, 30]]), [0], wh)))
        for i, s in enumerate(fresh)
    ]
    project.push(gw, ranked, "m1")
    pid = project.state.ls_project_id
    for sha in fresh:
        gw.annotate(
            project.state.pending[sha],
            Detections(np.array([[6.0, 6, 30, 30]]), [1], wh),
            CLASSES,
            lead_time=3.0,
        )
    pulled = project.pull(gw)
    assert pulled.labeled == 3 and pulled.new_version is not None
    version = project.current_version()
    tasks_before = {t["data"]["sha256"]: t["id"] for t in gw.list_tasks(pid)}
    assert set(tasks_before) == set(fresh)

    # Fake out-of-sample predictions: each image's own labels, plus a missing box on one
    # imported image (the victim), which cleanlab must rank first.
    rows = {r.sha256: r for r in version.rows if r.split != "test"}
    victim = next(s for s in sorted(rows) if s in imported and len(rows[s].boxes))
    preds = {s: _confident(r.boxes) for s, r in rows.items()}
    v = rows[victim].boxes
    extra = _free_corner(v)
    preds[victim] = Detections(
        np.vstack([v.xyxy, extra]),
        np.append(v.class_id, 2),
        v.image_wh,
        confidence=np.full(len(v) + 1, 0.95),
    )
    ranked_rows = suspects_to_json(
        find_label_errors(label_checks(version, preds), len(CLASSES)), version
    )
    assert ranked_rows[0]["sha256"] == victim and ranked_rows[0]["issue"] == "overlooked"
    suspects = Suspects(
        version,
        [{**r, "source": project.pool.get(r["sha256"]).source} for r in ranked_rows],
        preds,
        folds=3,
        seed=0,
    )
    top = len(ranked_rows)  # every train and val image: labeler tasks and imported ones
    summary = push_review_tasks(project, gw, suspects, top, progress=False)

    n_imported = sum(1 for s in rows if s in imported)
    assert summary.failures == {}
    assert (summary.flagged, summary.created) == (3, n_imported)
    assert set(summary.seeded) == {s for s in rows if s in imported}
    tasks = {t["data"]["sha256"]: t for t in gw.list_tasks(pid)}
    assert len(tasks) == len(fresh) + n_imported  # no image has two tasks
    for sha in fresh:  # the labeler's task is marked, not duplicated; its annotation kept
        assert tasks[sha]["id"] == tasks_before[sha]
        assert len(tasks[sha]["annotations"]) == 1
    rank = {r["sha256"]: r["rank"] for r in ranked_rows}
    for sha, t in tasks.items():
        assert t["data"]["review_rank"] == rank[sha]
        assert t["data"]["review_version"] == version.digest
        review = [p for p in t["predictions"] if p["model_version"] == REVIEW_MODEL_VERSION]
        assert len(review) == 1
    # Imported images: a task holding their current label, not ground truth.
    for sha in summary.seeded:
        (ann,) = tasks[sha]["annotations"]
        assert ann["id"] == summary.seeded[sha] and not ann["ground_truth"]
        got = len([r for r in ann["result"] if r["type"] == "rectanglelabels"])
        assert got == len(rows[sha].boxes)
    # The victim's review prediction holds exactly the box its label lacks.
    (vpred,) = [
        p for p in tasks[victim]["predictions"] if p["model_version"] == REVIEW_MODEL_VERSION
    ]
    assert len(vpred["result"]) == 1 and vpred["result"][0]["value"]["rectanglelabels"] == [
        CLASSES[2]
    ]
    # The task view the Data Manager opens shows the review prediction; the labeling queue's
    # model version is untouched.
    full = _api(ls_server, "GET", f"api/tasks/{tasks[victim]['id']}")
    assert REVIEW_MODEL_VERSION in {p["model_version"] for p in full["predictions"]}
    assert gw.project_info(pid)["model_version"] == "m1"
    # The "Label review" view lists the review tasks, most suspect first.
    views = _api(ls_server, "GET", "api/dm/views", params={"project": pid})
    (view,) = [x for x in views if x["data"]["title"] == REVIEW_VIEW_TITLE]
    assert view["id"] == summary.view_id
    listed = _api(ls_server, "GET", "api/tasks", params={"view": view["id"], "project": pid})
    listed_shas = [t["data"]["sha256"] for t in listed["tasks"]]
    assert listed_shas == [r["sha256"] for r in ranked_rows]
    # Recorded: tasks in the ledger, the run with its scores.
    run = ReviewRecord(project.cfg.paths.label_review).latest()
    assert run is not None and run["version"] == version.digest
    assert {t["sha256"]: t["quality"] for t in run["tasks"]} == {
        r["sha256"]: r["quality"] for r in ranked_rows
    }

    # A pull now: nothing changed, no version, no imported label credited to the token's user.
    again = project.pull(gw)
    assert again.new_version is None and again.rejected == []

    # The reviewer corrects the victim: adds the missing box to the shown label (Update).
    corrected = Detections(np.vstack([v.xyxy, extra]), np.append(v.class_id, 2), v.image_wh)
    _api(
        ls_server,
        "PATCH",
        f"api/annotations/{summary.seeded[victim]}",
        json={"result": detections_to_ls_results(corrected, CLASSES)},
    )
    out = project.pull(gw)
    assert out.rejected == [] and out.new_version is not None and out.parent == version.digest
    new = project.current_version()
    diff = diff_versions(version, new)
    assert diff.relabeled == (victim,) and diff.added == () and diff.removed == ()
    assert new.by_sha()[victim].boxes.same_boxes(corrected, atol=1e-3)
    assert new.by_sha()[victim].provenance["source"] == "labelstudio"
    untouched = next(s for s in summary.seeded if s != victim)
    assert new.by_sha()[untouched].provenance == version.by_sha()[untouched].provenance

    # Pushing again (same suspects, e.g. a retry) marks the same tasks: no duplicates.
    suspects2 = Suspects(new, suspects.rows, preds, folds=3, seed=0)
    s2 = push_review_tasks(project, gw, suspects2, top, progress=False)
    assert s2.created == 0 and s2.flagged == len(tasks) and s2.seeded == {}
    tasks2 = gw.list_tasks(pid)
    assert len(tasks2) == len(tasks)
    for t in tasks2:
        assert [p["model_version"] for p in t["predictions"]].count(REVIEW_MODEL_VERSION) == 1


# --- the cycle option, under the Prefect test harness ---------------------------------------
def test_cycle_with_review_labels_pushes_the_suspects_once_per_version(
    project, ls_server, prefect_harness, monkeypatch
):
    """`cycle --review-labels` (or ``label_review.every_cycle``) ends with the label review:
    the fold trainings and predictions are faked (no model trains), the other cycle steps are
    stand-ins, the review push goes to the real Label Studio. A second cycle on the same
    version pushes nothing again; without the option there is no review step."""
    import flows.cycle as cycle_mod
    from flows.cycle import cycle_flow
    from loop import model
    from loop.labeling import PushSummary

    root = project.cfg.paths.root.parent
    project.ingest(root / "imported" / "images", root / "imported" / "labels")
    version = project.current_version()
    cfg_path = root / "defect-loop.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    doc["label_review"] = {"folds": 2, "top_k": 3}
    cfg_path.write_text(yaml.safe_dump(doc))

    trainings: list[str] = []

    def fake_train(data_yaml: Path, out_dir: Path, cfg: Any, ycd: Path, **kw: Any) -> Any:
        trainings.append(kw["name"])
        return type("R", (), {"weights": out_dir / kw["name"] / "best.pt"})()

    def fake_predict(weights: Path, images: Any, *a: Any, **kw: Any) -> Any:
        return [
            Detections(np.array([[1.0, 1, 15, 15]]), [0], (64, 64), confidence=[0.9])
            for _ in images
        ]

    monkeypatch.setattr(model, "train", fake_train)
    monkeypatch.setattr(model, "predict", fake_predict)
    # The steps before the review: stand-ins (their own tests train and score for real).
    monkeypatch.setattr(cycle_mod, "last_trained_task", lambda ctx: version.digest)
    monkeypatch.setattr(cycle_mod, "run_score", lambda ctx: (None, []))
    monkeypatch.setattr(cycle_mod, "model_version_name", lambda ctx, models: "m1")
    monkeypatch.setattr(cycle_mod, "push_task", lambda ctx, ranked, mv: PushSummary())
    monkeypatch.setattr(cycle_mod, "run_report", lambda ctx: None)

    plain = cycle_flow(str(cfg_path), pull=False)
    assert plain.review is None and trainings == []

    out = cycle_flow(str(cfg_path), pull=False, review_labels=True)
    assert out.review is not None and out.review.version == version.digest
    assert out.review.push is not None and out.review.push.created == 3
    assert len(trainings) == 2  # label_review.folds
    pid = Project(load_config(cfg_path)).state.ls_project_id
    with Project(load_config(cfg_path)).gateway() as gw:
        tasks = gw.list_tasks(pid)
    assert sorted(t["data"]["review_rank"] for t in tasks) == [1, 2, 3]

    doc["label_review"]["every_cycle"] = True
    cfg_path.write_text(yaml.safe_dump(doc))
    again = cycle_flow(str(cfg_path), pull=False)
    assert again.review is not None and again.review.push is None
    assert "already in Label Studio" in (again.review.skipped or "")
    assert len(trainings) == 2


def test_the_command_pushes_review_tasks_and_says_where(project, ls_server, monkeypatch):
    """`defect-loop review-labels --folds 2 --top 2` end to end (fold models faked): two review
    tasks in Label Studio, the record written, and the output names the view to open."""
    from typer.testing import CliRunner

    from loop import model
    from loop.cli import app
    from loop.cli.common import console

    root = project.cfg.paths.root.parent
    project.ingest(root / "imported" / "images", root / "imported" / "labels")
    monkeypatch.setattr(console, "_width", 300)

    def fake_train(data_yaml: Path, out_dir: Path, cfg: Any, ycd: Path, **kw: Any) -> Any:
        return type("R", (), {"weights": out_dir / kw["name"] / "best.pt"})()

    def fake_predict(weights: Path, images: Any, *a: Any, **kw: Any) -> Any:
        return [
            Detections(np.array([[1.0, 1, 15, 15]]), [3], (64, 64), confidence=[0.9])
            for _ in images
        ]

    monkeypatch.setattr(model, "train", fake_train)
    monkeypatch.setattr(model, "predict", fake_predict)
    cfg_path = root / "defect-loop.yaml"
    r = CliRunner().invoke(
        app, ["review-labels", "--folds", "2", "--top", "2", "-c", str(cfg_path)]
    )
    assert r.exit_code == 0, r.output
    assert "0 existing tasks marked, 2 created" in r.output
    fresh = Project(load_config(cfg_path))
    pid = fresh.state.ls_project_id
    run = ReviewRecord(fresh.cfg.paths.label_review).latest()
    assert run is not None and len(run["tasks"]) == 2
    assert f"{ls_server.url}/projects/{pid}/data?tab={run['view_id']}" in r.output
    with fresh.gateway() as gw:
        tasks = gw.list_tasks(pid)
    assert sorted(t["data"]["review_rank"] for t in tasks) == [1, 2]
    # Each shows the model's box that the label lacks (class "patch" at the top-left corner).
    for t in tasks:
        (p,) = [p for p in t["predictions"] if p["model_version"] == REVIEW_MODEL_VERSION]
        assert [x["value"]["rectanglelabels"] for x in p["result"]] == [["patch"]]
