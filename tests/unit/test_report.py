"""The model-improvement report: rendering known answers from hand-made `ReportData`, the
what-to-do-next rules, and the collector against a real local MLflow store (no YOLO)."""

from __future__ import annotations

import io
import json
import re
import sys
import uuid
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from loop.report import (
    NO_DATA,
    Box,
    ClassCorrections,
    ClassRow,
    Confusion,
    Disagreement,
    Effort,
    NextBatch,
    ReportData,
    RoundPoint,
    collect_report_data,
    confusion_png,
    learning_curve_png,
    render_html,
    render_markdown,
    thumbnail_png,
    what_to_do_next,
    write_next_batch,
    write_report,
)

EVIL_CLASS = "<script>alert('c')</script>"
EVIL_FILE = '<script>alert("f")</script>.png'
EVIL_ANNOTATOR = "<img src=x onerror=alert(1)>@evil.io"


def sample(**changes: object) -> ReportData:
    """Round 3: promoted, 'pit' got worse with low acceptance, a class named like a script."""
    classes = ["scratch", "pit", EVIL_CLASS]
    data = ReportData(
        project="demo",
        round=3,
        classes=classes,
        generated_at="2024-05-01 12:00 UTC",
        run_id="run3",
        dataset_digest="c" * 64,
        candidate_version="3",
        candidate_map50=0.6125,
        candidate_map50_95=0.4012,
        promoted=True,
        promotion_reason="test mAP50-95 0.4012 >= champion v2 0.3811 - 0",
        champion_version="3",
        champion_round=3,
        champion_map50=0.6125,
        champion_map50_95=0.4012,
        previous_version="2",
        previous_round=2,
        previous_map50=0.5784,
        previous_map50_95=0.3811,
        labels_added=24,
        labels_total=168,
        curve=[
            RoundPoint(1, 120, 0.41, 0.22, True),
            RoundPoint(2, 144, 0.5784, 0.3811, True),
            RoundPoint(3, 168, 0.6125, 0.4012, True),
        ],
        class_rows=[
            ClassRow("scratch", 0.52, 0.44, 0.78, 0.70, 210, 31),
            ClassRow("pit", 0.31, 0.36, 0.55, 0.60, 64, 5),
            ClassRow(EVIL_CLASS, 0.37, 0.37, 0.50, 0.49, 80, 1),
        ],
        confusion=Confusion(classes, [[30, 2, 0, 4], [1, 12, 1, 3], [0, 2, 5, 1], [3, 4, 1, 0]]),
        effort=Effort(
            tasks=24,
            lead_times=[10.0, 20.0, 40.0, 50.0],
            per_class={
                "scratch": ClassCorrections(40, 9, 1, 3, 4),
                "pit": ClassCorrections(2, 1, 3, 1, 1),
                EVIL_CLASS: ClassCorrections(9, 1, 0, 0, 0),
            },
            annotators={"ana@example.com": 14, EVIL_ANNOTATOR: 10},
        ),
        disagreements=[
            Disagreement(
                "a" * 64,
                EVIL_FILE,
                0.9,
                [Box(2, 2, 20, 20, "pit", 0.4)],
                [Box(3, 3, 21, 21, EVIL_CLASS)],
                None,
                (32, 24),
            )
        ],
        next_batch=NextBatch("entropy (max)", 24, {"scratch": 19, "pit": 11}, 3, 2),
    )
    return replace(data, **changes)  # type: ignore[arg-type]


