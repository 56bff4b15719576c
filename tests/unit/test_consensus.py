"""Consensus at pull and the overlap choice (`loop.consensus`): known answers, seeded draws."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from loop.annotation_log import AnnotationRecord
from loop.consensus import choose_overlap, decide, fuse_boxes, overlap_count
from loop.detections import Detections
from loop.errors import ConfigError

WH = (100, 100)


def _det(*boxes: tuple[float, float, float, float, int]) -> Detections:
    arr = np.array([b[:4] for b in boxes], dtype=np.float64).reshape(-1, 4)
    return Detections(arr, np.array([b[4] for b in boxes], dtype=np.int64), WH)


def _rec(name: str, det: Detections, minute: int = 0, gt: bool = False) -> AnnotationRecord:
    when = datetime(2026, 12, 1, 12, minute, tzinfo=UTC)
    return AnnotationRecord(name, 100 + minute, det, 3.0, when, gt)


A = (10.0, 10.0, 30.0, 30.0, 0)
A_SHIFTED = (12.0, 10.0, 32.0, 30.0, 0)  # IoU 0.82 with A
B = (50.0, 50.0, 80.0, 70.0, 1)
B_AS_0 = (50.0, 50.0, 80.0, 70.0, 0)  # same place, other class
FAR = (60.0, 5.0, 90.0, 20.0, 0)


# --- fusion ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sets", "want"),
    [
        # Two annotators, same boxes: corners averaged.
        ([[A, B], [A_SHIFTED, B]], [(11.0, 10.0, 31.0, 30.0, 0), B]),
        # A box only one of two drew is not a majority: dropped.
        ([[A, B], [A_SHIFTED]], [(11.0, 10.0, 31.0, 30.0, 0)]),
        # Three annotators: 2 of 3 is a majority, 1 of 3 is not.
        ([[A, FAR], [A_SHIFTED], [A, B]], [(32.0 / 3, 10.0, 92.0 / 3, 30.0, 0)]),
        # Same place, other class: never one cluster, and neither has a majority.
        ([[B], [B_AS_0]], []),
        # Both say defect-free.
        ([[], []], []),
    ],
)
def test_fuse_boxes_known_answers(sets, want):
    out = fuse_boxes([_det(*s) for s in sets])
    exp = _det(*want)
    np.testing.assert_allclose(out.xyxy, exp.xyxy, atol=1e-9)
    np.testing.assert_array_equal(out.class_id, exp.class_id)
    assert out.image_wh == WH and out.confidence is None


# --- decide ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("records", "required", "status", "agreement", "ref"),
    [
        # One annotator, no overlap asked: single, their boxes.
        ([_rec("ann", _det(A))], 1, "single", None, [A]),
        # Overlap asked for 2, only one so far: waits.
        ([_rec("ann", _det(A))], 2, "waiting", None, None),
        # A lead's ground truth wins even alone on an overlap task, and over disagreement.
        (
            [_rec("ann", _det(A), 1), _rec("bob", _det(B), 2), _rec("lead", _det(FAR), 0, True)],
            2,
            "ground_truth",
            0.0,
            [FAR],
        ),
        # Two agree (F1 1.0): fused.
        (
            [_rec("ann", _det(A, B), 1), _rec("bob", _det(A_SHIFTED, B), 2)],
            2,
            "merged",
            1.0,
            [(11.0, 10.0, 31.0, 30.0, 0), B],
        ),
        # 2 of 3 boxes matched: F1 = 2 x 1 / 3 = 0.667 < 0.7: review, no reference.
        ([_rec("ann", _det(A, B), 1), _rec("bob", _det(A_SHIFTED), 2)], 2, "review", 2 / 3, None),
        # Wrong class on the only box: F1 0: review.
        ([_rec("ann", _det(B), 1), _rec("bob", _det(B_AS_0), 2)], 1, "review", 0.0, None),
        # Both defect-free: agreement 1, merged to no boxes.
        ([_rec("ann", _det(), 1), _rec("bob", _det(), 2)], 2, "merged", 1.0, []),
    ],
)
def test_decide_table(records, required, status, agreement, ref):
    d = decide(records, required=required, threshold=0.7)
    assert d.status == status
    if agreement is None:
        assert d.agreement is None
    else:
        assert d.agreement == pytest.approx(agreement)
    if ref is None:
        assert d.reference is None
    else:
        exp = _det(*ref)
        np.testing.assert_allclose(d.reference.xyxy, exp.xyxy, atol=1e-9)
        np.testing.assert_array_equal(d.reference.class_id, exp.class_id)
    assert d.reason


def test_threshold_is_inclusive_and_latest_rule_takes_the_newest():
    recs = [_rec("ann", _det(A, B), 5), _rec("bob", _det(A_SHIFTED), 2)]
    at = decide(recs, threshold=2 / 3, merge_rule="latest")
    assert at.status == "merged" and at.chosen is recs[0]
    np.testing.assert_allclose(at.reference.xyxy, _det(A, B).xyxy)  # ann's: the newer
    assert decide(recs, threshold=2 / 3 + 1e-9).status == "review"


def test_decide_refuses_nothing_and_unknown_rules():
    with pytest.raises(ConfigError, match="at least one"):
        decide([])
    with pytest.raises(ConfigError, match="merge_rule"):
        decide([_rec("a", _det(A)), _rec("b", _det(A), 1)], merge_rule="vote")  # type: ignore[arg-type]


# --- overlap choice ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "share", "k"),
    [(10, 0.0, 0), (10, 0.25, 3), (3, 0.25, 1), (5, 0.5, 3), (4, 0.1, 0), (7, 1.0, 7), (0, 0.5, 0)],
)
def test_overlap_count_rounds_half_up(n, share, k):
    assert overlap_count(n, share) == k
    assert int(choose_overlap([1.0] * n, share, "random", np.random.default_rng(0)).sum()) == k


def test_uncertain_rule_takes_the_highest_priorities_ties_by_batch_order():
    mask = choose_overlap([0.2, 0.9, 0.5, 0.9, 0.1], 0.6, "uncertain", np.random.default_rng(0))
    assert mask.tolist() == [False, True, True, True, False]
    mask = choose_overlap([0.3, 0.3, 0.3, 0.3], 0.5, "uncertain", np.random.default_rng(0))
    assert mask.tolist() == [True, True, False, False]


def test_random_rule_is_seeded():
    pri = list(np.linspace(0, 1, 40))
    a = choose_overlap(pri, 0.25, "random", np.random.default_rng([7, 1]))
    b = choose_overlap(pri, 0.25, "random", np.random.default_rng([7, 1]))
    c = choose_overlap(pri, 0.25, "random", np.random.default_rng([7, 2]))
    assert a.tolist() == b.tolist() and a.sum() == 10
    assert a.tolist() != c.tolist()
    # Not the uncertain choice: the 10 highest priorities are the last 10.
    assert a[:30].any()


@pytest.mark.parametrize(("share", "rule"), [(1.5, "random"), (-0.1, "random"), (0.5, "best")])
def test_bad_overlap_settings_are_refused(share, rule):
    with pytest.raises(ConfigError):
        choose_overlap([1.0, 2.0], share, rule, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("quality", "field"),
    [
        ({"overlap_share": 1.2}, "quality.overlap_share"),
        ({"overlap_annotators": 1}, "quality.overlap_annotators"),
        ({"overlap_rule": "best"}, "quality.overlap_rule"),
        ({"agreement_threshold": -0.1}, "quality.agreement_threshold"),
        ({"merge_rule": "vote"}, "quality.merge_rule"),
        ({"overlap_shares": 0.5}, "quality.overlap_shares"),
    ],
)
def test_quality_config_errors_name_the_key(tmp_path, quality, field):
    import yaml

    from loop.config import load_config

    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["a", "b"], "quality": quality}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump({"classes": ["a", "b"]}))
    q = load_config(cfg).quality
    assert (q.overlap_share, q.overlap_annotators, q.overlap_rule) == (0.0, 2, "random")


# --- what a pull hands to consensus (`judge_task`) ----------------------------------------------
def test_judge_task_keeps_every_annotator_and_names_unusable_ones():
    from ls_json import rect

    from loop.formats.labelstudio_pull import judge_task

    def ann(aid, result, when, by, **kw):
        return {"id": aid, "result": result, "was_cancelled": False, "ground_truth": False,
                "updated_at": when, "completed_by": by, "lead_time": 2.0 + aid, **kw}  # fmt: skip

    task = {
        "id": 7,
        "data": {"image": "/data/local-files/?d=a.png", "sha256": "a" * 64, "width": 200,
                 "height": 100},
        "annotations": [
            ann(1, [rect(10, 10, 20, 20)], "2026-01-01T00:00:00Z", 1),
            ann(2, [rect(10, 10, 20, 20, "rust")], "2026-01-02T00:00:00Z", 2),  # unknown class
            # The lead's ground truth, then a later plain annotation of the same lead: per
            # annotator, as for the task, the ground truth counts.
            ann(3, [rect(0, 0, 50, 50, "crack")], "2026-01-03T00:00:00Z", 3, ground_truth=True),
            ann(4, [], "2026-01-04T00:00:00Z", 3),
        ],
    }  # fmt: skip
    label = judge_task(task, ["scratch", "dent", "crack"], {1: "ann@x", 2: "bob@x", 3: "lead@x"})
    lab = label.label
    assert lab is not None and lab.annotation_id == 3 and lab.ground_truth
    recs = {r.annotator: r for r in lab.annotations}
    assert sorted(recs) == ["ann@x", "lead@x"]
    assert recs["lead@x"].annotation_id == 3 and recs["lead@x"].ground_truth
    assert recs["ann@x"].lead_time == 3.0 and recs["ann@x"].boxes.class_id.tolist() == [1]
    assert list(lab.unusable) == ["bob@x"] and "rust" in lab.unusable["bob@x"]
    assert "annotation 2" in lab.unusable["bob@x"]
    d = decide(lab.annotations, required=2)
    assert d.status == "ground_truth" and d.chosen is recs["lead@x"]


# --- push and pull through `loop.sync` with a stand-in backend ---------------------------------
class _Backend:
    """A labeling backend with Label Studio's optional consensus methods, recording calls."""

    def __init__(self) -> None:
        self.items: list = []
        self.settings: list[bool] = []
        self.views: list[list[int]] = []
        self.result = None

    def ensure_project(self, *a, **k) -> int:
        return 1

    def ensure_local_storage(self, *a, **k) -> None:
        return None

    def ensure_overlap_settings(self, pid: int, overlap_first: bool) -> None:
        self.settings.append(overlap_first)

    def push(self, pid, items, **kw):
        from loop.labeling import PushSummary

        ids = {it.sha256: 10 + len(self.items) + i for i, it in enumerate(items)}
        self.items.extend(items)
        return PushSummary(created=len(items), task_ids=ids)

    def pull(self, pid, classes, **kw):
        return self.result

    def ensure_review_view(self, pid: int, task_ids) -> int:
        self.views.append(list(task_ids))
        return 5

    def view_url(self, pid: int, view: int) -> str:
        return f"http://ls/projects/{pid}/data?tab={view}"


