"""Hostile and malformed input never crashes a pull or an import, and never goes in silently
(issue 15). Pure and canned-export tests; the same attacks against a real Label Studio server
are in tests/integration/test_integrity.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from loop.config import SplitConfig, load_config
from loop.errors import ConfigError, ConversionError, UnknownLabelError
from loop.formats.labelstudio import ls_results_to_detections
from loop.formats.yolo import yolo_lines_to_detections
from loop.labelstudio import LabelStudioGateway

CLASSES = ["scratch", "dent", "crack"]
WH = (200, 100)
GOOD_TIME = "2026-01-01T00:00:00Z"


def rect(x: float = 10, y: float = 10, w: float = 20, h: float = 20, label: str = "dent") -> dict:
    return {
        "id": "r",
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": WH[0],
        "original_height": WH[1],
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
    }  # fmt: skip


def ann(aid: int, result: Any, **kw: Any) -> dict:
    base = {
        "id": aid,
        "result": result,
        "was_cancelled": False,
        "ground_truth": False,
        "updated_at": GOOD_TIME,
        "completed_by": 1,
        "lead_time": 3.0,
    }
    base.update(kw)
    return base


def task(tid: int, anns: list, **data: Any) -> dict:
    d = {
        "image": f"/data/local-files/?d=images/{tid}.png",
        "sha256": f"{tid:064x}",
        "width": WH[0],
        "height": WH[1],
    }
    d.update(data)
    return {"id": tid, "data": d, "annotations": anns}


def with_value(**changes: Any) -> dict:
    r = rect()
    r["value"] = {**r["value"], **changes}
    return r


def with_region(**changes: Any) -> dict:
    return {**rect(), **changes}


# Each case: one malformed field of one annotation, as Label Studio stores and exports it (a script
# or an old client can write them; the API may even answer 500 and keep them).
MALFORMED: list[tuple[str, Any]] = [
    ("rotation is text", ann(0, [with_value(rotation="abc")])),
    ("value is a list", ann(0, [with_region(value=[1, 2, 3])])),
    ("original_width is text", ann(0, [with_region(original_width="abc")])),
    ("original_width is zero", ann(0, [with_region(original_width=0)])),
    ("x is text", ann(0, [with_value(x="abc")])),
    ("width is null", ann(0, [with_value(width=None)])),
    ("x is a list", ann(0, [with_value(x=[1])])),
    ("x is infinite", ann(0, [with_value(x=float("inf"))])),
    ("label is not a list", ann(0, [with_value(rectanglelabels="dent")])),
    ("label is a number", ann(0, [with_value(rectanglelabels=[3])])),
    ("region is a string", ann(0, ["not a region"])),
    ("result is an object", ann(0, {"type": "rectanglelabels"})),
    ("zero-area box", ann(0, [with_value(width=0)])),
    ("polygon value is a list", ann(0, [{"type": "polygonlabels", "value": [[1, 2]]}])),
    ("choices value is a list", ann(0, [{"type": "choices", "from_name": "verdict", "value": [1]}])),
    ("annotation id is text", ann(0, [rect()], id="abc")),
    ("was_cancelled is text", ann(0, [rect()], was_cancelled="no")),
    ("ground_truth is a list", ann(0, [rect()], ground_truth=[1])),
    ("updated_at is not a time", ann(0, [rect()], updated_at="yesterday")),
    ("completed_by is text", ann(0, [rect()], completed_by="bob")),
    ("lead_time is text", ann(0, [rect()], lead_time="abc")),
    ("regions of two image sizes", ann(0, [rect(), with_region(original_width=300)])),
]  # fmt: skip


def _gateway(monkeypatch: pytest.MonkeyPatch, export: list[dict]) -> LabelStudioGateway:
    gw = LabelStudioGateway("http://127.0.0.1:9", "0123456789abcdef")
    monkeypatch.setattr(gw, "latest_update", lambda pid: None)
    monkeypatch.setattr(gw, "export_tasks", lambda pid, ids=None, all_tasks=False: export)
    monkeypatch.setattr(gw, "_user_emails", lambda: {1: "a@x"})
    monkeypatch.setattr(gw, "uncounted_annotation_task_ids", lambda pid: [])
    return gw


def test_one_malformed_annotation_rejects_its_task_and_the_good_ones_go_through(monkeypatch):
    """Finding 1: a malformed annotation stopped the whole pull with a bare ValueError or
    AttributeError that named no task, and none of the good tasks was imported."""
    export = [task(1, [ann(10, [rect()])])]
    for k, (_, bad) in enumerate(MALFORMED):
        tid = 100 + k
        export.append(task(tid, [{**copy.deepcopy(bad), "id": bad["id"] or tid * 10}]))
    export.append(task(2, [ann(20, [])]))  # defect-free
    gw = _gateway(monkeypatch, export)
    res = gw.pull(1, CLASSES)
    assert sorted(lb.task_id for lb in res.labels) == [1, 2]
    rejected = {r.task_id: r for r in res.rejected}
    assert sorted(rejected) == [100 + k for k in range(len(MALFORMED))]
    for k, (what, _) in enumerate(MALFORMED):
        text = str(rejected[100 + k])
        assert text.startswith(f"Label Studio task {100 + k}: "), (what, text)
        assert len(rejected[100 + k].reason) > 20, what  # a reason, not just a type name
    assert sorted(res.examined_task_ids) == sorted(t["id"] for t in export)


@pytest.mark.parametrize(("what", "bad"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_each_malformed_field_is_a_named_rejection(monkeypatch, what, bad):
    gw = _gateway(monkeypatch, [task(7, [bad])])
    res = gw.pull(1, CLASSES)
    assert res.labels == [] and [r.task_id for r in res.rejected] == [7], what


def test_a_malformed_annotation_of_another_annotator_does_not_block_the_chosen_one(monkeypatch):
    older = ann(70, [with_region(value=[1])], updated_at="2026-01-01T00:00:00Z", completed_by=2)
    newer = ann(71, [rect()], updated_at="2026-01-02T00:00:00Z")
    gw = _gateway(monkeypatch, [task(7, [older, newer])])
    res = gw.pull(1, CLASSES)
    assert [lb.task_id for lb in res.labels] == [7] and res.rejected == []
    assert res.labels[0].annotation_id == 71


def test_region_count_is_capped_per_task(monkeypatch):
    many = [rect(x=i % 90, y=10, w=1, h=1) for i in range(5000)]
    gw = _gateway(monkeypatch, [task(1, [ann(10, many)]), task(2, [ann(20, [rect()])])])
    res = gw.pull(1, CLASSES, max_regions=1000)
    assert [lb.task_id for lb in res.labels] == [2]
    assert [r.task_id for r in res.rejected] == [1]
    assert "5000 regions" in res.rejected[0].reason and "max_regions" in res.rejected[0].reason
    assert len(gw.pull(1, CLASSES, max_regions=5000).labels) == 2


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (with_value(width=0), ConversionError, "zero area"),
        (with_value(height=0.0), ConversionError, "zero area"),
        (with_value(rotation="abc"), ConversionError, "rotation must be a number"),
        (with_region(value=[1, 2]), ConversionError, "value must be an object"),
        (with_region(original_height="abc"), ConversionError, "original_height"),
        (with_value(rectanglelabels=[None]), UnknownLabelError, "None"),
        ("text", ConversionError, "not an object"),
    ],
)
def test_ls_converter_names_what_is_malformed(result, error, match):
    with pytest.raises(error, match=match):
        ls_results_to_detections([result], CLASSES)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("nan 0.5 0.5 0.1 0.1", UnknownLabelError, "nan"),
        ("inf 0.5 0.5 0.1 0.1", UnknownLabelError, "inf"),
        ("-inf 0.5 0.5 0.1 0.1", UnknownLabelError, "inf"),
        ("1.5 0.5 0.5 0.1 0.1", UnknownLabelError, "whole number"),
        ("0 0.5 0.5 0 0.1", ConversionError, "zero area"),
        ("0 0.5 0.5 0.1 0.0", ConversionError, "zero area"),
        ("0 0.5 0.5 nan 0.1", ConversionError, r"\[0, 1\]"),
    ],
)
def test_yolo_refuses_non_finite_class_ids_and_zero_area_boxes(text, error, match):
    with pytest.raises(error, match=match):
        yolo_lines_to_detections(f"0 0.5 0.5 0.2 0.2\n{text}\n", (10, 10), 3)


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.7, 0.3), (0.9, 0.6)])
def test_split_fractions_must_leave_room_for_train(tmp_path: Path, val, test):
    with pytest.raises(ValidationError, match="below 1"):
        SplitConfig(val=val, test=test)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"classes: [a]\nsplit: {{val: {val}, test: {test}}}\n")
    with pytest.raises(ConfigError, match=r"split\.val \+ split\.test must be below 1"):
        load_config(cfg)
    assert SplitConfig(val=0.49, test=0.5).val == 0.49


def test_the_lead_report_lists_open_rejections_escaped():
    from loop.report import ReportData, render_html, render_markdown

    lines = ["Label Studio task 7: label '<script>alert(1)</script>' is not one of the classes"]
    data = ReportData(project="p", round=None, classes=CLASSES, rejections=lines)
    page = render_html(data)
    assert 'id="rejections"' in page and "Label Studio task 7" in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    md = render_markdown(data)
    assert "## Rejected Label Studio tasks (1)" in md and "Label Studio task 7" in md
    assert 'id="rejections"' not in render_html(
        ReportData(project="p", round=None, classes=CLASSES)
    )


def test_annotations_label_studio_stores_without_counting_them_are_judged(monkeypatch):
    """Label Studio 1.23 answers 500 to some malformed results, keeps the annotation and leaves
    the task's counters and updated_at alone: no cursor selects such a task."""
    bad = task(5, [ann(50, [with_region(value=[1, 2])])])
    gw = _gateway(monkeypatch, [bad])
    exported: list[Any] = []

    def export(pid, ids=None, all_tasks=False):
        exported.append((ids, all_tasks))
        return [bad] if ids else []

    monkeypatch.setattr(gw, "export_tasks", export)
    monkeypatch.setattr(gw, "changed_since", lambda pid, since: [])
    monkeypatch.setattr(gw, "uncounted_annotation_task_ids", lambda pid: [5])
    res = gw.pull(1, CLASSES, since="2026-01-01T00:00:00.000000Z")
    assert exported == [([5], True)] and [r.task_id for r in res.rejected] == [5]
    assert res.cursor == "2026-01-01T00:00:00.000000Z"
    full = gw.pull(1, CLASSES)  # a full export leaves out tasks Label Studio calls unannotated
    assert [r.task_id for r in full.rejected] == [5]