class _ById(HTMLParser):
    """Text content of every element with an id (nested text included)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.text: dict[str, str] = {}
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in {"src", "href", "action", "srcset"}]
        if tag in {"meta", "link", "img", "br", "input"}:
            return
        self.stack.append(a.get("id"))
        if a.get("id"):
            self.text.setdefault(str(a["id"]), "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in {"meta", "link", "img", "br", "input"} and self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        for i in self.stack:
            if i:
                self.text[i] += data


def parse(page: str) -> _ById:
    p = _ById()
    p.feed(page)
    return p


# ------------------------------------------------------------------ rendering


def test_headline_numbers_are_in_the_dom() -> None:
    dom = parse(render_html(sample())).text
    assert dom["champion-map50"] == "0.613"
    assert dom["champion-map50-95"] == "0.401"
    assert dom["previous-map50"] == "0.578"
    assert dom["previous-map50-95"] == "0.381"
    assert dom["previous-map50-delta"] == "+0.034"
    assert dom["previous-map50-95-delta"] == "+0.020"
    assert dom["labels-added"] == "+24"
    assert dom["labels-total"] == "168"
    assert dom["promotion-status"] == "Promoted"
    assert dom["candidate-map50"] == "0.613"
    assert dom["promotion-reason"].startswith("test mAP50-95 0.4012 >= champion v2")
    assert dom["tasks-labeled"] == "24"
    assert dom["median-lead-time"] == "30 s"
    assert dom["next-batch-size"] == "24"


def test_not_promoted_and_first_round_headlines() -> None:
    dom = parse(render_html(sample(promoted=False, promotion_reason="class 'pit' dropped"))).text
    assert dom["promotion-status"] == "Not promoted"
    first = sample(previous_map50=None, previous_map50_95=None, previous_version=None)
    dom = parse(render_html(first)).text
    assert dom["previous-map50"] == "—"
    assert "no previous champion" in render_html(first)


def test_every_user_string_is_escaped() -> None:
    page = render_html(sample(project="<b>line 3</b>"))
    p = parse(page)
    assert "script" not in p.tags  # no element came from a name
    assert p.tags.count("img") == 3  # two plots, one thumbnail; the annotator stayed text
    assert "<script" not in page.lower()
    assert "<b>line 3</b>" not in page
    assert html_escaped(EVIL_CLASS) in page
    assert html_escaped(EVIL_FILE) in page
    assert html_escaped(EVIL_ANNOTATOR) in page
    # attributes are quoted and escaped too
    assert f'alt="{html_escaped(EVIL_FILE)}"' in page
    assert f'data-class="{html_escaped(EVIL_CLASS)}"' in page
    md = render_markdown(sample(project=EVIL_CLASS))
    assert not re.search(r"(?<!\\)<", md)  # every < is backslash-escaped
    assert r"\<script\>alert('c')\</script\>" in md


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_page_is_self_contained() -> None:
    page = render_html(sample())
    urls = parse(page).urls
    assert urls and all(u.startswith("data:") for u in urls)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*//""", page)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_deltas_and_got_worse_flags() -> None:
    rows = {r.name: r for r in sample().class_rows}
    assert rows["scratch"].delta == pytest.approx(0.08) and not rows["scratch"].worse
    assert rows["pit"].delta == pytest.approx(-0.05) and rows["pit"].worse
    assert rows[EVIL_CLASS].delta == pytest.approx(0.0) and not rows[EVIL_CLASS].worse
    assert not ClassRow("x", 0.5, 0.505).worse  # within WORSE_THRESHOLD
    assert ClassRow("x", 0.5, None).delta is None and not ClassRow("x", 0.5, None).worse
    page = render_html(sample())
    table = page[page.index('id="class-table"') : page.index("</table>", page.index("class-table"))]
    worse = re.findall(r'<tr class="worse" data-class="([^"]*)">', table)
    assert worse == ["pit"]
    assert table.count("got worse") == 1 and table.count("improved") == 1
    assert ">-0.050<" in table and ">+0.080<" in table


def test_markdown_summary() -> None:
    md = render_markdown(sample(), "report-round-3.html")
    assert md.startswith("# defect-loop report: demo, round 3\n")
    assert "**Champion test mAP50 0.613** (+0.034 vs v2, round 2: 0.578)" in md
    assert "mAP50-95 0.401 (+0.020 vs 0.381)" in md
    assert "+24 this round, 168 in total" in md
    assert "## Classes that got worse\n\n- pit: AP50-95 0.310 (-0.050)" in md
    assert "**act**: Review the labeling guidelines for 'pit'" in md
    assert "report-round-3.html" in md


def test_sections_degrade_to_no_data() -> None:
    bare = ReportData(project="p", round=1, classes=["a"], promoted=True)
    page = render_html(bare)
    # curve, classes, confusion, effort, label quality, disagreements, batch
    assert page.count(NO_DATA) == 7
    assert parse(page).text["champion-map50"] == "—"
    render_markdown(bare)
    none = ReportData(project="p", round=None, classes=["a"])
    page = render_html(none)
    assert "No model has been trained yet" in page
    assert "No training run yet." in render_markdown(none)


# ------------------------------------------------------------------ what to do next


def advice_texts(data: ReportData) -> list[tuple[str, str]]:
    return [(a.level, a.text) for a in what_to_do_next(data)]