def test_sync_push_chooses_overlap_and_pull_judges_logs_and_queues(tmp_path):
    import yaml
    from PIL import Image

    from loop.annotation_log import read_outcomes
    from loop.config import load_config
    from loop.datasets import assign_split
    from loop.labeling import PulledLabel, PullResult
    from loop.ledger import TaskLedger
    from loop.project import Project, ScoredImage

    cfg_path = tmp_path / "defect-loop.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "classes": ["scratch", "dent"], "workspace": "ws", "select": {"batch_size": 3},
        "quality": {"overlap_share": 0.67, "overlap_rule": "uncertain"},
    }))  # fmt: skip
    project = Project(load_config(cfg_path))
    shas: list[str] = []
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 5, 90, 200 - i)).save(tmp_path / f"im{i}.png")
    report, _ = project.ingest(tmp_path)
    shas = [p.sha256 for p in report.added if assign_split(p.sha256, project.cfg.split) != "test"]
    a, b, c = shas[:3]
    det = Detections(np.array([[2.0, 2, 12, 12]]), np.array([0]), (32, 32), confidence=[0.5])
    gw = _Backend()
    s = project.push(gw, [ScoredImage(a, 3.0, det), ScoredImage(b, 2.0, det),
                          ScoredImage(c, 1.0, det)], "m1")  # fmt: skip
    assert gw.settings == [True] and [it.overlap for it in gw.items] == [2, 2, 1]
    assert s.overlap == {a: 2, b: 2}
    ledger = TaskLedger(project.cfg.paths.ledger)
    assert [ledger.get(1, t).overlap_rule for t in (10, 11, 12)] == ["uncertain", "uncertain", ""]

    def lab(sha, tid, recs, unusable=None):
        last = max(recs, key=lambda r: (r.ground_truth, r.updated_at))
        return PulledLabel(tid, sha, last.boxes, last.annotation_id, last.annotator, None,
                           last.updated_at, ground_truth=last.ground_truth,
                           image_url=project.image_url(sha), annotations=tuple(recs),
                           unusable=unusable or {})  # fmt: skip

    box = lambda *b: Detections(np.array([b[:4]], float), np.array([b[4]]), (32, 32))  # noqa: E731
    ann_a, bob_a = _rec("ann", box(2, 2, 12, 12, 0), 1), _rec("bob", box(3, 2, 13, 12, 0), 2)
    ann_b, bob_b = _rec("ann", box(2, 2, 12, 12, 0), 3), _rec("bob", box(2, 2, 12, 12, 1), 4)
    lone = _rec("ann", box(2, 2, 12, 12, 0), 5)
    gw.result = PullResult(labels=[
        lab(a, 10, [ann_a, bob_a], {"cy": "annotation 9: UnknownLabelError: 'rust'"}),
        lab(b, 11, [ann_b, bob_b]),
        lab(c, 12, [lone]),  # no overlap asked: single
    ])  # fmt: skip
    out = project.pull(gw)
    assert (out.labeled, out.merged, out.waiting, out.review, out.review_new) == (2, 1, 0, 1, 1)
    assert out.review_url == "http://ls/projects/1/data?tab=5" and gw.views == [[11]]
    assert len(out.notes) == 1 and "cy's annotation was left out" in out.notes[0]
    rows = project.current_version().by_sha()
    assert b not in rows and project.state.review == {b: 11}
    np.testing.assert_allclose(rows[a].boxes.xyxy, [[2.5, 2, 12.5, 12]])
    log = read_outcomes(project.cfg.paths.annotation_log, ["scratch", "dent"])
    want = [(10, "merged"), (11, "review"), (12, "single")]
    assert [(o.task_id, o.status) for o in log] == want
    assert log[1].version is None and log[0].version == out.new_version

    # b: a third annotator alone on an overlap task would wait; the lead's ground truth resolves.
    lead = _rec("lead", box(2, 2, 12, 12, 1), 6, gt=True)
    gw.result = PullResult(labels=[lab(b, 11, [ann_b, bob_b, lead])])
    again = project.pull(gw)
    assert (again.labeled, again.review, again.review_new) == (1, 0, 0)
    assert gw.views[-1] == [] and project.state.review == {}
    assert project.current_version().by_sha()[b].boxes.class_id.tolist() == [1]

    # An earlier label of an image whose annotators now disagree is dropped (disputed).
    gw.result = PullResult(labels=[lab(a, 10, [ann_a, _rec("bob", box(20, 20, 30, 30, 1), 7)])])
    third = project.pull(gw)
    assert third.review == 1 and a not in project.current_version().by_sha()

    # A new overlap task with one annotator so far waits: no label, no log line, still pending.
    d = shas[3]
    project.push(gw, [ScoredImage(d, 5.0, det)], "m1")
    assert gw.items[-1].overlap == 2
    lines = len(read_outcomes(project.cfg.paths.annotation_log, ["scratch", "dent"]))
    gw.result = PullResult(labels=[lab(d, 13, [lone])])
    waits = project.pull(gw)
    assert (waits.waiting, waits.labeled) == (1, 0) and d not in project.current_version().by_sha()
    assert len(read_outcomes(project.cfg.paths.annotation_log, ["scratch", "dent"])) == lines
    assert d in project.state.pending