def test_uncounted_annotations_and_the_changed_query(monkeypatch):
    gw = LabelStudioGateway("http://127.0.0.1:9", "0123456789abcdef")
    calls: list[dict[str, Any]] = []

    def listing(pid, include, *, fields="task_only", query=None, page_size=0, limit=None):
        calls.append({"include": include, "fields": fields, "query": query})
        if "annotations_ids" in include:
            return [
                {"id": 1, "annotations_ids": "", "cancelled_annotations": 0},
                {"id": 2, "annotations_ids": "7", "cancelled_annotations": 1},  # a skip
                {"id": 3, "annotations_ids": "8,9", "cancelled_annotations": 1},
                {"id": 4, "annotations_ids": [10], "cancelled_annotations": 0},  # Postgres
            ]
        return [
            {"id": 5, "updated_at": "2026-01-02T00:00:00Z", "completed_at": None},
            {"id": 6, "updated_at": "2026-01-01T00:00:00Z", "completed_at": "2026-01-03T00:00:00Z"},
        ]

    monkeypatch.setattr(gw, "_list_tasks_raw", listing)
    assert gw.uncounted_annotation_task_ids(1) == [3, 4]
    assert calls[-1]["fields"] == "all"
    changed = gw.changed_since(1, "2026-01-01T00:00:00.000000Z")
    assert [(t, w.day) for t, w in changed] == [(5, 2), (6, 3)]
    q = calls[-1]["query"]["filters"]
    assert q["conjunction"] == "or"
    assert [i["filter"] for i in q["items"]] == [
        "filter:tasks:updated_at",
        "filter:tasks:completed_at",
    ]
