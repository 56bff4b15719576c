"""Label quality from the annotation log: the reference rule, known-answer per-annotator figures,
MLflow (a real SQLite store) and the report's "Label quality" section with its task links."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from loop.annotation_log import AnnotationRecord, TaskOutcome, append_outcomes
from loop.annotator_quality import (
    label_quality,
    label_quality_metrics,
    label_quality_to_json,
    read_label_quality,
    scored_tasks,
)
from loop.config import ProjectConfig
from loop.detections import Detections
from loop.report.data import LabelQualityData, ReportData
from loop.report.html import label_quality_html, render_html
from loop.report.markdown import label_quality_markdown, render_markdown
from loop.report.text import LABEL_QUALITY_UNREADABLE, NO_LABEL_QUALITY

CLASSES = ["scratch", "pit", "crack"]
S, P, CR = 0, 1, 2
NONE = len(CLASSES)  # the "no box" row/column of the confusion matrix
WH = (200, 100)
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70]
D, E, F = [100, 10, 120, 30], [5, 60, 25, 80], [150, 60, 170, 80]
G, H = [30, 40, 50, 60], [60, 5, 90, 25]
URL = "http://ls.example:8080/projects/7/data/?task="


def det(boxes: list[list[float]], ids: list[int]) -> Detections:
    return Detections(np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(ids), WH)


def rec(
    who: str, aid: int, boxes: Detections, lead: float | None, gt: bool = False
) -> AnnotationRecord:
    return AnnotationRecord(who, aid, boxes, lead, T0, gt)


def outcome(
    tid: int,
    status: str,
    annotations: list[AnnotationRecord],
    reference: Detections | None,
    minutes: int = 0,
) -> TaskOutcome:
    return TaskOutcome(
        tid,
        f"{tid:064x}",
        T0 + timedelta(minutes=minutes),
        status,  # type: ignore[arg-type]
        tuple(annotations),
        reference,
        None if reference is None else "d" * 64,
    )


def hand_made_log() -> list[TaskOutcome]:
    """ann misses box C and calls pit B a crack against merged task 101, and misses E against
    the lead's ground truth of task 103; bob draws an extra box F in 103. 104 is single, 105
    waits in review, 106 went to review and was merged by a later pull."""
    return [
        outcome(
            101,
            "merged",
            [
                rec("ann", 1, det([A, B], [S, CR]), 40.0),
                rec("bob", 2, det([A, B, C], [S, P, CR]), 20.0),
            ],
            det([A, B, C], [S, P, CR]),
        ),
        outcome(
            102,
            "merged",
            [rec("ann", 3, det([D], [P]), 10.0), rec("bob", 4, det([D], [P]), 30.0)],
            det([D], [P]),
        ),
        outcome(
            103,
            "ground_truth",
            [
                rec("ann", 5, det([], []), 25.0),
                rec("bob", 6, det([E, F], [S, S]), None),
                rec("lead", 7, det([E], [S]), 60.0, gt=True),
            ],
            det([E], [S]),
        ),
        outcome(104, "single", [rec("carl", 8, det([A], [S]), 15.0)], det([A], [S])),
        outcome(
            105,
            "review",
            [rec("ann", 9, det([G], [S]), 50.0), rec("bob", 10, det([G], [P]), 35.0)],
            None,
        ),
        outcome(
            106,
            "review",
            [rec("ann", 11, det([H], [CR]), 99.0), rec("bob", 12, det([], []), 99.0)],
            None,
        ),
        outcome(
            106,
            "merged",
            [rec("ann", 13, det([H], [CR]), 5.0), rec("bob", 14, det([H], [CR]), 15.0)],
            det([H], [CR]),
            minutes=60,
        ),
    ]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "ws" / "annotation-log.jsonl"
    assert append_outcomes(path, hand_made_log(), CLASSES) == 7
    return path


# ------------------------------------------------------------------ the figures


def test_known_answer_per_annotator_figures(log: Path) -> None:
    lq = read_label_quality(log, CLASSES)
    assert lq.tasks == 6
    assert dict(lq.status_counts) == {"single": 1, "ground_truth": 1, "merged": 3, "review": 1}
    assert lq.scored_tasks == (101, 102, 103, 106)
    assert lq.review_tasks == (105,)  # 106 left the queue with its newer pull
    assert lq.single_tasks == (104,)
    assert list(lq.annotators) == ["ann", "bob", "carl", "lead"]

    ann = lq.annotators["ann"].quality
    assert ann is not None
    assert (ann.tasks, ann.boxes, ann.reference_boxes, ann.true_positives) == (4, 4, 6, 3)
    assert ann.precision == pytest.approx(3 / 4) and ann.recall == pytest.approx(3 / 6)
    expected = np.zeros((NONE + 1, NONE + 1), dtype=np.int64)
    expected[S, S] = 1  # A (101)
    expected[P, CR] = 1  # B: pit called crack (101)
    expected[CR, NONE] = 1  # C missed (101)
    expected[P, P] = 1  # D (102)
    expected[S, NONE] = 1  # E missed against the lead's ground truth (103)
    expected[CR, CR] = 1  # H (106, the merged pull)
    np.testing.assert_array_equal(ann.confusion, expected)
    assert ann.confused_pairs(CLASSES) == {("pit", "crack"): 1}
    assert ann.task_ids == {"missed": (101, 103), "extra": (), "confused": (101,)}

    bob = lq.annotators["bob"].quality
    assert bob is not None
    assert (bob.tasks, bob.boxes, bob.reference_boxes, bob.true_positives) == (4, 7, 6, 6)
    assert bob.precision == pytest.approx(6 / 7) and bob.recall == pytest.approx(1.0)
    assert bob.task_ids == {"missed": (), "extra": (103,), "confused": ()}

    # Lead times: every task the annotator labeled, scored or not (newest pull of each task).
    a = lq.annotators["ann"]
    assert a.tasks_annotated == 5 and a.lead_times == (40.0, 10.0, 25.0, 50.0, 5.0)
    assert (a.lead_time_median_s, a.lead_time_total_s) == (25.0, 130.0)
    b = lq.annotators["bob"]
    assert b.tasks_annotated == 5 and (b.lead_time_median_s, b.lead_time_total_s) == (25.0, 100.0)

    # Per class: mean pairwise F1 of ann and bob over 101, 102, 103, 105, 106 (not the lead).
    assert lq.agreement_tasks == 5
    assert lq.agreement["scratch"] == pytest.approx((1 + 0 + 0) / 3)  # 101, 103, 105
    assert lq.agreement["pit"] == pytest.approx((0 + 1 + 0) / 3)  # 101, 102, 105
    assert lq.agreement["crack"] == pytest.approx((0 + 1) / 2)  # 101, 106


def test_reference_rules() -> None:
    """GT: the lead's annotation is the reference, not scored; single and review: not scored."""
    outs = {o.task_id: o for o in hand_made_log()[:6]}
    tasks = {t.task_id: t for t in scored_tasks(outs.values())}
    assert sorted(tasks) == [101, 102, 103]  # 104 single, 105 and 106 (here) in review
    assert set(tasks[103].annotations) == {"ann", "bob"}  # the lead is not scored
    assert tasks[103].reference.same_boxes(det([E], [S]))
    assert set(tasks[101].annotations) == {"ann", "bob"}
    lq = label_quality(outs.values(), CLASSES)
    assert lq.annotators["lead"].quality is None and lq.annotators["lead"].tasks_annotated == 1
    assert lq.annotators["lead"].lead_time_median_s == 60.0  # the lead's review time counts
    assert lq.annotators["carl"].quality is None  # single: no independent reference
    assert lq.review_tasks == (105, 106)
    # A ground-truth task the lead labeled alone scores nobody.
    alone = outcome(9, "ground_truth", [rec("lead", 1, det([A], [S]), 3.0, gt=True)], det([A], [S]))
    assert scored_tasks([alone]) == []
    assert label_quality([alone], CLASSES).scored == {}


