"""The "Production" section of the lead report: drift over time, the alerts, the novel images.

`collect_production` reads the monitor's records of a workspace (`loop.monitor.read_windows`,
`loop.review_queue.ReviewQueue`) into a `ProductionData` (None when the monitor never checked a
window: the section then says "no production data yet"); `production_html` and
`production_markdown` render it with the report's own helpers (``data:`` PNGs, escaped text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loop.project import Project

MAX_NOVEL = 10
MAX_ALERTS = 20
NO_PRODUCTION = "no production data yet"

# The tests of a window, grouped for the plot (the smallest p-value of a group is drawn).
GROUPS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "input (embeddings, image statistics)",
        ("embedding_mmd", "brightness_ks", "contrast_ks", "sharpness_ks", "noise_ks"),
        "#0072B2",
    ),
    (
        "output (confidence, uncertainty, class mix, no-defect rate)",
        ("confidence_ks", "uncertainty_ks", "class_mix", "no_defect_rate"),
        "#E69F00",
    ),
    ("novelty", ("novelty",), "#CC79A7"),
)


@dataclass(frozen=True)
class WindowPoint:
    """One checked window: its smallest p-value per group of `GROUPS` and its alert."""

    index: int
    created_at: str
    bundle_version: str
    n_images: int
    p_values: dict[str, float]
    threshold: float
    alert: bool
    message: str = ""
    novelty_rate: float | None = None


@dataclass(frozen=True)
class NovelImage:
    """A queued image: ``boxes`` are ``(x1, y1, x2, y2, class name, confidence)`` pixels."""

    sha256: str
    image_path: Path | None
    size: tuple[int, int]
    boxes: Sequence[tuple[float, float, float, float, str, float]]
    priority: float
    reason: str
    window: int
    status: str


@dataclass(frozen=True)
class ProductionData:
    windows: Sequence[WindowPoint]
    novel: Sequence[NovelImage] = ()
    queued: int = 0
    pushed: int = 0
    images: int = 0
    notes: Sequence[str] = field(default_factory=tuple)

    @property
    def alerts(self) -> list[WindowPoint]:
        return [w for w in self.windows if w.alert]


def collect_production(project: Project) -> ProductionData | None:
    """The monitor's records of ``project`` (None when no window was checked yet)."""
    from loop.monitor import read_windows
    from loop.review_queue import ReviewQueue

    cfg = project.cfg
    windows = read_windows(cfg.paths.monitor)
    if not windows:
        return None
    points = [
        WindowPoint(
            w.index,
            w.created_at,
            w.bundle_version,
            w.n_images,
            w.p_values(),
            w.threshold,
            w.alert,
            w.message,
            w.metrics.get("novelty_rate"),
        )
        for w in windows
    ]
    classes = list(cfg.classes)
    entries = ReviewQueue(cfg.paths.monitor).entries()
    novel = []
    for e in entries[:MAX_NOVEL]:
        path: Path | None = None
        if e.sha256 in project.pool:
            path = project.pool.abs_path(e.sha256)
        elif e.held:
            path = Path(e.held)
        boxes = [
            (
                b[0],
                b[1],
                b[2],
                b[3],
                classes[int(b[4])] if 0 <= int(b[4]) < len(classes) else str(b[4]),
                b[5],
            )
            for b in e.boxes
        ]
        novel.append(
            NovelImage(
                e.sha256, path, (e.width, e.height), boxes, e.priority, e.reason, e.window, e.status
            )
        )
    return ProductionData(
        points,
        novel,
        queued=sum(e.status == "queued" for e in entries),
        pushed=sum(e.status == "pushed" for e in entries),
        images=sum(w.n_images for w in windows),
    )


def _group_p(w: WindowPoint, tests: tuple[str, ...]) -> float | None:
    ps = [w.p_values[t] for t in tests if t in w.p_values]
    return min(ps) if ps else None


def drift_png(data: ProductionData) -> bytes | None:
    """-log10(smallest p-value) per test group over the windows, the alert threshold as a
    dashed line and alerting windows marked; None without windows."""
    from loop.report import _fig_png, _figure

    if not data.windows:
        return None
    fig = _figure(9.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    xs = [w.index for w in data.windows]
    top = 1.0
    for label, tests, color in GROUPS:
        ys = []
        for w in data.windows:
            p = _group_p(w, tests)
            ys.append(math.nan if p is None else -math.log10(max(p, 1e-300)))
        top = max(top, *(y for y in ys if not math.isnan(y)), 1.0)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.5, color=color, label=label)
    thresholds = sorted({w.threshold for w in data.windows})
    for t in thresholds:
        ax.axhline(-math.log10(t), ls="--", lw=1, color="#cf222e")
    alerts = [w.index for w in data.windows if w.alert]
    for x in alerts:
        ax.axvspan(x - 0.4, x + 0.4, color="#ffebe9", zorder=0)
    ax.set_xlabel("window")
    ax.set_ylabel("-log10(smallest p-value)")
    ax.set_ylim(0, min(top * 1.1 + 0.5, 40))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="#eaeef2", lw=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(
        "above the dashed line: alert (shaded windows); higher = stronger evidence of drift",
        fontsize=8,
        color="#59636e",
        loc="left",
    )
    return _fig_png(fig)