def test_worse_class_with_low_acceptance_means_review_guidelines() -> None:
    adv = advice_texts(sample())
    assert adv[0][0] == "act"
    assert adv[0][1].startswith(
        "Review the labeling guidelines for 'pit': its test AP50-95 fell by 0.050 and labelers "
        "accepted only 29% of the model's 'pit' suggestions."
    )
    assert not any(level == "ok" and "No class got worse" in t for level, t in adv)


def test_worse_class_with_good_acceptance_means_more_examples() -> None:
    effort = replace(sample().effort, per_class={"pit": ClassCorrections(9, 1, 0, 0, 0)})
    adv = advice_texts(sample(effort=effort))
    assert adv[0] == (
        "act",
        "'pit' got worse: test AP50-95 fell by 0.050. Check this round's 'pit' labels and label "
        "more 'pit' examples.",
    )
    rows = [replace(r, instances_added=0) if r.name == "pit" else r for r in sample().class_rows]
    adv = advice_texts(sample(effort=None, class_rows=rows))
    assert "No new 'pit' boxes were labeled this round." in adv[0][1]


def test_low_acceptance_without_drop_names_the_confusion() -> None:
    rows = [replace(r, previous_ap50_95=r.ap50_95) for r in sample().class_rows]
    adv = advice_texts(sample(class_rows=rows))
    texts = [t for _, t in adv]
    assert any(
        t.startswith("Labelers corrected most 'pit' suggestions (only 29% accepted)")
        and t.endswith("the model most often misses 'pit' entirely (4 boxes).")
        for t in texts
    ), texts
    classes = list(sample().classes)
    conf = Confusion(classes, [[30, 5, 0, 4], [1, 12, 1, 3], [0, 2, 5, 1], [3, 1, 1, 0]])
    texts = [t for _, t in advice_texts(sample(class_rows=rows, confusion=conf))]
    assert any(t.endswith("calls a true 'pit' 'scratch' (5 boxes).") for t in texts), texts
    assert adv[-1] == (
        "ok",
        "No class got worse: label the next batch (24 images, entropy (max)) and run the next "
        "cycle.",
    )


def test_false_alarms_misses_and_rare_classes() -> None:
    effort = Effort(
        tasks=5,
        per_class={
            "scratch": ClassCorrections(accepted=10, removed=6),
            "pit": ClassCorrections(accepted=10, added=7),
        },
    )
    rows = [
        ClassRow("scratch", 0.5, 0.5, instances=100),
        ClassRow("pit", 0.5, 0.5, instances=90),
        ClassRow("dent", 0.5, 0.5, instances=6),
    ]
    texts = [t for _, t in advice_texts(sample(effort=effort, class_rows=rows))]
    assert any(t.startswith("6 of 16 'scratch' suggestions were false alarms") for t in texts)
    assert any(t.startswith("The model missed 7 'pit' defects") and "(41% of" in t for t in texts)
    assert any(t.startswith("Only 6 labeled 'dent' boxes (median class: 90)") for t in texts)
    assert not any("'scratch' boxes (median" in t for t in texts)


def test_not_promoted_plateau_and_baseline() -> None:
    flat = [RoundPoint(1, 100, 0.50, 0.3, True), RoundPoint(2, 140, 0.505, 0.31, False)]
    rows = [replace(r, previous_ap50_95=r.ap50_95) for r in sample().class_rows]
    data = sample(
        round=2,
        promoted=False,
        promotion_reason="class 'pit' dropped",
        curve=flat,
        class_rows=rows,
        effort=None,
        baseline=[(100, 0.45), (200, 0.65)],
    )
    texts = [t for _, t in advice_texts(data)]
    assert any(
        t.startswith("This round's model was not promoted (class 'pit' dropped)") for t in texts
    )
    assert any(
        t.startswith("Test mAP50 changed by +0.005 with 40 more labeled images") for t in texts
    )
    # random baseline at 140 labels: 0.45 + 0.4 * 0.2 = 0.53 > 0.505
    assert any(
        t.startswith("Active selection is not beating random selection at 140 labeled images")
        and "0.505 vs 0.530" in t
        for t in texts
    ), texts
    ahead = replace(data, baseline=[(100, 0.40), (200, 0.50)])
    assert any("ahead of random selection by 0.065" in t for _, t in advice_texts(ahead))


# ------------------------------------------------------------------ plots and thumbnails


