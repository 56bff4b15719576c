"""The webhook trigger with a real Label Studio calling a loopback receiver (the session fixture
runs the server with SSRF_PROTECTION_ENABLED=false), plus the receiver's own rules."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import ConfigError
from loop.labelstudio import LabelStudioGateway, PushItem
from loop.webhooks import SECRET_HEADER, AnnotationCounter, WebhookReceiver

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent"]


def test_counter_rules():
    c = AnnotationCounter(3, project_id=7)
    ann = lambda i, **kw: {"action": "ANNOTATION_CREATED", "annotation": {"id": i, **kw},  # noqa: E731
                           "project": {"id": 7}}  # fmt: skip
    assert c.handle(ann(1)) is None
    assert c.handle({**ann(1), "action": "ANNOTATION_UPDATED"}) is None  # same annotation
    assert c.handle(ann(2, was_cancelled=True)) is None  # a skip is not a label
    assert c.handle({**ann(3), "project": {"id": 8}}) is None  # another project
    assert c.handle({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]}) is None
    assert c.pending == 0
    assert c.handle({"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 4}, {"id": 5}]}) is None
    assert c.handle({"action": "PROJECT_UPDATED"}) is None
    assert c.handle(ann(6)) == [4, 5, 6]
    assert c.pending == 0 and c.triggers == 1
    with pytest.raises(ConfigError):
        AnnotationCounter(0)


def test_receiver_checks_secret_and_survives_a_failing_callback():
    calls: list[list[int]] = []

    def callback(ids: list[int]) -> None:
        calls.append(ids)
        raise RuntimeError("boom")

    with WebhookReceiver(1, callback, secret="s3cret") as rx:
        body = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}
        assert httpx.post(rx.url, json=body, timeout=5).status_code == 403
        r = httpx.post(rx.url, json=body, headers={SECRET_HEADER: "s3cret"}, timeout=5)
        assert r.status_code == 200 and r.json()["triggered"] is True
        assert (
            httpx.post(rx.url, content=b"[", headers={SECRET_HEADER: "s3cret"}).status_code == 400
        )
        assert rx.wait_idle(10)
        assert httpx.get(rx.url.replace("/webhook", "/health"), timeout=5).status_code == 200
    assert calls == [[1]] and rx.errors == 1


def test_label_studio_webhooks_trigger_the_callback(ls_server):
    fired = threading.Event()
    batches: list[list[int]] = []

    def callback(ids: list[int]) -> None:
        batches.append(ids)
        fired.set()

    with LabelStudioGateway(ls_server.url, ls_server.token) as gw:
        pid = gw.ensure_project("defect-loop: webhooks", CLASSES, "Box defects.")
        det = Detections(np.array([[1.0, 2, 10, 12]]), [1], (32, 32), confidence=[0.5])
        items = [PushItem(f"{i:064x}"[::-1], f"/data/local-files/?d=w{i}.png", det, 1.0) for i in range(3)]  # fmt: skip
        ids = list(gw.push(pid, items, "m1", CLASSES, progress=False).task_ids.values())
        with WebhookReceiver(2, callback, project_id=pid, secret="hook-secret") as rx:
            hook = gw.ensure_webhook(pid, rx.url, headers={SECRET_HEADER: "hook-secret"})
            assert gw.ensure_webhook(pid, rx.url, headers={SECRET_HEADER: "hook-secret"}) == hook
            try:
                a0 = gw.annotate(ids[0], det, CLASSES)
                gw.delete_annotation(a0)  # deleted before the threshold: no longer counts
                assert rx.counter.pending == 0
                a1 = gw.annotate(ids[1], det, CLASSES)
                assert not fired.is_set()
                a2 = gw.annotate(ids[2], Detections.empty((32, 32)), CLASSES)
                assert fired.wait(10), "Label Studio did not call the webhook"
                assert batches == [[a1, a2]]
                assert rx.counter.events >= 4
            finally:
                gw.delete_webhook(hook)
        gw.delete_webhook(hook)  # already gone: no error


def test_cli_setup_is_idempotent(ls_server, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from loop.cli.labelstudio import ls_app

    root = ls_server.document_root / "cli-setup"
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "defect-loop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "cli-setup",
                "classes": CLASSES,
                "workspace": "ws",
                "labelstudio": {
                    "url": ls_server.url,
                    "document_root": str(ls_server.document_root),
                    "polygons": True,
                },
            }
        )
    )
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", ls_server.token)
    first = CliRunner().invoke(ls_app, ["setup", "--config", str(cfg)])
    assert first.exit_code == 0, first.output
    assert "classes ['scratch', 'dent'], polygons on" in first.output
    second = CliRunner().invoke(ls_app, ["setup", "--config", str(cfg)])
    assert second.exit_code == 0 and second.output.split()[3] == first.output.split()[3]
