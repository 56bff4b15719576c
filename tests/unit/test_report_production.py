"""The lead report's "Production" section: rendered from hand-made `ProductionData` (known
answers, escaping) and "no production data yet" without any."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from loop.report import (
    NO_PRODUCTION,
    NovelImage,
    ProductionData,
    ReportData,
    WindowPoint,
    drift_png,
    production_html,
    render_html,
    render_markdown,
)

EVIL = "<script>alert('x')</script>"


def point(i: int, alert: bool = False) -> WindowPoint:
    p = 1e-6 if alert else 0.4
    return WindowPoint(
        i,
        f"2026-12-01T10:{i:02d}:00+00:00",
        "3",
        200,
        {"embedding_mmd": 0.3, "brightness_ks": p, "novelty": 0.5, "class_mix": 0.2},
        0.001,
        alert,
        f"drift alert, window {i}: brightness {EVIL}" if alert else "",
        0.01,
    )


def sample(tmp_path: Path) -> ProductionData:
    img = tmp_path / "novel.png"
    Image.fromarray(np.full((40, 60, 3), 90, dtype=np.uint8)).save(img)
    novel = [
        NovelImage(
            "a" * 64, img, (60, 40), [(5.0, 5.0, 30.0, 20.0, EVIL, 0.61)], 4.2, "novel", 2, "queued"
        ),
        NovelImage("b" * 64, None, (60, 40), [], 1.3, "uncertain", 2, "pushed"),
    ]
    return ProductionData(
        [point(0), point(1), point(2, alert=True)], novel, queued=1, pushed=1, images=600
    )


def test_no_production_data_yet():
    data = ReportData(project="p", round=None, classes=["scratch"])
    html = render_html(data)
    section = re.search(r'<section id="production">(.*?)</section>', html, re.S)
    assert section is not None and NO_PRODUCTION in section.group(1)
    assert f"{NO_PRODUCTION}." in render_markdown(data)


def test_the_section_shows_drift_alerts_and_novel_images(tmp_path: Path):
    data = ReportData(project="p", round=None, classes=["scratch"], production=sample(tmp_path))
    html = render_html(data)
    section = re.search(r'<section id="production">(.*?)</section>', html, re.S)
    assert section is not None
    body = section.group(1)
    assert NO_PRODUCTION not in body
    assert body.count("data:image/png;base64,") == 3  # the drift plot + 2 thumbnails
    assert "<b>3</b><span>windows checked</span>" in body and "<b>1</b><span>alerts</span>" in body
    assert "<b>600</b><span>production images</span>" in body
    rows = re.findall(
        r"<tr><td>(\d+)</td>", re.search(r'id="alerts".*?</table>', body, re.S).group(0)
    )
    assert rows == ["2"]
    assert EVIL not in html and "&lt;script&gt;" in body  # escaped
    assert body.count("<figure>") == 2 and "novel, priority 4.20" in body
    md = render_markdown(data)
    assert "## Production" in md and "3 windows (600 images) checked, 1 alerts" in md
    assert "<script>" not in md


def test_drift_plot_is_a_png_and_absent_without_windows(tmp_path: Path):
    png = drift_png(sample(tmp_path))
    assert png is not None and png.startswith(b"\x89PNG")
    assert drift_png(ProductionData([])) is None
    assert NO_PRODUCTION in production_html(ProductionData([]))