def test_plots_and_thumbnails_are_pngs(tmp_path: Path) -> None:
    had_pyplot = "matplotlib.pyplot" in sys.modules
    curve = learning_curve_png(sample(baseline=[(100, 0.3), (200, 0.6)]))
    conf = confusion_png(Confusion(["a$b$", "c"], [[1, 0, 0], [0, 2, 1], [1, 0, 0]]))
    for png in (curve, conf):
        assert png is not None
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.width > 300
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules  # no global backend switch
    assert confusion_png(Confusion(["a"], [[1]])) is None  # wrong shape
    assert learning_curve_png(sample(curve=[])) is None

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (120, 130, 140)).save(photo)
    d = Disagreement(
        "b" * 64, "p.png", 0.5, [Box(1, 1, 30, 30, "x", 0.5)], [Box(2, 2, 31, 31, "y")]
    )
    for img_path in (photo, None, tmp_path / "missing.png"):
        png = thumbnail_png(replace(d, image_path=img_path, size=(64, 48)))
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (300, 225)
            # final boxes are drawn in blue, suggestions in orange
            colors = {c for _, c in img.convert("RGB").getcolors(1 << 16) or []}
            assert (0, 114, 178) in colors and (230, 159, 0) in colors


# ------------------------------------------------------------------ collecting from a project

CLASSES = ["scratch", "pit"]


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (64, 48), (150 + i, 150, 150))
        ImageDraw.Draw(img).rectangle((5 + i, 5, 25 + i, 20), fill=(40, 40, 40))
        img.save(folder / f"frame_{i:02d}.png")
    return folder


def _eval(overall: float, scratch: float, pit: float):
    from loop.model import EvalResult

    per = {"scratch": scratch, "pit": pit}
    return EvalResult(
        map50=overall + 0.2,
        map50_95=overall,
        precision=0.7,
        recall=0.6,
        per_class_ap50={k: v + 0.2 for k, v in per.items()},
        per_class_ap50_95=per,
        n_instances=dict.fromkeys(per, 3),
        confusion_matrix=[[3, 1, 0], [0, 2, 1], [1, 0, 0]],
        n_images=4,
    )


def _train(tmp: Path, ev):
    from loop.model import TrainResult

    weights = tmp / f"w-{uuid.uuid4().hex[:6]}" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(uuid.uuid4().bytes)
    return TrainResult(weights, weights.parent, [{"epoch": 0.0}], ev, 1.0)


def _log(project, tracker, version, ev, rnd: int, tmp: Path):
    project.store.save(version)
    run_id = tracker.log_training(
        version=version,
        store=project.store,
        result=_train(tmp, ev),
        test=ev,
        params={"p": 1},
        round_index=rnd,
    )
    tracker.promote_if_better(tracker.register(run_id), run_id)
    return run_id