def test_an_annotator_twice_in_a_task_counts_once_with_the_newest_annotation() -> None:
    o = outcome(
        5,
        "merged",
        [
            rec("ann", 9, det([A], [S]), 30.0),  # newer: scored
            rec("ann", 2, det([], []), 10.0),
            rec("bob", 3, det([A], [S]), 20.0),
        ],
        det([A], [S]),
    )
    lq = label_quality([o], CLASSES)
    ann = lq.annotators["ann"]
    assert ann.tasks_annotated == 1 and ann.lead_times == (30.0,)
    assert ann.quality is not None and ann.quality.recall == 1.0
    assert lq.agreement["scratch"] == 1.0


def test_empty_or_missing_log(tmp_path: Path) -> None:
    lq = read_label_quality(tmp_path / "none.jsonl", CLASSES)
    assert lq.tasks == 0 and lq.annotators == {} and lq.agreement_tasks == 0
    assert label_quality_metrics(lq) == {
        "label_quality.tasks": 0.0,
        "label_quality.tasks_scored": 0.0,
        "label_quality.review_queue": 0.0,
        "label_quality.tasks_single": 0.0,
    }


def test_metrics_and_table(log: Path) -> None:
    lq = read_label_quality(log, CLASSES)
    m = label_quality_metrics(lq)
    assert m["label_quality.annotator.ann.precision"] == pytest.approx(0.75)
    assert m["label_quality.annotator.ann.recall"] == pytest.approx(0.5)
    assert m["label_quality.annotator.ann.missed"] == 2.0
    assert m["label_quality.annotator.ann.confused"] == 1.0
    assert m["label_quality.annotator.ann.tasks"] == 4.0  # scored
    assert m["label_quality.annotator.ann.tasks_annotated"] == 5.0
    assert m["label_quality.annotator.ann.lead_time_median_s"] == 25.0
    assert m["label_quality.annotator.ann.lead_time_total_s"] == 130.0
    assert m["label_quality.annotator.bob.extra"] == 1.0
    assert "label_quality.annotator.carl.precision" not in m  # never logged as 0
    assert m["label_quality.annotator.carl.lead_time_total_s"] == 15.0
    assert m["label_quality.review_queue"] == 1.0 and m["label_quality.tasks_scored"] == 4.0
    assert m["label_quality.agreement.crack"] == pytest.approx(0.5)
    table = json.loads(json.dumps(label_quality_to_json(lq)))  # JSON-ready
    rows = {r["annotator"]: r for r in table["annotators"]}
    assert rows["ann"]["task_ids"] == {"missed": [101, 103], "extra": [], "confused": [101]}
    assert rows["ann"]["confused_pairs"] == [{"reference": "pit", "annotator": "crack", "count": 1}]
    assert rows["ann"]["confusion"][P][CR] == 1
    assert rows["lead"]["tasks_scored"] == 0 and "precision" not in rows["lead"]
    assert table["review_tasks"] == [105] and table["single_tasks"] == [104]