def production_html(data: ProductionData | None) -> str:
    """The section's body: stats, the drift plot, the alerts table and the novel images."""
    from loop.report import Box, Disagreement, _h, _num, _png_uri, thumbnail_png

    def muted(text: str) -> str:
        return f'<p class="nodata">{_h(text)}</p>'

    if data is None or not data.windows:
        return muted(
            f"{NO_PRODUCTION}: deploy a model (`defect-loop deploy`) and run `defect-loop monitor`"
        )
    last = data.windows[-1]
    stats = (
        '<div class="stats" id="production-stats">'
        f'<div class="stat"><b>{len(data.windows)}</b><span>windows checked</span></div>'
        f'<div class="stat"><b>{data.images}</b><span>production images</span></div>'
        f'<div class="stat"><b>{len(data.alerts)}</b><span>alerts</span></div>'
        f'<div class="stat"><b>{data.queued}</b><span>queued for labeling ({data.pushed} pushed)</span></div>'
        f'<div class="stat"><b>v{_h(last.bundle_version)}</b><span>bundle of the last window</span></div>'
        "</div>"
    )
    png = drift_png(data)
    plot = "" if png is None else f'<img class="plot" alt="drift over time" src="{_png_uri(png)}">'
    if data.alerts:
        rows = "".join(
            f'<tr><td>{w.index}</td><td>{_h(w.created_at)}</td><td style="text-align:left">'
            f"{_h(w.message)}</td></tr>"
            for w in data.alerts[-MAX_ALERTS:][::-1]
        )
        alerts = (
            '<h3>Alerts</h3><table id="alerts"><thead><tr><th>Window</th><th>When (UTC)</th>'
            f'<th style="text-align:left">What changed</th></tr></thead><tbody>{rows}</tbody></table>'
        )
    else:
        alerts = '<h3>Alerts</h3><p class="muted" id="alerts">No window alerted.</p>'
    if data.novel:
        figs = []
        for n in data.novel:
            d = Disagreement(
                n.sha256,
                n.sha256[:12],
                n.priority,
                predicted=[Box(b[0], b[1], b[2], b[3], b[4], b[5]) for b in n.boxes],
                final=(),
                image_path=n.image_path,
                size=n.size,
            )
            figs.append(
                f'<figure><img alt="{_h(n.sha256[:12])}" src="{_png_uri(thumbnail_png(d))}">'
                f"<figcaption><b>{_h(n.sha256[:12])}</b><br>{_h(n.reason)}, priority "
                f"{_h(_num(n.priority, 2))} · window {n.window} · {_h(n.status)}</figcaption></figure>"
            )
        novel = (
            "<h3>Most novel or uncertain images (first in the next push)</h3>"
            '<div class="legend"><span><i class="pred"></i>production model\'s boxes</span></div>'
            f'<div class="gallery" id="novel-images">{"".join(figs)}</div>'
        )
    else:
        novel = "<h3>Most novel or uncertain images</h3>" + muted("No image was queued.")
    return stats + plot + alerts + novel


def production_markdown(data: ProductionData | None) -> list[str]:
    """Markdown lines of the section (a heading and a few bullets)."""
    from loop.report import _md

    lines = ["", "## Production", ""]
    if data is None or not data.windows:
        return [*lines, f"{NO_PRODUCTION}."]
    lines.append(
        f"- {len(data.windows)} windows ({data.images} images) checked, "
        f"{len(data.alerts)} alerts, {data.queued} images queued for labeling"
    )
    for w in data.alerts[-5:][::-1]:
        lines.append(f"- **alert**: {_md(w.message)}")
    return lines


def safe_collect(project: Project, notes: list[str]) -> Any:
    """`collect_production`, with unreadable monitor records noted instead of failing."""
    try:
        return collect_production(project)
    except Exception as exc:  # a broken monitor database must not break the report
        notes.append(f"production monitor records unreadable ({type(exc).__name__}: {exc})")
        return None
