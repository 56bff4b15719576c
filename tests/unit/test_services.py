"""Unit tests of `loop.services`, the Label Studio gateway without a server (retries, pull on a
canned export) and the pure Label Studio conversions (`loop.formats.labelstudio*`)."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.core.api_error import ApiError
from ls_json import poly as _poly
from ls_json import rect as _rect
from ls_json import verdict as _verdict

from loop.errors import ConfigError, ConversionError, LabelStudioError, ServiceError
from loop.formats.labelstudio import UnsafeImagePathError, check_image_url, parse_time
from loop.formats.labelstudio_config import (
    classes_from_label_config,
    instructions_html,
    label_config_xml,
)
from loop.labelstudio import LabelStudioGateway
from loop.labelstudio import transport as ls_transport
from loop.services import (
    LabelStudioService,
    free_port,
    load_or_create_credentials,
)

CLASSES = ["scratch", "dent", "crack", "stain"]


# --- label config ----------------------------------------------------------------------------
def test_label_config_is_valid_xml_with_one_label_per_class():
    xml = label_config_xml(CLASSES, 'Box defects <carefully> & "tightly".')
    root = ET.fromstring(xml)
    (image,) = root.iter("Image")
    assert image.get("name") == "image" and image.get("value") == "$image"
    (rect,) = root.iter("RectangleLabels")
    assert rect.get("name") == "label" and rect.get("toName") == "image"
    labels = list(rect.iter("Label"))
    assert [lb.get("value") for lb in labels] == CLASSES
    colours = [lb.get("background") for lb in labels]
    assert len(set(colours)) == len(CLASSES)
    assert all(c and c.startswith("#") and len(c) == 7 for c in colours)
    (header,) = root.iter("Header")
    assert header.get("value") == 'Box defects <carefully> & "tightly".'
    assert classes_from_label_config(xml) == CLASSES


def test_label_config_many_classes_get_distinct_colours():
    names = [f"c{i}" for i in range(40)]
    root = ET.fromstring(label_config_xml(names, ""))
    colours = [lb.get("background") for lb in root.iter("Label")]
    assert len(set(colours)) == 40
    assert not list(root.iter("Header"))


@pytest.mark.parametrize("bad", [[], ["a", "a"], ["a", " "]])
def test_label_config_rejects_bad_class_lists(bad):
    with pytest.raises(ConfigError):
        label_config_xml(bad, "")


def test_classes_from_foreign_config_is_refused():
    with pytest.raises(LabelStudioError, match="RectangleLabels"):
        classes_from_label_config('<View><Image name="img" value="$img"/></View>')


# --- credentials -----------------------------------------------------------------------------
def test_credentials_created_0600_and_reused(tmp_path):
    path = tmp_path / "ls" / "credentials.json"
    a = load_or_create_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert 6 <= len(a.api_token) <= 40
    assert len(a.password) >= 16
    b = load_or_create_credentials(path)
    assert a == b
    assert json.loads(path.read_text())["api_token"] == a.api_token
    c = load_or_create_credentials(tmp_path / "other.json")
    assert c.api_token != a.api_token and c.password != a.password


def test_credentials_file_with_loose_mode_is_tightened(tmp_path):
    path = tmp_path / "credentials.json"
    load_or_create_credentials(path)
    path.chmod(0o644)
    load_or_create_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_broken_credentials_file_raises(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text("{}")
    with pytest.raises(ServiceError, match="credentials file"):
        load_or_create_credentials(path)


# --- service without a server ----------------------------------------------------------------
def _service(tmp_path: Path, **kw) -> LabelStudioService:
    creds = load_or_create_credentials(tmp_path / "credentials.json")
    return LabelStudioService.from_credentials(
        creds,
        tmp_path / "data",
        tmp_path / "root",
        port=free_port(),
        venv_dir=tmp_path / "no-venv",
        **kw,
    )


def test_status_when_not_running(tmp_path):
    svc = _service(tmp_path)
    st = svc.status()
    assert st["running"] is False and st["pid"] is None and st["healthy"] is False
    assert st["url"] == svc.url == f"http://127.0.0.1:{svc.port}"
    assert st["log"] == str(svc.data_dir / "label-studio.log")
    assert svc.stop() is False  # no error when nothing runs


def test_stale_pid_file_is_ignored_and_removed(tmp_path):
    svc = _service(tmp_path)
    svc.data_dir.mkdir(parents=True)
    svc.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not Label Studio
    assert svc.status()["running"] is False
    svc.pid_file.write_text("999999999\n")  # no such process
    assert svc.status()["running"] is False
    svc.stop()
    assert not svc.pid_file.exists()


def test_start_without_install_says_what_to_do(tmp_path):
    svc = _service(tmp_path)
    with pytest.raises(ServiceError, match=r"ensure_installed|services up"):
        svc.start(timeout_s=1)


def test_token_length_is_checked(tmp_path):
    with pytest.raises(ServiceError, match="6-40"):
        LabelStudioService(tmp_path, tmp_path / "r", "u@x.y", "pw", "short")
    with pytest.raises(ServiceError, match="6-40"):
        LabelStudioService(tmp_path, tmp_path / "r", "u@x.y", "pw", "x" * 41)


def test_server_env_is_clean_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HOST", "http://evil.example")
    monkeypatch.setenv("DEBUG", "true")
    monkeypatch.setenv("LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK", "false")
    svc = _service(tmp_path, extra_env={"LOG_LEVEL": "INFO"})
    env = svc.server_env()
    assert "HOST" not in env and "DEBUG" not in env
    assert env["LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"] == "true"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LABEL_STUDIO_USER_TOKEN"] == svc.api_token
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == str(svc.document_root)
    assert env["LABEL_STUDIO_BASE_DATA_DIR"] == str(svc.data_dir)
    assert env["LATEST_VERSION_CHECK"] == "false"
    assert env["COLLECT_ANALYTICS"] == "false"
    assert env["SENTRY_DSN"] == ""
    assert env["LOG_LEVEL"] == "INFO"


def test_start_refuses_a_busy_port(tmp_path):
    import socket

    svc = _service(tmp_path)
    exe = svc.executable
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 1\n")
    exe.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", svc.port))
        s.listen()
        with pytest.raises(ServiceError, match="already in use"):
            svc.start(timeout_s=1)


def test_start_reports_early_exit_with_log_tail(tmp_path):
    svc = _service(tmp_path)
    exe = svc.executable
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\necho 'boom: database is locked' >&2\nexit 3\n")
    exe.chmod(0o755)
    with pytest.raises(ServiceError) as info:
        svc.start(timeout_s=20)
    msg = str(info.value)
    assert "exited" in msg and str(svc.log_file) in msg and "boom: database is locked" in msg
    assert not svc.pid_file.exists()


# --- gateway retries (no server needed) -------------------------------------------------------
def _gateway() -> LabelStudioGateway:
    return LabelStudioGateway("http://127.0.0.1:9", "0123456789abcdef")


def test_gateway_retries_5xx_then_succeeds(monkeypatch):
    monkeypatch.setattr(ls_transport, "_BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ApiError(status_code=503, body={"detail": "busy"})
        return "ok"

    assert _gateway()._call("test", flaky) == "ok"
    assert len(calls) == 3


def test_gateway_does_not_retry_4xx(monkeypatch):
    monkeypatch.setattr(ls_transport, "_BACKOFF_S", 0.0)
    calls = []

    def bad():
        calls.append(1)
        raise ApiError(status_code=400, body={"detail": "Validation error"})

    with pytest.raises(LabelStudioError, match=r"HTTP 400.*Validation error"):
        _gateway()._call("test", bad)
    assert len(calls) == 1


def test_gateway_unreachable_server_is_a_service_error(monkeypatch):
    monkeypatch.setattr(ls_transport, "_BACKOFF_S", 0.0)
    with pytest.raises(ServiceError, match="unreachable"):
        _gateway().ensure_project("some project", CLASSES, "")


def test_failed_install_names_the_pip_log(tmp_path):
    svc = _service(tmp_path)
    python = svc.venv_dir / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(ServiceError) as info:
        svc.ensure_installed(progress=False)
    msg = str(info.value)
    assert str(svc.pip_log_file) in msg and "No matching distribution" in msg


# --- pull selection logic on a canned export (no server) ---------------------------------------
def _ann(aid, result, updated, gt=False, cancelled=False):
    return {
        "id": aid,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": gt,
        "updated_at": updated,
        "completed_by": 1,
        "lead_time": 3.0,
    }


def test_pull_picks_ground_truth_then_latest_and_rejects_bad_tasks(monkeypatch):
    data = {"image": "/x", "sha256": "s", "width": 200, "height": 100}
    export = [
        {  # latest wins (note: no microseconds on the later time)
            "id": 1,
            "data": {**data, "sha256": "s1"},
            "annotations": [
                _ann(10, [_rect(10, 10, 20, 20, "dent")], "2026-01-01T10:00:00.900000Z"),
                _ann(11, [], "2026-01-01T10:00:01Z"),
            ],
        },
        {  # ground truth wins over a later one
            "id": 2,
            "data": {**data, "sha256": "s2"},
            "annotations": [
                _ann(20, [_rect(0, 0, 50, 50, "crack")], "2026-01-01T10:00:00Z", gt=True),
                _ann(21, [], "2026-01-02T10:00:00Z"),
            ],
        },
        {
            "id": 3,
            "data": {**data, "sha256": "s3"},
            "annotations": [_ann(30, [], "2026-01-01T00:00:00Z", cancelled=True)],
        },
        {"id": 4, "data": {"image": "/x"}, "annotations": [_ann(40, [], "2026-01-01T00:00:00Z")]},
        {  # drawn on another image size
            "id": 5,
            "data": {**data, "sha256": "s5"},
            "annotations": [_ann(50, [_rect(1, 1, 2, 2, "dent", ow=100)], "2026-01-01T00:00:00Z")],
        },
        {  # empty and no stored size
            "id": 6,
            "data": {"image": "/x", "sha256": "s6"},
            "annotations": [_ann(60, [], "2026-01-01T00:00:00Z")],
        },
    ]
    gw = _gateway()
    monkeypatch.setattr(gw, "latest_update", lambda pid: "2026-01-03T00:00:00.000000Z")
    monkeypatch.setattr(gw, "export_tasks", lambda pid, ids=None, all_tasks=False: export)
    monkeypatch.setattr(gw, "uncounted_annotation_task_ids", lambda pid: [])
    monkeypatch.setattr(gw, "_user_emails", lambda: {1: "a@b.c"})
    res = gw.pull(1, CLASSES)
    assert res.cursor == "2026-01-03T00:00:00.000000Z" and res.full
    by = {lb.task_id: lb for lb in res.labels}
    assert sorted(by) == [1, 2]
    assert by[1].annotation_id == 11 and len(by[1].detections) == 0
    assert by[1].detections.image_wh == (200, 100) and by[1].annotator == "a@b.c"
    assert by[2].annotation_id == 20 and by[2].ground_truth
    assert by[2].detections.xyxy.tolist() == [[0.0, 0.0, 100.0, 50.0]]
    assert by[2].detections.class_id.tolist() == [CLASSES.index("crack")]
    assert res.skipped_task_ids == [3]
    assert [r.task_id for r in res.rejected] == [4, 5, 6]
    assert all(isinstance(r.__cause__, ConversionError) for r in res.rejected)
    assert "sha256" in res.rejected[0].reason
    assert "200x100" in res.rejected[1].reason
    assert "image size unknown" in res.rejected[2].reason


# --- config, image paths, polygons, several annotators, incremental pull (no server) ------------
def test_label_config_polygons_verdict_and_instructions():
    xml = label_config_xml(CLASSES, "Box it.", polygons=True)
    root = ET.fromstring(xml)
    (poly,) = root.iter("PolygonLabels")
    assert poly.get("name") == "polygon" and poly.get("toName") == "image"
    assert [lb.get("value") for lb in poly.iter("Label")] == CLASSES
    (choices,) = root.iter("Choices")
    assert choices.get("name") == "verdict"
    assert [c.get("value") for c in choices.iter("Choice")] == ["defect-free"]
    assert classes_from_label_config(xml) == CLASSES
    assert not list(ET.fromstring(label_config_xml(CLASSES)).iter("PolygonLabels"))
    page = instructions_html(["a<b", "dent"], "Line one.\n\nLine <two>.")
    assert "<p>Line one.</p>" in page and "Line &lt;two&gt;." in page
    assert "a&lt;b" in page and "NO regions" in page and "not used as negatives" in page


@pytest.mark.parametrize(
    "url",
    [
        "/data/local-files/?d=../etc/passwd",
        "/data/local-files/?d=/etc/passwd",
        "/data/local-files/?d=images/../../x.png",
        "/data/local-files/?d=",
    ],
)
def test_image_paths_escaping_the_root_are_refused(url):
    with pytest.raises(UnsafeImagePathError):
        check_image_url(url)


def test_image_path_symlink_outside_root_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(b"x")
    (root / "images" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    check_image_url("/data/local-files/?d=images/ok.png", root)
    check_image_url("/data/local-files/?d=images%2Fok.png", root)
    check_image_url("https://example.com/a.png", root)  # not a local file: not checked
    with pytest.raises(UnsafeImagePathError, match="symlink"):
        check_image_url("/data/local-files/?d=images/link.png", root)
    with pytest.raises(ConversionError, match="no image URL"):
        check_image_url(None, root)


def test_backoff_has_bounded_jitter(monkeypatch):
    monkeypatch.setattr(ls_transport, "_BACKOFF_S", 1.0)
    waits = {round(ls_transport._backoff(2), 6) for _ in range(50)}
    assert len(waits) > 1 and all(2.0 <= w <= 6.0 for w in waits)


def test_pull_rules_on_canned_export(monkeypatch):
    data = {"image": "/data/local-files/?d=images/a.png", "width": 200, "height": 100}

    def task(tid, anns, **extra):
        return {"id": tid, "data": {**data, "sha256": f"s{tid}", **extra}, "annotations": anns}

    def ann(aid, result, updated, by=1, **kw):
        return {**_ann(aid, result, updated, **kw), "completed_by": by}

    export = [
        task(1, [ann(10, [_poly([[10, 10], [30, 5], [20, 40]], "dent")], "2026-01-01T00:00:00Z")]),
        task(2, [ann(20, [_verdict()], "2026-01-01T00:00:00Z")]),  # defect-free by the choice
        task(3, [ann(30, [_verdict(), _rect(1, 1, 5, 5, "dent")], "2026-01-01T00:00:00Z")]),
        task(4, [ann(40, [_rect(1, 1, 5, 5, "dent")], "2026-01-01T00:00:00Z")], image="/data/local-files/?d=../x.png"),
        task(5, [ann(50, [{**_rect(1, 1, 5, 5, "dent"), "value": {**_rect(1, 1, 5, 5, "dent")["value"], "rotation": 30}}], "2026-01-01T00:00:00Z")]),
        task(6, [ann(60, [_rect(90, 1, 20, 5, "dent")], "2026-01-01T00:00:00Z")]),  # x+w > 100 %
        task(7, [ann(70, [_poly([[10, 10], [130, 5], [20, 40]], "dent")], "2026-01-01T00:00:00Z")]),
        task(  # three annotators: latest wins, all kept, agreement measured
            8,
            [
                ann(80, [_rect(10, 10, 20, 20, "dent")], "2026-01-01T00:00:00Z", by=1),
                ann(81, [_rect(10, 10, 20, 20, "dent")], "2026-01-02T00:00:00Z", by=2),
                ann(82, [], "2026-01-03T00:00:00Z", by=3),
                ann(83, [], "2026-01-04T00:00:00Z", by=3, cancelled=True),
            ],
        ),
    ]  # fmt: skip
    gw = _gateway()
    monkeypatch.setattr(gw, "latest_update", lambda pid: None)
    monkeypatch.setattr(gw, "export_tasks", lambda pid, ids=None, all_tasks=False: export)
    monkeypatch.setattr(gw, "uncounted_annotation_task_ids", lambda pid: [])
    monkeypatch.setattr(gw, "_user_emails", lambda: {1: "a@x", 2: "b@x", 3: "c@x"})
    res = gw.pull(1, CLASSES)
    by = {lb.task_id: lb for lb in res.labels}
    assert sorted(by) == [1, 2, 8]
    np.testing.assert_allclose(by[1].detections.xyxy, [[20.0, 5.0, 60.0, 40.0]])
    assert by[1].detections.class_id.tolist() == [CLASSES.index("dent")]
    assert len(by[2].detections) == 0
    rejected = {r.task_id: r for r in res.rejected}
    assert sorted(rejected) == [3, 4, 5, 6, 7]
    assert "defect-free" in rejected[3].reason
    assert isinstance(rejected[4].__cause__, UnsafeImagePathError)
    assert "UnsafeImagePathError" in str(rejected[4])
    assert "rotated" in rejected[5].reason and "outside the image" in rejected[6].reason
    assert "outside the image" in rejected[7].reason
    multi = by[8]
    assert multi.annotation_id == 82 and len(multi.detections) == 0
    assert multi.annotators == ("a@x", "b@x", "c@x")
    assert sorted(multi.per_annotator) == ["a@x", "b@x", "c@x"]
    assert multi.agreement == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_incremental_pull_exports_changed_ids_and_reconciles_deletions(monkeypatch):
    gw = _gateway()
    calls = {}
    changed = [
        (3, parse_time("2026-01-05T00:00:00.5Z")),
        (4, parse_time("2026-01-06T00:00:00Z")),
    ]

    def export(pid, ids=None, all_tasks=False):
        calls["export"] = (ids, all_tasks)
        data = {"image": "/data/local-files/?d=a.png", "width": 200, "height": 100}
        return [
            {"id": 3, "data": {**data, "sha256": "s3"}, "annotations": []},  # deleted
            {"id": 4, "data": {**data, "sha256": "s4"}, "annotations": [_ann(40, [], "2026-01-06T00:00:00Z")]},
        ]  # fmt: skip

    monkeypatch.setattr(gw, "changed_since", lambda pid, since: changed)
    monkeypatch.setattr(gw, "export_tasks", export)
    monkeypatch.setattr(gw, "unannotated_task_ids", lambda pid: [3, 9, 11])
    monkeypatch.setattr(gw, "uncounted_annotation_task_ids", lambda pid: [])
    monkeypatch.setattr(gw, "_user_emails", lambda: {})
    res = gw.pull(1, CLASSES, since="2026-01-01T00:00:00.000000Z", known_labeled={3: "s3", 9: "s9"})
    assert calls["export"] == ([3, 4], True)
    assert not res.full and res.cursor == "2026-01-06T00:00:00.000000Z"
    assert [lb.task_id for lb in res.labels] == [4]
    assert res.unlabeled_task_ids == [3, 9] and res.unlabeled_sha256 == ["s3", "s9"]
    monkeypatch.setattr(gw, "changed_since", lambda pid, since: [])
    res = gw.pull(1, CLASSES, since="2026-01-06T00:00:00.000000Z")
    assert res.labels == [] and res.cursor == "2026-01-06T00:00:00.000000Z"


def test_webhook_env_turns_ssrf_protection_off(tmp_path):
    from loop.services import WEBHOOK_ENV

    env = _service(tmp_path, extra_env=dict(WEBHOOK_ENV)).server_env()
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    assert "SSRF_PROTECTION_ENABLED" not in _service(tmp_path / "b").server_env()