# ------------------------------------------------------------------ the report section


class _Links(HTMLParser):
    """The ``href`` of every link inside ``<section id="label-quality">``, and that section's
    text, with the attributes of its ``<li>`` items."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.links: list[str] = []
        self.items: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.tables: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            if self.depth or a.get("id") == "label-quality":
                self.depth += 1
            return
        if not self.depth:
            return
        if tag == "a":
            self.links.append(str(a["href"]))
        elif tag == "li":
            self.items.append(a)
        elif tag == "table":
            self.tables.append(a.get("id"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.text.append(data)


def section_of(page: str) -> _Links:
    p = _Links()
    p.feed(page)
    return p


def sample(section: LabelQualityData | None) -> ReportData:
    return ReportData(project="line", round=None, classes=CLASSES, label_quality=section)


def test_html_section_links_exactly_the_tasks_behind_the_errors(log: Path) -> None:
    lq = read_label_quality(log, CLASSES)
    page = render_html(sample(LabelQualityData(lq, URL)))
    s = section_of(page)
    # Missed: ann 101, 103; confused: ann 101; extra: bob 103; review queue: 105.
    assert sorted(s.links) == [URL + "101", URL + "101", URL + "103", URL + "103", URL + "105"]
    kinds = {(i["data-annotator"], i["data-kind"]) for i in s.items}
    assert kinds == {("ann", "missed"), ("ann", "confused"), ("bob", "extra")}
    assert s.tables == ["annotator-quality", "class-agreement"]
    text = " ".join(" ".join(s.text).split())
    assert "pit → crack ×1" in text and "1 task waits for a lead" in text
    assert "Tasks with one annotator (1) have no independent reference" in text
    for needle in ('id="lq-scored">4<', 'id="lq-review">1<', 'id="lq-single">1<'):
        assert needle in page
    row = re.search(r'<tr data-annotator="ann">(.*?)</tr>', page)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    want = ["ann", "4", "0.750", "0.500", "2", "0", "1", "pit → crack ×1", "25 s", "2.2 min"]
    assert cells == [*want, "5"]
    md = render_markdown(sample(LabelQualityData(lq, URL)))
    assert "## Label quality" in md
    assert f"[#101]({URL}101), [#103]({URL}103)" in md  # ann's missed boxes
    assert f"Review queue: 1 task waits for a lead: [#105]({URL}105)" in md
    assert "| ann | 4 | 0.750 | 0.500 | 2 | 0 | 1 | pit → crack ×1 | 25 s | 2.2 min | 5 |" in md


def test_section_without_a_project_lists_ids_without_links(log: Path) -> None:
    html = label_quality_html(LabelQualityData(read_label_quality(log, CLASSES), None))
    assert "<a " not in html and 'data-task="105">#105<' in html
    assert "No Label Studio project is recorded" in html
    md = "\n".join(label_quality_markdown(LabelQualityData(read_label_quality(log, CLASSES))))
    assert "#101, #103" in md and "](" not in md


@pytest.mark.parametrize(
    ("section", "says"),
    [
        (None, NO_LABEL_QUALITY),
        ("empty", NO_LABEL_QUALITY),
        (LabelQualityData(None, URL), LABEL_QUALITY_UNREADABLE),
    ],
)
def test_no_log_says_so(tmp_path: Path, section: LabelQualityData | str | None, says: str) -> None:
    if section == "empty":
        section = LabelQualityData(read_label_quality(tmp_path / "no.jsonl", CLASSES), URL)
    assert not isinstance(section, str)
    s = section_of(render_html(sample(section)))
    text = " ".join(s.text)
    assert says in text and s.tables == [] and s.links == []
    md = render_markdown(sample(section))
    assert says.replace("`", "\\`") in md


def test_no_reference_says_so_without_tables(tmp_path: Path) -> None:
    """Only single and review tasks: nothing scored, no annotator table, no made-up figures;
    agreement only where two annotators labeled a task."""
    path = tmp_path / "log.jsonl"
    append_outcomes(path, hand_made_log()[3:4], CLASSES)  # one single task
    s = section_of(render_html(sample(LabelQualityData(read_label_quality(path, CLASSES), URL))))
    text = " ".join(" ".join(s.text).split())
    assert "No task has an independent reference yet" in text
    assert "No task has two annotators yet" in text
    assert s.tables == [] and s.links == []
    append_outcomes(path, hand_made_log()[4:5], CLASSES)  # + a task in review
    lq = read_label_quality(path, CLASSES)
    s = section_of(render_html(sample(LabelQualityData(lq, URL))))
    assert s.tables == ["class-agreement"] and s.links == [URL + "105"]
    assert "No task has an independent reference yet" in " ".join(" ".join(s.text).split())
    md = render_markdown(sample(LabelQualityData(lq, URL)))
    assert "| Annotator |" not in md and "No task has an independent reference yet" in md


@pytest.mark.parametrize(("upto", "advice"), [(4, None), (5, "1 task waits in the review queue")])
def test_the_review_queue_is_advice(upto: int, advice: str | None) -> None:
    from loop.report.advice import what_to_do_next

    lq = label_quality(hand_made_log()[:upto], CLASSES)
    data = ReportData(
        project="p", round=1, classes=CLASSES, label_quality=LabelQualityData(lq, URL)
    )
    texts = [a.text for a in what_to_do_next(data) if "review queue" in a.text]
    assert len(texts) == (0 if advice is None else 1)
    if advice is not None:
        assert texts[0].startswith(advice) and "no new label" in texts[0]


def test_names_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    evil = "<b>x</b>"
    o = outcome(
        1,
        "merged",
        [rec(evil, 1, det([A], [S]), 1.0), rec("bob", 2, det([], []), 1.0)],
        det([A], [S]),
    )
    append_outcomes(path, [o], CLASSES)
    page = render_html(sample(LabelQualityData(read_label_quality(path, CLASSES), URL)))
    assert evil not in page and "&lt;b&gt;x&lt;/b&gt;" in page


# ------------------------------------------------------------------ MLflow and the project


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"


def make_cfg(tmp_path: Path, db_uri: str) -> ProjectConfig:
    tag = uuid.uuid4().hex[:8]
    return ProjectConfig(
        classes=CLASSES,
        workspace=tmp_path / "ws",
        labelstudio={"url": "http://ls.example:8080/"},
        mlflow={"tracking_uri": db_uri, "experiment": f"e-{tag}", "registered_model": f"m-{tag}"},
    )


def test_mlflow_holds_the_figures_and_the_table(tmp_path: Path, db_uri: str) -> None:
    from loop.tracking import LABEL_QUALITY_ARTIFACT, TAG, Tracker

    cfg = make_cfg(tmp_path, db_uri)
    tracker = Tracker(cfg)
    client = tracker.client
    run_id = client.create_run(tracker.experiment_id()).info.run_id
    assert tracker.log_label_quality(run_id) is None  # no log yet: nothing logged
    assert client.get_run(run_id).data.metrics == {}

    append_outcomes(cfg.paths.annotation_log, hand_made_log(), CLASSES)
    lq = tracker.log_label_quality(run_id)
    assert lq is not None
    logged = client.get_run(run_id).data.metrics
    assert logged == pytest.approx(label_quality_metrics(lq))
    assert logged["label_quality.annotator.ann.precision"] == pytest.approx(0.75)
    assert logged["label_quality.annotator.bob.recall"] == pytest.approx(1.0)
    assert logged["label_quality.review_queue"] == 1.0
    local = tracker.download_artifact(run_id, LABEL_QUALITY_ARTIFACT, tmp_path / "dl")
    assert local is not None
    table = json.loads(local.read_text())
    assert table == json.loads(json.dumps(label_quality_to_json(lq)))
    assert {r["annotator"]: r["task_ids"] for r in table["annotators"] if "task_ids" in r} == {
        "ann": {"missed": [101, 103], "extra": [], "confused": [101]},
        "bob": {"missed": [], "extra": [103], "confused": []},
    }

    # An unreadable log does not fail the run: the reason is tagged.
    run2 = client.create_run(tracker.experiment_id()).info.run_id
    with cfg.paths.annotation_log.open("a") as fh:
        fh.write('{"task_id": 1, "status": "merged"}\n')
    assert tracker.log_label_quality(run2) is None
    tags = client.get_run(run2).data.tags
    assert "malformed annotation log record" in tags[TAG + "label_quality_error"]


def test_report_of_a_project_links_to_its_label_studio_tasks(tmp_path: Path, db_uri: str) -> None:
    from loop.project import Project
    from loop.report import write_report
    from loop.tracking import Tracker

    cfg = make_cfg(tmp_path, db_uri)
    project = Project(cfg)
    append_outcomes(cfg.paths.annotation_log, hand_made_log(), CLASSES)
    html_path, md_path = write_report(project, Tracker(cfg), tmp_path / "out")
    s = section_of(html_path.read_text())
    assert s.tables and s.links == [] and "No Label Studio project is recorded" in " ".join(s.text)
    project.state.ls_project_id = 7
    html_path, md_path = write_report(project, Tracker(cfg), tmp_path / "out")
    s = section_of(html_path.read_text())
    base = "http://ls.example:8080/projects/7/data/?task="
    assert base == URL
    assert sorted(set(s.links)) == [URL + "101", URL + "103", URL + "105"]
    assert f"[#105]({URL}105)" in md_path.read_text()

    # An unreadable log: a note, and the section says it has nothing (no stale figures).
    with cfg.paths.annotation_log.open("a") as fh:
        fh.write('{"task_id": 1}\n')
    html_path, _ = write_report(project, Tracker(cfg), tmp_path / "out")
    page = html_path.read_text()
    s = section_of(page)
    assert s.tables == [] and s.links == [] and LABEL_QUALITY_UNREADABLE in " ".join(s.text)
    assert "annotation-log.jsonl is unreadable" in page


def test_a_recorded_training_run_gets_the_label_quality(
    tmp_path: Path, db_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Project.record` (real MLflow; the paired gate replaced) logs the figures beside the
    correction metrics of the run."""
    from types import SimpleNamespace

    from loop import project as project_module
    from loop.datasets import DatasetVersion, LabeledImage
    from loop.model import EvalResult, TrainResult
    from loop.project import FitResult, Project
    from loop.tracking import LABEL_QUALITY_ARTIFACT, Tracker

    cfg = make_cfg(tmp_path, db_uri)
    project, tracker = Project(cfg), Tracker(cfg)
    append_outcomes(cfg.paths.annotation_log, hand_made_log(), CLASSES)
    rows = [
        LabeledImage(f"{i:064x}", f"{i}.png", *WH, s, det([A], [S]), {})
        for i, s in enumerate(["train", "val", "test"])
    ]
    version = DatasetVersion.create(CLASSES, rows)
    project.store.save(version)
    weights = tmp_path / "w" / "best.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    ev = EvalResult(
        0.5,
        0.3,
        0.6,
        0.5,
        dict.fromkeys(CLASSES, 0.5),
        dict.fromkeys(CLASSES, 0.3),
        dict.fromkeys(CLASSES, 1),
        [[0] * 4 for _ in range(4)],
        1,
    )
    fit = FitResult(version, TrainResult(weights, weights.parent, [], ev, 1.0), None, None, 1)
    monkeypatch.setattr(
        project_module,
        "gate_and_record",
        lambda *a, **k: SimpleNamespace(promoted=True, reason="first model"),
    )
    out = project.record(tracker, fit)
    metrics = tracker.run_metrics(out.run_id)
    assert metrics["label_quality.annotator.ann.precision"] == pytest.approx(0.75)
    assert metrics["label_quality.review_queue"] == 1.0
    assert tracker.download_artifact(out.run_id, LABEL_QUALITY_ARTIFACT, tmp_path / "dl")
