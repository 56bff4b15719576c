"""Every figure defect-loop draws, and the only module that imports matplotlib: the report's
learning curve and confusion matrix, the production section's drift plot, and the oracle
replay's learning curves. The report's figures are drawn on the non-interactive Agg canvas and
returned as PNG bytes."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loop.report.data import GROUPS, Confusion, ProductionData, ReportData, WindowPoint
from loop.savings import mean_curve


def _mpl(text: str) -> str:
    """Text for matplotlib: ``$`` would start mathtext."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _figure(w: float, h: float) -> Any:
    """A matplotlib Figure on the non-interactive Agg canvas; pyplot and the global backend are
    never touched, so this is safe in servers, threads and notebooks alike."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def learning_curve_png(data: ReportData) -> bytes | None:
    """Test mAP against labeled images over all rounds (+ the random baseline); None without
    points."""
    pts = [p for p in data.curve if p.labeled is not None and p.test_map50 is not None]
    if not pts:
        return None
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p.labeled for p in pts]
    banded = False
    for key, band, label, color, marker in (
        ("test_map50", "map50", "test mAP50", "#0072B2", "o"),
        ("test_map50_95", "map50_95", "test mAP50-95", "#009E73", "s"),
    ):
        ys = [getattr(p, key) for p in pts]
        if all(y is None for y in ys):
            continue
        lo = [getattr(p, f"{band}_lo") for p in pts]
        hi = [getattr(p, f"{band}_hi") for p in pts]
        known = [a is not None and b is not None for a, b in zip(lo, hi, strict=True)]
        if any(known):
            banded = True
            # The band joins the rounds whose interval is known; each such round also gets
            # an error bar, so a lone round still shows its interval.
            ax.fill_between(
                xs,
                [a if k else float("nan") for a, k in zip(lo, known, strict=True)],
                [b if k else float("nan") for b, k in zip(hi, known, strict=True)],
                color=color,
                alpha=0.15,
                lw=0,
                zorder=1,
            )
            for p, y, a, b, k in zip(pts, ys, lo, hi, known, strict=True):
                if k and y is not None:
                    ax.errorbar(
                        [p.labeled],
                        [y],
                        yerr=[[max(0.0, y - a)], [max(0.0, b - y)]],
                        color=color,
                        lw=1,
                        capsize=3,
                        zorder=2,
                    )
        ax.plot(xs, ys, color=color, lw=2, label=label, zorder=2)
        for p, y in zip(pts, ys, strict=True):
            if y is None:
                continue
            ax.scatter(
                [p.labeled],
                [y],
                s=42,
                marker=marker,
                zorder=3,
                facecolors=color if p.promoted is not False else "white",
                edgecolors=color,
                linewidths=1.5,
            )
    for p in pts:
        ax.annotate(
            f"r{p.round}",
            # Above the error bar when there is one.
            (p.labeled, p.map50_hi if p.map50_hi is not None else p.test_map50),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
            color="#59636e",
        )
    if data.baseline:
        bx, by = zip(*sorted(data.baseline), strict=True)
        ax.plot(bx, by, ls="--", color="#888888", lw=1.5, label="random baseline (oracle replay)")
    if data.round is not None:
        cur = [p for p in pts if p.round == data.round]
        if cur:
            ax.axvline(cur[0].labeled, color="#d0d7de", lw=1, zorder=1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test mAP")
    top = max(
        [
            1e-6,
            *(
                y
                for p in pts
                for y in (p.test_map50, p.test_map50_95, p.map50_hi, p.map50_95_hi)
                if y is not None
            ),
        ]
    )
    if data.baseline:
        top = max(top, *(y for _, y in data.baseline))
    ax.set_ylim(0, min(1.0, top * 1.15 + 0.02))
    ax.grid(True, color="#eaeef2", lw=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_title(
        "filled: promoted to champion, hollow: not promoted"
        + (
            f"; bands: {100 * data.confidence:g}% bootstrap interval over test images"
            if banded
            else ""
        ),
        fontsize=8,
        color="#59636e",
        loc="left",
    )
    return _fig_png(fig)


def confusion_png(conf: Confusion) -> bytes | None:
    """Heat map of the test confusion matrix, colours normalised per true class, counts written."""
    names = [_mpl(c) for c in conf.classes] + ["background"]
    m = np.asarray(conf.matrix, dtype=float)
    n = len(names)
    if m.shape != (n, n) or n < 2:
        return None
    col = m.sum(axis=0, keepdims=True)
    frac = np.divide(m, col, out=np.zeros_like(m), where=col > 0)
    side = min(7.5, 2.0 + 0.55 * n)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if m[i, j] > 0:
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if frac[i, j] > 0.55 else "#1f2328",
                )
    ax.set_xticks(range(n), names, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(n), names, fontsize=9)
    ax.set_xlabel("true class")
    ax.set_ylabel("predicted class")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("share of the true class's boxes", fontsize=8)
    return _fig_png(fig)


def _group_p(w: WindowPoint, tests: tuple[str, ...]) -> float | None:
    ps = [w.p_values[t] for t in tests if t in w.p_values]
    return min(ps) if ps else None


def drift_png(data: ProductionData) -> bytes | None:
    """-log10(smallest p-value) per test group over the windows, the alert threshold as a
    dashed line and alerting windows marked; None without windows."""
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


def plot_curves(
    curves: Sequence[dict[str, Any]],
    png: Path,
    metric: str = "test_map50",
    title: str = "",
    ceiling: dict[str, Any] | None = None,
) -> Path:
    """Learning curves of every strategy, mean over seeds with the min-max band over seeds:
    ``metric`` against labeled images (left) and against a labeler's cumulative correction
    actions (right, when the curves record them). ``ceiling``: the full-pool training, drawn as a
    line with its 95 % level. Written with matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({c["strategy"] for c in curves}, key=lambda n: (n != "random", n))
    keys = {"test_map50": "map50", "test_map50_95": "map50_95", "test_mask_map50": "mask_map50"}
    if metric not in keys:
        raise ValueError(f"plot_curves draws one of {sorted(keys)}, got {metric!r}")
    key = keys[metric]
    banded = key in ("map50", "mask_map50")
    with_actions = any(r.get("actions_total") for c in curves for r in c["rounds"])
    fig, axes = plt.subplots(
        1, 2 if with_actions else 1, figsize=(12 if with_actions else 7, 4.5), dpi=120
    )
    axes = list(np.atleast_1d(axes))
    for name in names:
        mine = [c for c in curves if c["strategy"] == name]
        mc = mean_curve(mine)
        pts = [p for p in mc if p.get(f"{key}_mean") is not None]
        n_seeds = max((p["n_seeds"] for p in mc), default=0)
        style = "--" if name == "random" else "-"
        for ax, xkey in zip(axes, ("labeled", "actions_mean"), strict=False):
            xs = [p[xkey] for p in pts]
            ys = [p[f"{key}_mean"] for p in pts]
            (line,) = ax.plot(xs, ys, style, marker="o", ms=3, label=f"{name} ({n_seeds} seeds)")
            if banded:
                lo = [p[f"{key}_min"] for p in pts]
                hi = [p[f"{key}_max"] for p in pts]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            if name == "random" and ys:
                # What the other strategies must reach: random's final mean (savings target).
                ax.axhline(ys[-1], color=line.get_color(), alpha=0.4, linewidth=0.8, linestyle=":")
    top = ceiling.get(metric) if ceiling else None
    top_label = f"full pool ({ceiling.get('labeled')})" if ceiling else ""
    for ax, xlabel in zip(
        axes, ("labeled images (train + val)", "a labeler's correction actions"), strict=False
    ):
        if top is not None:
            ax.axhline(top, color="k", linewidth=0.8, label=top_label)
            ax.axhline(0.95 * top, color="k", linewidth=0.6, linestyle=":", label="95 % of it")
        ax.set_ylim(bottom=0.0, top=max(0.05, ax.get_ylim()[1]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            {"map50": "test mAP50", "map50_95": "test mAP50-95", "mask_map50": "test mask mAP50"}[
                key
            ]
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title(title or "oracle replay")
    if with_actions:
        axes[1].set_title("cost in correction actions (band: min-max over seeds)")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png