def test_pull_prints_the_review_queue_and_its_view():
    from loop.cli.common import console, print_consensus
    from loop.sync import PullOutcome

    out = PullOutcome(3, [], "abc", None, merged=1, waiting=2, review=4, review_new=1,
                      review_url="http://ls/projects/1/data?tab=5",
                      notes=["Label Studio task 9: bob's annotation was left out"])  # fmt: skip
    with console.capture() as cap:
        print_consensus(out)
    text = cap.get()
    assert "1 labels merged" in text and "2 overlap tasks wait" in text
    assert "review queue: 4 tasks" in text and "(1 new)" in text
    assert "http://ls/projects/1/data?tab=5" in text and "bob's annotation" in text
    with console.capture() as cap:
        print_consensus(PullOutcome(0, [], None, None))
    assert cap.get() == ""


def test_a_crash_after_the_log_loses_no_annotation_and_the_retry_logs_again(tmp_path, monkeypatch):
    import yaml
    from PIL import Image

    from loop.annotation_log import latest_per_task, read_outcomes
    from loop.config import load_config
    from loop.datasets import assign_split
    from loop.labeling import PulledLabel, PullResult
    from loop.project import Project, ScoredImage

    cfg_path = tmp_path / "defect-loop.yaml"
    cfg_path.write_text(yaml.safe_dump({"classes": ["scratch", "dent"], "workspace": "ws"}))
    project = Project(load_config(cfg_path))
    for i in range(12):
        Image.new("RGB", (32, 32), (i * 9, 40, 180)).save(tmp_path / f"im{i}.png")
    report, _ = project.ingest(tmp_path)
    a = next(p.sha256 for p in report.added if assign_split(p.sha256, project.cfg.split) != "test")
    det = Detections(np.array([[2.0, 2, 12, 12]]), np.array([0]), (32, 32), confidence=[0.5])
    gw = _Backend()
    project.push(gw, [ScoredImage(a, 1.0, det)], "m1")
    rec = _rec("ann", Detections(np.array([[2.0, 2, 12, 12]]), np.array([0]), (32, 32)), 1)
    gw.result = PullResult(
        labels=[PulledLabel(10, a, rec.boxes, rec.annotation_id, "ann", None, rec.updated_at,
                            image_url=project.image_url(a), annotations=(rec,))],
        cursor="2026-12-01T10:00:00.000000Z",
    )  # fmt: skip

    def crash(*_a, **_k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(Project, "set_version", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        project.pull(gw)
    log = project.cfg.paths.annotation_log
    first = read_outcomes(log, ["scratch", "dent"])
    assert [(o.task_id, o.status) for o in first] == [(10, "single")]
    monkeypatch.undo()
    fresh = Project(load_config(cfg_path))  # what a restarted process reads
    assert fresh.state.pull_cursor is None and fresh.current_version() is None
    out = fresh.pull(gw)
    assert out.new_version == first[0].version  # content-addressed: the same digest
    assert len(read_outcomes(log, ["scratch", "dent"])) == 2
    assert set(latest_per_task(read_outcomes(log, ["scratch", "dent"]))) == {10}