def test_collect_and_write_a_real_project(tmp_path: Path) -> None:
    from loop.config import ProjectConfig
    from loop.datasets import DatasetVersion, LabeledImage
    from loop.detections import Detections
    from loop.project import Project, ScoredImage
    from loop.tracking import Tracker

    cfg = ProjectConfig(
        name="line <3>",
        classes=CLASSES,
        workspace=tmp_path / "ws",
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
        select={"batch_size": 3},
    )
    project, tracker = Project(cfg), Tracker(cfg)
    # no training run yet: a report that says so, written but not logged
    html_path, md_path = write_report(project, tracker, tmp_path / "out")
    assert (
        html_path.name == "report-no-model.html" and "No training run yet." in md_path.read_text()
    )

    project.ingest(_images(tmp_path / "src", 9))
    pool = sorted(project.pool, key=lambda p: p.source)

    def row(p, split, boxes, prov):
        det = Detections(np.array(boxes, dtype=float).reshape(-1, 4), [0] * len(boxes), (64, 48))
        if prov.get("cls") == "pit":
            det = Detections(det.xyxy, [1] * len(boxes), (64, 48))
        return LabeledImage(p.sha256, p.path, 64, 48, split, det, prov)

    splits = ["train", "val", "test"]
    v1 = DatasetVersion.create(
        CLASSES,
        [
            row(p, splits[i % 3], [[5, 5, 25, 20]], {"source": "import"})
            for i, p in enumerate(pool[:6])
        ],
    )
    _log(project, tracker, v1, _eval(0.40, 0.40, 0.40), 1, tmp_path)
    (project.store.path(v1.digest) / "corrections.json").write_text("{not json")
    new = [
        row(
            p,
            "train",
            [[6, 6, 26, 21]],
            {
                "source": "labelstudio",
                "annotation_id": str(i),
                "annotator": "<b>ann</b>",
                "cls": "pit",
            },
        )
        for i, p in enumerate(pool[6:])
    ]
    v2 = v1.with_labels(new)
    project.store.save(v2)
    corrections = {
        "per_class": {
            "pit": {"accepted": 1, "adjusted": 1, "relabeled": 2, "removed": 2, "added": 1},
            "0": {"accepted": 3},
        },
        "lead_times": [10, 30, 20],
        "tasks": 3,
        "images": [
            {
                "sha256": pool[7].sha256,
                "disagreement": 0.8,
                "predicted": [[1, 1, 10, 10, 0, 0.6]],
                "final": [[6, 6, 26, 21, "pit"]],
            },
            {"sha256": "f" * 64, "disagreement": 0.2, "predicted": [], "final": [[1, 2, 3, 4, 1]]},
        ],
    }
    (project.store.path(v2.digest) / "corrections.json").write_text(json.dumps(corrections))
    r2 = _log(project, tracker, v2, _eval(0.42, 0.50, 0.20), 2, tmp_path)  # pit drops: kept out
    (cfg.workspace / "simulation.json").write_text(
        json.dumps([{"labeled": 6, "test_map50": 0.5}, {"labeled": 12, "test_map50": 0.7}])
    )
    project.state.round = 2
    scored = [
        ScoredImage("1" * 64, 0.9, Detections([[0, 0, 5, 5], [1, 1, 9, 9]], [1, 1], (64, 48))),
        ScoredImage("2" * 64, 0.8, Detections(np.zeros((0, 4)), [], (64, 48))),
        ScoredImage("3" * 64, 0.7, Detections([[0, 0, 5, 5]], [0], (64, 48))),
        ScoredImage("4" * 64, 0.6, Detections([[0, 0, 5, 5]], [0], (64, 48))),
    ]
    nb = json.loads(write_next_batch(project, scored).read_text())
    assert nb["size"] == 3 and nb["class_mix"] == {"scratch": 1, "pit": 2}
    assert nb["images_without_boxes"] == 1 and nb["round"] == 2

    data = collect_report_data(project, tracker)
    assert (data.round, data.run_id, data.promoted) == (2, r2, False)
    assert "class 'pit' test AP50-95" in data.promotion_reason
    assert data.candidate_map50_95 == pytest.approx(0.42)
    assert (data.champion_round, data.previous_round) == (1, 1)  # the champion stayed
    assert (data.champion_version, data.previous_version, data.candidate_version) == ("1", "1", "2")
    assert data.champion_map50 == pytest.approx(0.60)
    assert (data.labels_added, data.labels_total) == (3, 9)
    rows = {r.name: r for r in data.class_rows}
    assert rows["pit"].worse and rows["pit"].delta == pytest.approx(-0.2)
    assert (rows["pit"].instances, rows["pit"].instances_added) == (3, 3)
    assert (rows["scratch"].instances, rows["scratch"].instances_added) == (6, 0)
    assert [(p.round, p.labeled, p.promoted) for p in data.curve] == [(1, 6, True), (2, 9, False)]
    assert data.baseline == [(6, 0.5), (12, 0.7)]
    assert data.confusion is not None and data.confusion.matrix[0] == [3, 1, 0]
    assert data.effort is not None
    assert data.effort.tasks == 3 and data.effort.median_lead_time == 20
    assert data.effort.per_class["pit"].acceptance == pytest.approx(1 / 6)
    assert data.effort.per_class["scratch"].accepted == 3  # class given by id
    assert dict(data.effort.annotators) == {"<b>ann</b>": 3}
    top = data.disagreements[0]
    assert top.file_name == "frame_07.png" and top.image_path is not None
    assert top.predicted[0].cls == "scratch" and top.predicted[0].score == 0.6
    assert data.disagreements[1].file_name == "f" * 12 and data.disagreements[1].image_path is None
    assert data.next_batch is not None and data.next_batch.strategy == "entropy (max)"
    assert data.notes == []
    assert what_to_do_next(data)[0].text.startswith("Review the labeling guidelines for 'pit'")

    first = collect_report_data(project, tracker, 1)
    assert first.promoted is True and first.previous_map50 is None
    assert [p.round for p in first.curve] == [1]  # no rounds from after the reported one
    assert (first.labels_added, first.labels_total) == (6, 6)
    assert first.effort is None and first.disagreements == []
    assert any("corrections.json" in n and "not readable JSON" in n for n in first.notes)

    from loop.errors import ModelError

    with pytest.raises(ModelError, match="rounds with runs: 1, 2"):
        collect_report_data(project, tracker, 7)

    html_path, md_path = write_report(project, tracker, tmp_path / "out")
    assert html_path == tmp_path / "out" / "report-round-2.html"
    dom = parse(html_path.read_text()).text
    assert dom["champion-map50"] == "0.600" and dom["promotion-status"] == "Not promoted"
    assert "line &lt;3&gt;" in html_path.read_text()
    logged = {a.path for a in tracker.client.list_artifacts(r2, "report")}
    assert logged == {"report/report-round-2.html", "report/report-round-2.md"}


