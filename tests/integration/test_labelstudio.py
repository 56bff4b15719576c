"""The Label Studio gateway against a real Label Studio 1.23.2 (fixture `ls_server`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loop.detections import Detections
from loop.errors import LabelStudioError
from loop.formats.labelstudio import detections_to_ls_results
from loop.labelstudio import LabelStudioGateway, PushItem, PushSummary

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent", "crack"]
GUIDE = "Box every defect. Submit with no boxes when the part is clean."


@pytest.fixture(scope="module")
def gw(ls_server):
    with LabelStudioGateway(ls_server.url, ls_server.token) as g:
        yield g


def _write_png(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@dataclass
class Pushed:
    project_id: int
    items: list[PushItem]
    summary: PushSummary
    push_s: float
    images_dir: Path


@pytest.fixture(scope="module")
def pushed(gw, ls_server) -> Pushed:
    """A project with 5 pre-annotated tasks pushed most-valuable first."""
    pid = gw.ensure_project("defect-loop: integration", CLASSES, GUIDE)
    images = ls_server.document_root / "images"
    gw.ensure_local_storage(pid, images)
    rng = np.random.default_rng(0)
    items = []
    for i, priority in enumerate([0.9, 0.5, 2.0, 0.1, 1.3]):
        w, h = 64 + 8 * i, 48 + 4 * i
        name = f"img{i}.png"
        _write_png(images / name, w, h, seed=i)
        n = i % 3 + 1
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        xyxy = np.stack([x1, y1, x1 + rng.uniform(2, w / 2, n), y1 + rng.uniform(2, h / 2, n)], 1)
        det = Detections(
            xyxy, np.arange(n) % len(CLASSES), (w, h), confidence=rng.uniform(0.3, 0.9, n)
        )
        items.append(
            PushItem(f"{i:02d}" + "ab" * 31, f"/data/local-files/?d=images/{name}", det, priority)
        )
    items.sort(key=lambda it: -it.priority)  # the caller ranks: most valuable first
    t0 = time.monotonic()
    summary = gw.push(pid, items, model_version="round-1", class_names=CLASSES)
    return Pushed(pid, items, summary, time.monotonic() - t0, images)


def test_ensure_project_is_idempotent_and_refuses_class_change(gw):
    a = gw.ensure_project("defect-loop: idem", CLASSES, GUIDE)
    b = gw.ensure_project("defect-loop: idem", CLASSES, GUIDE)
    assert a == b
    # New instructions alone are accepted (config updated in place).
    assert gw.ensure_project("defect-loop: idem", CLASSES, "Other words.") == a
    with pytest.raises(LabelStudioError, match="classes"):
        gw.ensure_project("defect-loop: idem", list(reversed(CLASSES)), GUIDE)
    with pytest.raises(LabelStudioError, match="removed"):
        gw.ensure_project("defect-loop: idem", CLASSES[:2], GUIDE)
    info = gw.project_info(a)
    assert info["classes"] == CLASSES
    assert info["sampling"] == "Uncertainty sampling"
    # Adding a class at the end keeps the ids of the others.
    assert gw.ensure_project("defect-loop: idem", [*CLASSES, "hole"], GUIDE) == a
    assert gw.project_info(a)["classes"] == [*CLASSES, "hole"]
    with pytest.raises(LabelStudioError, match="removed"):
        gw.ensure_project("defect-loop: idem", CLASSES, GUIDE)


def test_ensure_local_storage_is_idempotent(gw, ls_server):
    pid = gw.ensure_project("defect-loop: storage", CLASSES, GUIDE)
    sub = ls_server.document_root / "store-a"
    assert gw.ensure_local_storage(pid, sub) == gw.ensure_local_storage(pid, sub)
    with pytest.raises(LabelStudioError, match="SUBfolder"):
        gw.ensure_local_storage(pid, ls_server.document_root)


def test_push_creates_tasks_in_rank_order_with_lowest_score_first(gw, pushed):
    s = pushed.summary
    assert (s.created, s.skipped, s.failed) == (5, 0, 0)
    ids = [s.task_ids[it.sha256] for it in pushed.items]
    assert ids == sorted(ids) and len(set(ids)) == 5
    tasks = {t["id"]: t for t in gw.list_tasks(pushed.project_id)}
    assert sorted(tasks) == ids
    scores = []
    for it, tid in zip(pushed.items, ids, strict=True):
        t = tasks[tid]
        assert t["data"]["sha256"] == it.sha256
        assert t["data"]["image"] == it.image_url
        assert (t["data"]["width"], t["data"]["height"]) == it.detections.image_wh
        (pred,) = t["predictions"]
        assert pred["model_version"] == "round-1"
        assert pred["score"] == pytest.approx(1.0 / (1.0 + it.priority))
        assert len(pred["result"]) == len(it.detections)
        got = sorted(r["score"] for r in pred["result"])
        assert got == pytest.approx(sorted(it.detections.confidence))
        scores.append(pred["score"])
    assert scores == sorted(scores)  # highest priority -> lowest score
    assert gw.project_info(pushed.project_id)["model_version"] == "round-1"


def test_uncertainty_sampling_serves_most_valuable_task_first(gw, pushed, ls_server):
    r = httpx.get(
        f"{ls_server.url}/api/projects/{pushed.project_id}/next",
        headers={"Authorization": f"Token {ls_server.token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"] == pushed.summary.task_ids[pushed.items[0].sha256]


def test_repush_skips_existing(gw, pushed):
    again = gw.push(pushed.project_id, pushed.items, model_version="round-1", class_names=CLASSES)
    assert (again.created, again.skipped, again.failed) == (0, 5, 0)
    assert again.task_ids == pushed.summary.task_ids
    assert len(gw.list_tasks(pushed.project_id)) == 5


def test_push_counts_unconvertible_items_as_failed(gw, pushed):
    bad = PushItem(
        "ff" * 32,
        "/data/local-files/?d=images/img0.png",
        Detections(np.array([[1.0, 1, 5, 5]]), np.array([7]), (64, 48)),
        0.5,
    )
    s = gw.push(pushed.project_id, [bad], model_version="round-1", class_names=CLASSES)
    assert (s.created, s.skipped, s.failed) == (0, 0, 1)
    assert "class id 7" in s.failures[bad.sha256]


def test_local_files_are_served_once_storage_is_attached(pushed, ls_server):
    headers = {"Authorization": f"Token {ls_server.token}"}
    r = httpx.get(f"{ls_server.url}{pushed.items[0].image_url}", headers=headers, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/png")
    name = pushed.items[0].image_url.split("d=images/")[1]
    assert r.content == (pushed.images_dir / name).read_bytes()
    _write_png(ls_server.document_root / "unattached" / "x.png", 8, 8, seed=1)
    r = httpx.get(
        f"{ls_server.url}/data/local-files/?d=unattached/x.png", headers=headers, timeout=30
    )
    assert r.status_code == 404


def test_annotate_and_pull(gw, pushed, ls_server):
    it0, it1, it2, it3, it4 = pushed.items
    ids = pushed.summary.task_ids
    # 1) defect-free: submitted with no boxes
    gw.annotate(ids[it0.sha256], Detections.empty(it0.detections.image_wh), CLASSES)
    # 2) two boxes with sub-pixel coordinates
    w, h = it1.detections.image_wh
    two = Detections(
        np.array([[3.25, 4.5, 20.75, 30.125], [10.0, 5.0, w - 0.5, h - 1.0]]),
        np.array([1, 0]),
        (w, h),
    )
    ann2 = gw.annotate(ids[it1.sha256], two, CLASSES, lead_time=12.5)
    # 3) an unknown label, as raw results -> rejected
    raw = detections_to_ls_results(
        Detections(np.array([[1.0, 1, 9, 9]]), np.array([0]), it2.detections.image_wh), ["hole"]
    )
    gw.annotate_results(ids[it2.sha256], raw)
    # 4) ground truth wins over a later ordinary annotation
    w3, h3 = it3.detections.image_wh
    gt = Detections(np.array([[2.0, 2.0, 12.0, 14.0]]), np.array([2]), (w3, h3))
    gt_id = gw.annotate(ids[it3.sha256], gt, CLASSES, ground_truth=True)
    gw.annotate(ids[it3.sha256], Detections.empty((w3, h3)), CLASSES)
    # 5) skipped (cancelled) only
    gw.annotate_results(ids[it4.sha256], [], was_cancelled=True)

    t0 = time.monotonic()
    result = gw.pull(pushed.project_id, CLASSES)
    pull_s = time.monotonic() - t0
    print(f"push of 5 tasks {pushed.push_s:.2f}s, pull {pull_s:.2f}s")

    by_task = {lb.task_id: lb for lb in result.labels}
    assert sorted(by_task) == sorted([ids[it0.sha256], ids[it1.sha256], ids[it3.sha256]])
    assert [r.task_id for r in result.rejected] == [ids[it2.sha256]]
    assert "hole" in str(result.rejected[0])
    assert result.skipped_task_ids == [ids[it4.sha256]]

    empty = by_task[ids[it0.sha256]]
    assert empty.sha256 == it0.sha256
    assert len(empty.detections) == 0
    assert empty.detections.image_wh == it0.detections.image_wh

    lab = by_task[ids[it1.sha256]]
    assert lab.sha256 == it1.sha256
    assert lab.annotation_id == ann2
    assert lab.detections.confidence is None
    assert lab.detections.image_wh == (w, h)
    np.testing.assert_array_equal(lab.detections.class_id, [1, 0])
    np.testing.assert_allclose(lab.detections.xyxy, two.xyxy, atol=1e-6, rtol=0)
    assert lab.annotator == ls_server.service.username
    assert lab.lead_time == pytest.approx(12.5)
    assert lab.updated_at is not None and lab.updated_at.tzinfo is not None
    # The prediction the labeler saw comes back with the label (for correction analytics).
    assert lab.prediction_model_version == "round-1"
    assert lab.prediction is not None
    assert lab.prediction.same_boxes(it1.detections, atol=1e-6)
    np.testing.assert_allclose(lab.prediction.confidence, it1.detections.confidence, atol=1e-9)
    assert set(result.predictions) == set(by_task)

    gt_label = by_task[ids[it3.sha256]]
    assert gt_label.annotation_id == gt_id and gt_label.ground_truth
    assert gt_label.detections.same_boxes(gt, atol=1e-6)


def test_push_retry_after_a_lost_response_does_not_duplicate(gw, ls_server, monkeypatch):
    """The import commits but the response is lost (timeout): the retry must not re-import."""
    from loop.labelstudio import transport as ls_transport

    monkeypatch.setattr(ls_transport, "_BACKOFF_S", 0.0)
    pid = gw.ensure_project("defect-loop: retry", CLASSES, GUIDE)
    real = gw._raw
    calls = []

    def lossy(method, path, **kwargs):
        if not (method == "POST" and path.endswith("/import")):
            return real(method, path, **kwargs)
        calls.append(len(kwargs["body"]))
        res = real(method, path, **kwargs)
        if len(calls) == 1:
            raise httpx.ReadTimeout("simulated lost response")
        return res

    monkeypatch.setattr(gw, "_raw", lossy)
    det = Detections(np.array([[1.0, 2, 10, 12]]), np.array([1]), (32, 32), confidence=[0.4])
    items = [
        PushItem(f"{i:064x}", f"/data/local-files/?d=images/r{i}.png", det, 1.0) for i in range(4)
    ]
    s = gw.push(pid, items[:2], model_version="m", class_names=CLASSES, batch_size=2)
    assert (s.created, s.skipped) == (2, 0)
    s = gw.push(pid, items, model_version="m", class_names=CLASSES, batch_size=2)
    assert (s.created, s.skipped) == (2, 2)
    assert calls == [2, 2]  # first call lost its response; no re-send of committed items
    tasks = gw.list_tasks(pid)
    assert sorted(t["data"]["sha256"] for t in tasks) == sorted(it.sha256 for it in items)


def test_service_start_is_idempotent_and_restart_keeps_token(ls_server, gw, pushed):
    svc = ls_server.service
    t0 = time.monotonic()
    svc.start()  # already running: nothing to do
    assert time.monotonic() - t0 < 5
    st = svc.status()
    assert st["running"] and st["healthy"] and st["url"] == ls_server.url
    assert Path(st["log"]).is_file()
    assert svc.stop() is True
    assert svc.status()["running"] is False
    t0 = time.monotonic()
    svc.start()
    print(f"restart {time.monotonic() - t0:.1f}s; first start {ls_server.first_start_s:.1f}s")
    assert len(gw.list_tasks(pushed.project_id)) == 5  # same data, same token
