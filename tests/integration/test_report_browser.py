"""The report page in headless Chromium: loads from disk, headline numbers in the DOM, no console
errors, no network requests; saves a full-page screenshot.

Talks the Chrome DevTools Protocol over one websocket (the ``websockets`` package, a Prefect
dependency): no WebDriver download. Chromium comes from Debian (``scripts/install-chromium.sh``,
run by the Makefile). Missing Chromium FAILS the test when running as root or with ``CI`` set
(CI installs it) and skips it otherwise. The screenshot goes to ``$DEFECT_LOOP_ARTIFACTS``
(default: tmp_path).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from loop.annotation_log import AnnotationRecord, TaskOutcome
from loop.annotator_quality import label_quality
from loop.detections import Detections
from loop.report import (
    Box,
    ClassCorrections,
    ClassRow,
    Confusion,
    Disagreement,
    Effort,
    LabelQualityData,
    NextBatch,
    ReportData,
    RoundPoint,
    render_html,
)

pytestmark = pytest.mark.integration

EVIL = "<script>alert('x')</script>"
HEADLINE_IDS = (
    "champion-map50",
    "champion-map50-95",
    "previous-map50",
    "previous-map50-95",
    "labels-added",
    "labels-total",
    "promotion-status",
)
ALLOWED_SCHEMES = ("file:", "data:")
TIMEOUT_S = 60.0


# ------------------------------------------------------------------ a minimal CDP client


def chromium_binary() -> str:
    """Path of Chromium; fail as root (CI installs it), skip otherwise."""
    found = os.environ.get("DEFECT_LOOP_CHROMIUM") or shutil.which("chromium")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found and Path(found).exists():
        return found
    msg = (
        "Chromium not found (set DEFECT_LOOP_CHROMIUM or run scripts/install-chromium.sh, which "
        "installs the Debian packages chromium and chromium-driver)"
    )
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip(msg + "; skipped: not root (and not CI), so it cannot be installed here")
    pytest.fail(msg + "; CI (and root, who can install it) must run this test")


class Browser:
    """Headless Chromium with a DevTools websocket; events are buffered per session."""

    def __init__(self, binary: str, profile: Path) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.log_path = profile.parent / "chromium.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT_S
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"Chromium did not start; its log:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=TIMEOUT_S)
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None):
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(
            e.get("method") == method and e.get("sessionId") == session for e in self.events
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {TIMEOUT_S} s")
            self.pump(0.1)

    def open(self, url: str) -> str:
        """A new tab with every relevant domain enabled, navigated to ``url``; its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        self.pump(0.5)  # late console messages and requests
        return session

    def evaluate(self, expression: str, session: str) -> Any:
        res = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def problems(self, session: str) -> tuple[list[str], list[str]]:
        """(console errors and exceptions, requests to anything but file: and data: URLs)."""
        errors, requests = [], []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in {"error", "assert"}:
                errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif m == "Runtime.exceptionThrown":
                errors.append(str(p["exceptionDetails"].get("text")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"{p['entry'].get('source')}: {p['entry'].get('text')}")
            elif m == "Network.requestWillBeSent":
                url = p["request"]["url"]
                if not url.startswith(ALLOWED_SCHEMES):
                    requests.append(url)
        return errors, requests

    def screenshot(self, session: str, dest: Path) -> Path:
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": size["height"], "scale": 1},
            },
            session,
        )
        import base64

        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(base64.b64decode(shot["data"]))
        return dest

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                with contextlib.suppress(Exception):  # it may be gone already
                    self.send("Browser.close")
                self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(chromium_binary(), tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield b
    finally:
        b.close()


# ------------------------------------------------------------------ the report under test


def photo(path: Path) -> Path:
    """A 320x240 'surface' with two dark defects, as a real image file."""
    img = Image.new("RGB", (320, 240), (182, 186, 190))
    d = ImageDraw.Draw(img)
    for y in range(0, 240, 6):
        d.line((0, y, 320, y + 3), fill=(170, 174, 178))
    d.line((40, 60, 140, 90), fill=(60, 60, 64), width=4)
    d.ellipse((210, 150, 236, 176), fill=(70, 66, 60))
    img.save(path)
    return path


TASK_URL = "http://127.0.0.1:8080/projects/3/data/?task="


def label_quality_data(classes: list[str]) -> LabelQualityData:
    """Two annotators (one with a hostile name) on a merged task: one misses a box and swaps a
    class; a task waits in review."""

    def det(ids: list[int]) -> Detections:
        boxes = [[10, 10, 60, 60], [100, 100, 150, 150], [200, 20, 260, 80]][: len(ids)]
        return Detections(np.array(boxes, dtype=float).reshape(-1, 4), np.array(ids), (320, 240))

    t0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
    evil_annotator = '<img src=x onerror="alert(2)">'
    outcomes = [
        TaskOutcome(
            41,
            "a" * 64,
            t0,
            "merged",
            (
                AnnotationRecord("ana@example.com", 1, det([0, 1, 2]), 30.0),
                AnnotationRecord(evil_annotator, 2, det([0, 2]), 45.0),
            ),
            det([0, 1, 2]),
            "d" * 64,
        ),
        TaskOutcome(
            42,
            "b" * 64,
            t0,
            "review",
            (
                AnnotationRecord("ana@example.com", 3, det([0]), 20.0),
                AnnotationRecord(evil_annotator, 4, det([1]), 25.0),
            ),
        ),
    ]
    return LabelQualityData(label_quality(outcomes, classes), TASK_URL)


def report_data(image: Path) -> ReportData:
    classes = ["scratch", "pit", EVIL]
    dis = [
        Disagreement(
            sha256=f"{i:064x}",
            file_name=f'{EVIL}_"frame{i}".png' if i == 0 else f"line-3/frame_{i:04d}.png",
            disagreement=1.0 - i * 0.08,
            predicted=[Box(36, 55, 146, 96, "scratch", 0.81), Box(200, 140, 246, 186, "pit", 0.34)],
            final=[Box(40, 58, 142, 93, "scratch"), Box(208, 148, 238, 178, EVIL)],
            image_path=image if i != 9 else None,
            size=(320, 240),
        )
        for i in range(10)
    ]
    return ReportData(
        project="line-3 <b>coils</b>",
        round=3,
        classes=classes,
        generated_at="2024-05-01 12:00 UTC",
        run_id="0123456789abcdef",
        dataset_digest="ab" * 32,
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
        baseline=[(120, 0.41), (144, 0.47), (168, 0.52), (192, 0.55)],
        class_rows=[
            ClassRow("scratch", 0.52, 0.44, 0.78, 0.70, 210, 31),
            ClassRow("pit", 0.31, 0.36, 0.55, 0.60, 64, 5),
            ClassRow(EVIL, 0.37, 0.34, 0.50, 0.49, 8, 1),
        ],
        confusion=Confusion(classes, [[30, 2, 0, 4], [1, 12, 1, 3], [0, 2, 5, 1], [3, 4, 1, 0]]),
        effort=Effort(
            tasks=24,
            lead_times=[12.0, 30.5, 44.0, 61.0, 95.0],
            per_class={
                "scratch": ClassCorrections(40, 9, 1, 3, 4),
                "pit": ClassCorrections(2, 1, 3, 4, 6),
                EVIL: ClassCorrections(1, 0, 0, 0, 2),
            },
            annotators={"ana@example.com": 14, '<img src=x onerror="alert(1)">': 10},
        ),
        disagreements=dis,
        next_batch=NextBatch("entropy (max)", 24, {"scratch": 19, "pit": 11, EVIL: 3}, 3, 2),
        label_quality=label_quality_data(classes),
    )


def test_report_page_in_headless_chromium(browser: Browser, tmp_path: Path) -> None:
    data = report_data(photo(tmp_path / "surface.png"))
    t0 = time.perf_counter()
    page = tmp_path / "report-round-3.html"
    page.write_text(render_html(data), encoding="utf-8")
    render_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    session = browser.open(page.as_uri())
    dom = browser.evaluate(
        f"JSON.stringify(Object.fromEntries({json.dumps(list(HEADLINE_IDS))}.map(id => [id, "
        "document.getElementById(id) && document.getElementById(id).textContent.trim()])))",
        session,
    )
    values = json.loads(dom)
    assert values == {
        "champion-map50": "0.613",
        "champion-map50-95": "0.401",
        "previous-map50": "0.578",
        "previous-map50-95": "0.381",
        "labels-added": "+24",
        "labels-total": "168",
        "promotion-status": "Promoted",
    }
    facts = json.loads(
        browser.evaluate(
            "JSON.stringify({scripts: document.scripts.length, "
            "imgs: [...document.images].map(i => [i.complete, i.naturalWidth]), "
            "worse: [...document.querySelectorAll('tr.worse td.name')].map(t => t.textContent), "
            "classes: [...document.querySelectorAll('#class-table td.name')].map(t => t.textContent), "
            "annotators: [...document.querySelectorAll('#annotator-table td.name')]"
            ".map(t => t.textContent), title: document.title, "
            "quality: [...document.querySelectorAll('#annotator-quality td.name')]"
            ".map(t => t.textContent), "
            "taskLinks: [...document.querySelectorAll('#label-quality a.task')].map(a => a.href)})",
            session,
        )
    )
    assert facts["scripts"] == 0  # the escaped names did not become elements
    assert len(facts["imgs"]) == 2 + 10  # two plots, ten thumbnails, all decoded (no <img> name)
    assert all(ok and w > 0 for ok, w in facts["imgs"])
    assert facts["worse"] == ["pit"]
    assert facts["classes"] == ["scratch", "pit", EVIL]  # shown as text, verbatim
    assert '<img src=x onerror="alert(1)">' in facts["annotators"]
    assert facts["title"] == "defect-loop report: line-3 <b>coils</b>, round 3"
    assert facts["quality"] == ['<img src=x onerror="alert(2)">', "ana@example.com"]
    # The hostile annotator missed a box and swapped a class in task 41; task 42 is in review.
    assert facts["taskLinks"] == [TASK_URL + "41", TASK_URL + "41", TASK_URL + "42"]

    errors, requests = browser.problems(session)
    assert errors == []
    assert requests == []

    artifacts = Path(os.environ.get("DEFECT_LOOP_ARTIFACTS") or tmp_path)
    shot = browser.screenshot(session, artifacts / "report-round-3.png")
    browser_s = time.perf_counter() - t0
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as img:
        assert img.width == 1280 and img.height > 2000
        colors = img.convert("RGB").resize((320, img.height // 4)).getcolors(1 << 20)
        assert colors is not None and len(colors) > 200  # plots and photos, not a blank page
    print(f"render {render_s:.2f} s, browser load+checks+screenshot {browser_s:.2f} s -> {shot}")


def test_the_checks_catch_requests_and_console_errors(browser: Browser, tmp_path: Path) -> None:
    """Negative control: a page that loads from the network and logs an error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>'
    )
    errors, requests = browser.problems(browser.open(bad.as_uri()))
    assert "http://127.0.0.1:9/x.png" in requests
    assert any("boom" in e for e in errors)