def test_malformed_optional_files_become_notes(tmp_path: Path) -> None:
    from loop.config import ProjectConfig
    from loop.project import Project
    from loop.tracking import Tracker

    cfg = ProjectConfig(
        classes=CLASSES,
        workspace=tmp_path / "ws",
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
    )
    project = Project(cfg)
    (cfg.workspace / "simulation.json").write_text('{"random": [{"labeled": 1}]}')
    (cfg.workspace / "next_batch.json").write_text("[1, 2]")
    data = collect_report_data(project, Tracker(cfg))
    assert data.round is None and data.baseline == [] and data.next_batch is None
    assert len(data.notes) == 2
    assert "simulation.json has an unexpected shape" in data.notes[0]
    assert "next_batch.json has an unexpected shape" in data.notes[1]
    assert "simulation.json has an unexpected shape" in render_html(data)


def test_cli_command_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from loop.cli.report import report

    app = typer.Typer()
    app.command("report")(report)
    app.command("other")(lambda: None)  # two commands: `report` stays a subcommand
    runner = CliRunner()
    res = runner.invoke(app, ["report", "--help"])
    assert res.exit_code == 0 and "--round" in res.output and "--out" in res.output
    res = runner.invoke(app, ["report", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2
    assert "missing.yaml not found" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------ how sure the numbers are

USELESS = "This round's model finds almost nothing"
NOISE = "is no better than the champion (v2, round 2) within noise"
TOO_FEW = "'pit' has only 5 training boxes: too few to learn it"
WIDE = "The test split (27 images) cannot tell mAP50 differences smaller than ±0.100"
FEW_TEST = "'pit' has only 3 test boxes"
HIDDEN = "Pre-annotations of 'pit' are not shown to labelers"
BACKGROUND = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [6, 4, 2, 0]]


def _rows(**pit: object) -> list[ClassRow]:
    return [replace(r, **pit) if r.name == "pit" else r for r in sample().class_rows]


@pytest.mark.parametrize(
    ("changes", "fires", "level"),
    [
        ({"candidate_recall": 0.01, "candidate_recall_ci": (0.0, 0.03)}, USELESS, "act"),
        ({"confusion": Confusion(["scratch", "pit", EVIL_CLASS], BACKGROUND)}, USELESS, "act"),
        ({"gate_verdict": "noise", "gate_difference": (0.01, -0.03, 0.05)}, NOISE, "watch"),
        ({"class_rows": _rows(train_boxes=5)}, TOO_FEW, "act"),
        ({"candidate_map50_ci": (0.45, 0.65), "test_images": 27}, WIDE, "act"),
        ({"class_rows": _rows(test_boxes=3)}, FEW_TEST, "watch"),
        ({"preannotation_hidden": ["pit"]}, HIDDEN, "watch"),
    ],
)
def test_each_new_rule_fires_on_its_case(changes, fires, level) -> None:
    adv = advice_texts(sample(**changes))
    hits = [(lv, t) for lv, t in adv if fires in t]
    assert len(hits) == 1 and hits[0][0] == level, adv


@pytest.mark.parametrize(
    "changes",
    [
        {"candidate_recall": 0.4, "candidate_recall_ci": (0.3, 0.5)},  # finds things
        {"gate_verdict": "improvement", "gate_difference": (0.08, 0.02, 0.14)},
        {"gate_verdict": "worse", "gate_difference": (-0.08, -0.14, -0.02)},
        {"class_rows": _rows(train_boxes=50, test_boxes=30)},  # enough of both
        {"candidate_map50_ci": (0.58, 0.64), "test_images": 300},  # ±0.03 < 0.05
        {"preannotation_hidden": []},
        {},  # nothing known: none of the new rules may guess
    ],
)
def test_the_new_rules_stay_silent_otherwise(changes) -> None:
    texts = " ".join(t for _, t in advice_texts(sample(**changes)))
    for rule in (USELESS, NOISE, "too few to learn", "cannot tell mAP50", "test boxes", HIDDEN):
        assert rule not in texts


def test_a_useless_model_is_never_ok() -> None:
    # The reported case: mAP50 0.044, nothing found, promoted, no class "got worse".
    rows = [replace(r, previous_ap50_95=None, previous_ap50=None) for r in sample().class_rows]
    data = sample(
        candidate_map50=0.044,
        candidate_recall=0.0,
        candidate_recall_ci=(0.0, 0.0),
        confusion=Confusion(["scratch", "pit", EVIL_CLASS], BACKGROUND),
        class_rows=rows,
        effort=None,
        previous_version=None,
        train_epochs=30,
    )
    adv = advice_texts(data)
    assert adv[0][0] == "act" and adv[0][1].startswith(USELESS)
    assert "test recall 0.000 [0.000, 0.000]" in adv[0][1]
    assert "confusion matrix is all background" in adv[0][1]
    assert "start from a pretrained checkpoint" in adv[0][1]
    assert "train longer (train.epochs is 30)" in adv[0][1]
    assert not any(level == "ok" for level, _ in adv)


def test_noise_replaces_the_plain_not_promoted_advice() -> None:
    data = sample(
        promoted=False,
        gate_verdict="noise",
        gate_difference=(0.012, -0.031, 0.054),
        test_images=60,
    )
    texts = [t for _, t in advice_texts(data)]
    noise = [t for t in texts if NOISE in t]
    assert len(noise) == 1
    assert "+0.012 [-0.031, +0.054]" in noise[0] and "same 60 test images" in noise[0]
    assert "The champion keeps serving pre-annotations." in noise[0]
    assert not any(t.startswith("This round's model was not promoted") for t in texts)


def test_a_drop_inside_its_paired_interval_is_not_flagged() -> None:
    noisy = ClassRow("x", 0.30, 0.40, delta_lo=-0.2, delta_hi=0.05)
    sure = ClassRow("x", 0.30, 0.40, delta_lo=-0.15, delta_hi=-0.05)
    assert not noisy.worse and sure.worse
    assert not ClassRow("x", 0.395, 0.40, delta_lo=-0.01, delta_hi=-0.001).worse  # too small


def test_intervals_are_rendered() -> None:
    rows = _rows(ap50_lo=0.41, ap50_hi=0.68, delta_lo=-0.12, delta_hi=0.02, test_boxes=14)
    data = sample(
        class_rows=rows,
        champion_map50_ci=(0.571, 0.650),
        champion_map50_95_ci=(0.35, 0.45),
        candidate_map50_ci=(0.571, 0.650),
        test_images=120,
    )
    page = render_html(data)
    dom = parse(page).text
    assert dom["champion-map50-ci"] == "[0.571, 0.650]"
    assert dom["champion-map50-95-ci"] == "[0.350, 0.450]"
    assert dom["candidate-map50-ci"] == " [0.571, 0.650]"
    assert "resolves mAP50 differences larger than ±0.040" in dom["test-resolution"]
    table = page[page.index('id="class-table"') : page.index("</table>", page.index("class-table"))]
    assert "[0.41, 0.68]" in table and "[-0.120, +0.020]" in table
    # 'pit' fell by 0.05, but its paired interval includes 0: not flagged any more.
    assert "got worse" not in table
    md = render_markdown(data)
    assert "**Champion test mAP50 0.613** \\[0.571, 0.650\\]" in md
    assert "resolves mAP50 differences larger than ±0.040" in md
    assert "test mAP50 0.613 \\[0.571, 0.650\\]" in md


def test_learning_curve_shows_the_bands() -> None:
    banded = [
        replace(p, map50_lo=p.test_map50 - 0.1, map50_hi=p.test_map50 + 0.1) for p in sample().curve
    ]
    plain = learning_curve_png(sample())
    with_bands = learning_curve_png(sample(curve=banded))
    assert plain is not None and with_bands is not None and plain != with_bands

    def blue_tint(png: bytes) -> int:
        # The mAP50 band: #0072B2 at 15% over white, about (217, 234, 243).
        with Image.open(io.BytesIO(png)) as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
        near = np.abs(rgb - np.array([217, 234, 243])).sum(axis=2) < 12
        return int(near.sum())

    assert blue_tint(with_bands) > 5000 and blue_tint(plain) < 500


def test_collect_reads_intervals_gate_and_split_boxes(tmp_path: Path) -> None:
    from loop.config import ProjectConfig
    from loop.datasets import DatasetVersion, LabeledImage
    from loop.detections import Detections
    from loop.project import Project
    from loop.tracking import Promotion, Tracker

    cfg = ProjectConfig(
        classes=CLASSES,
        workspace=tmp_path / "ws",
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
        train={"epochs": 7},
    )
    project, tracker = Project(cfg), Tracker(cfg)
    project.ingest(_images(tmp_path / "src", 6))
    pool = sorted(project.pool, key=lambda p: p.source)

    def row(p, split, cls):
        det = Detections(np.array([[5, 5, 25, 20]], dtype=float), [cls], (64, 48))
        return LabeledImage(p.sha256, p.path, 64, 48, split, det, {"source": "import"})

    v1 = DatasetVersion.create(
        CLASSES,
        [
            row(p, s, c)
            for p, s, c in zip(
                pool,
                ["train", "train", "val", "test", "test", "train"],
                [0, 1, 0, 1, 0, 0],
                strict=True,
            )
        ],
    )
    project.store.save(v1)
    r1 = tracker.log_training(
        version=v1,
        store=project.store,
        result=_train(tmp_path, _eval(0.4, 0.4, 0.4)),
        test=_eval(0.4, 0.4, 0.4),
        params={"train.epochs": 7},
        round_index=1,
    )
    tracker.log_metrics(r1, {"test_map50_lo": 0.5, "test_map50_hi": 0.7})
    tracker.apply_promotion(tracker.register(r1), r1, Promotion(True, "first model"), "")
    r2 = tracker.log_training(
        version=v1,
        store=project.store,
        result=_train(tmp_path, _eval(0.42, 0.45, 0.39)),
        test=_eval(0.42, 0.45, 0.39),
        params={"train.epochs": 7},
        round_index=2,
    )
    tracker.log_metrics(
        r2,
        {
            "test_map50_lo": 0.48,
            "test_map50_hi": 0.76,
            "test_recall_lo": 0.5,
            "test_recall_hi": 0.7,
            "test_ap50_pit_lo": 0.3,
            "test_ap50_pit_hi": 0.8,
            "gate_diff_map50_95": 0.02,
            "gate_diff_map50_95_lo": -0.05,
            "gate_diff_map50_95_hi": 0.09,
            "gate_diff_ap50_95_pit_lo": -0.2,
            "gate_diff_ap50_95_pit_hi": 0.1,
            "compared_test_map50": 0.61,
            "compared_test_map50_lo": 0.51,
            "compared_test_map50_hi": 0.71,
            "compared_test_map50_95": 0.41,
            "compared_test_ap50_95_pit": 0.45,
        },
    )
    tracker.apply_promotion(
        tracker.register(r2),
        r2,
        Promotion(False, "within noise"),
        "1",
        {"gate_verdict": "noise", "preannotation_hidden": json.dumps(["pit"])},
    )
    data = collect_report_data(project, tracker)
    assert data.candidate_map50_ci == (0.48, 0.76) and data.candidate_recall_ci == (0.5, 0.7)
    assert data.gate_verdict == "noise" and data.gate_difference == (0.02, -0.05, 0.09)
    # The kept champion, measured by the gate on this round's test images.
    assert data.champion_map50 == 0.61 and data.champion_map50_ci == (0.51, 0.71)
    assert data.previous_map50 == 0.61 and data.previous_map50_95 == 0.41
    assert data.preannotation_hidden == ["pit"] and data.train_epochs == 7
    assert data.test_images == 2 and data.map50_halfwidth == pytest.approx(0.14)
    rows = {r.name: r for r in data.class_rows}
    assert (rows["pit"].ap50_lo, rows["pit"].ap50_hi) == (0.3, 0.8)
    assert (rows["pit"].delta_lo, rows["pit"].delta_hi) == (-0.2, 0.1)
    assert rows["pit"].previous_ap50_95 == 0.45 and not rows["pit"].worse
    assert (rows["scratch"].train_boxes, rows["scratch"].test_boxes) == (2, 1)
    assert (rows["pit"].train_boxes, rows["pit"].test_boxes) == (1, 1)
    assert [(p.map50_lo, p.map50_hi) for p in data.curve] == [(0.5, 0.7), (0.48, 0.76)]
    texts = " ".join(a.text for a in what_to_do_next(data))
    assert NOISE.replace("(v2, round 2)", "(v1, round 1)") in texts
    assert "too few to learn" in texts and "cannot tell mAP50 differences" in texts
