"""Label savings of oracle-replay learning curves (pure: curves in, numbers out; the plot of the
curves is `loop.report.plots.plot_curves`).

A curve is the JSON record `loop.replay.replay_curve` writes: ``{"strategy", "seed", "rounds":
[{"round", "labeled", "test_map50", "test_map50_95", "actions_total", "effort", ...}]}``.
Savings compare a strategy's curve with the baseline's (random) of the same seed: the labels
(or a labeler's correction actions) each needs to reach a target test mAP50, interpolated
linearly between rounds (`labels_to_reach`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def _points(
    curve: dict[str, Any], metric: str, x: str = "labeled"
) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[metric]) for r in curve["rounds"] if r.get(metric) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.array(pts, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def labels_to_reach(
    labeled: Sequence[float] | np.ndarray,
    metric: Sequence[float] | np.ndarray,
    target: float,
    cap: float,
) -> tuple[float, bool]:
    """Labels a curve needs to reach ``target``: ``(labels, reached)``.

    The first crossing, linearly interpolated between rounds (the first point itself when it is
    already at or above the target). Not reached: extrapolated along the least-squares slope of
    the last (up to) three points, at most ``cap``; ``cap`` when the curve is flat or falling.
    """
    x = np.asarray(labeled, dtype=np.float64)
    y = np.asarray(metric, dtype=np.float64)
    if x.size == 0:
        return cap, False
    for i in range(x.size):
        if y[i] >= target:
            if i == 0 or y[i] == y[i - 1]:
                return float(x[i]), True
            frac = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + frac * (x[i] - x[i - 1])), True
    tail_x, tail_y = x[-3:], y[-3:]
    if tail_x.size >= 2 and np.ptp(tail_x) > 0:
        slope = float(np.polyfit(tail_x, tail_y, 1)[0])
        if slope > 0:
            return float(min(cap, x[-1] + (target - y[-1]) / slope)), False
    return cap, False


def _savings_by_round(
    bx: np.ndarray, by: np.ndarray, sx: np.ndarray, sy: np.ndarray
) -> list[dict[str, Any]]:
    """Savings against every round of the baseline after its first, not only its last: for
    round ``r``, the labels the strategy needs to reach the baseline's ``metric`` at ``r``
    against the baseline's labels at ``r`` (rounds where the baseline is not above its first
    round are left out)."""
    rows = []
    for r in range(1, bx.size):
        if by[r] <= by[0]:
            continue
        need, reached = labels_to_reach(sx, sy, float(by[r]), cap=2 * float(bx[r]))
        rows.append(
            {
                "round": r,
                "baseline_labels": float(bx[r]),
                "target": float(by[r]),
                "labels_needed": need,
                "reached": reached,
                "savings": 1.0 - need / float(bx[r]),
            }
        )
    return rows


def _mean_by_round(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per baseline round: mean / min / max of the seeds' `_savings_by_round` savings."""
    by_round: dict[int, list[float]] = {}
    for rows in per_seed:
        for row in rows:
            by_round.setdefault(int(row["round"]), []).append(float(row["savings"]))
    return [
        {
            "round": r,
            "savings_mean": float(np.mean(v)),
            "savings_min": float(np.min(v)),
            "savings_max": float(np.max(v)),
            "n_seeds": len(v),
        }
        for r, v in sorted(by_round.items())
    ]


def label_savings(
    curves: Iterable[dict[str, Any]],
    baseline: str = "random",
    metric: str = "test_map50",
    x: str = "labeled",
) -> dict[str, Any]:
    """Label savings of every strategy against ``baseline``, seed by seed.

    For seed ``s``: target = the baseline's final ``metric``, ``L_b`` = the baseline's final
    labeled count, ``L`` = `labels_to_reach` on the strategy's curve (capped at ``2 L_b``), and
    savings = ``1 - L / L_b`` (in ``[-1, 1)``; 0.3 = the same accuracy with 30% fewer labels;
    negative = more labels). A seed whose baseline never rose above its first round has no
    savings (None, with a reason); means and extremes are over the other seeds. Also the mean
    curve over seeds per round, and the same savings against each earlier round of the
    baseline (``savings_by_round``, averaged into ``savings_mean_over_rounds``): one final
    point is a noisy measure of a whole curve.

    ``x``: the cost axis, ``labeled`` images by default; ``actions_total`` counts a labeler's
    correction actions instead (same formula, actions for labels).
    """
    by_key: dict[tuple[str, int], dict[str, Any]] = {
        (c["strategy"], int(c["seed"])): c for c in curves
    }
    strategies = sorted({k[0] for k in by_key})
    out: dict[str, Any] = {"baseline": baseline, "metric": metric, "strategies": {}}
    for name in strategies:
        per_seed: list[dict[str, Any]] = []
        for (strat, seed), curve in sorted(by_key.items()):
            if strat != name or (baseline, seed) not in by_key:
                continue
            bx, by = _points(by_key[(baseline, seed)], metric, x)
            sx, sy = _points(curve, metric, x)
            if bx.size == 0 or sx.size == 0:
                continue
            base_labels, target = float(bx[-1]), float(by[-1])
            if bx.size < 2 or target <= by[0]:
                # The baseline did not improve on its first round (e.g. a model that has not
                # started learning): every curve "reaches" it at once, savings mean nothing.
                per_seed.append(
                    {
                        "seed": seed,
                        "savings": None,
                        "reason": "the baseline did not improve on its first round",
                        "baseline_labels": base_labels,
                        "target": target,
                    }
                )
                continue
            need, reached = labels_to_reach(sx, sy, target, cap=2 * base_labels)
            per_seed.append(
                {
                    "seed": seed,
                    "savings": 1.0 - need / base_labels,
                    "labels_needed": need,
                    "reached": reached,
                    "baseline_labels": base_labels,
                    "target": target,
                    "by_round": _savings_by_round(bx, by, sx, sy),
                }
            )
        vals = np.array(
            [p["savings"] for p in per_seed if p["savings"] is not None], dtype=np.float64
        )
        rounds_mean = _mean_by_round([p.get("by_round", []) for p in per_seed])
        out["strategies"][name] = {
            "savings_by_round": rounds_mean,
            "savings_mean_over_rounds": (
                float(np.mean([r["savings_mean"] for r in rounds_mean])) if rounds_mean else None
            ),
            "savings_mean": float(vals.mean()) if vals.size else None,
            "savings_min": float(vals.min()) if vals.size else None,
            "savings_max": float(vals.max()) if vals.size else None,
            "savings_std": float(vals.std(ddof=1)) if vals.size > 1 else None,
            "per_seed": per_seed,
            "curve": mean_curve([c for (s, _), c in by_key.items() if s == name]),
        }
    others = {
        n: v["savings_mean"]
        for n, v in out["strategies"].items()
        if n != baseline and v["savings_mean"] is not None
    }
    best = max(others, key=lambda n: others[n]) if others else None
    out["best_strategy"] = best
    out["best_savings_mean"] = None if best is None else others[best]
    return out


def ceiling_savings(
    curves: Iterable[dict[str, Any]],
    ceiling_metric: float,
    fraction: float = 0.95,
    baseline: str = "random",
    metric: str = "test_map50",
) -> dict[str, Any]:
    """Label savings at ``fraction`` of the full-pool ceiling, seed by seed:
    ``1 - L_strategy / L_baseline``, each the labels its curve needs to reach
    ``fraction * ceiling_metric`` (`labels_to_reach`; a curve that never gets there is
    extrapolated, capped at twice the baseline's final labels, and flagged ``reached: false``)."""
    target = fraction * float(ceiling_metric)
    by_key = {(c["strategy"], int(c["seed"])): c for c in curves}
    out: dict[str, Any] = {"target": target, "fraction": fraction, "strategies": {}}
    for name in sorted({k[0] for k in by_key}):
        rows = []
        for (strat, seed), curve in sorted(by_key.items()):
            if strat != name or (baseline, seed) not in by_key:
                continue
            bx, by = _points(by_key[(baseline, seed)], metric)
            sx, sy = _points(curve, metric)
            if bx.size == 0 or sx.size == 0:
                continue
            cap = 2 * float(bx[-1])
            lb, rb = labels_to_reach(bx, by, target, cap)
            ls, rs = labels_to_reach(sx, sy, target, cap)
            rows.append(
                {
                    "seed": seed,
                    "labels_needed": ls,
                    "reached": rs,
                    "baseline_labels_needed": lb,
                    "baseline_reached": rb,
                    "savings": 1.0 - ls / lb,
                }
            )
        vals = [r["savings"] for r in rows]
        out["strategies"][name] = {
            "savings_mean": float(np.mean(vals)) if vals else None,
            "savings_min": float(np.min(vals)) if vals else None,
            "savings_max": float(np.max(vals)) if vals else None,
            "per_seed": rows,
        }
    return out


def effort_summary(curves: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, summed over the selected (non-seed) rounds and averaged over seeds: what a
    labeler did with the pre-annotations (accepted, adjusted, relabeled, removed, added boxes,
    ``actions`` = all but accepted) against ``gt_boxes`` (drawing every box from scratch), and
    ``preannotation_savings = 1 - actions / gt_boxes``."""
    per: dict[str, list[dict[str, float]]] = {}
    for c in curves:
        tot: dict[str, float] = {}
        for r in c["rounds"]:
            for k, v in (r.get("effort") or {}).items():
                tot[k] = tot.get(k, 0.0) + float(v)
        if tot:
            per.setdefault(c["strategy"], []).append(tot)
    out: dict[str, Any] = {}
    for name, rows in sorted(per.items()):
        keys = sorted({k for r in rows for k in r})
        mean: dict[str, float | None] = {
            k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in keys
        }
        gt, actions = mean.get("gt_boxes") or 0.0, mean.get("actions") or 0.0
        mean["preannotation_savings"] = 1.0 - actions / gt if gt else None
        mean["n_seeds"] = len(rows)
        out[name] = mean
    return out


def summarize(
    curves: Sequence[dict[str, Any]],
    ceiling: dict[str, Any] | None = None,
    baseline: str = "random",
    metric: str = "test_map50",
) -> dict[str, Any] | None:
    """Everything a replay reports against ``baseline`` (None without a baseline curve):
    `label_savings` on ``metric`` (test mAP50, the headline; ``test_mask_map50`` for segment
    replays), the same with correction actions as the cost (``actions_savings``),
    `effort_summary`, and with a ``ceiling`` record `ceiling_savings` (at its ``metric``)."""
    if not any(c["strategy"] == baseline for c in curves):
        return None
    out = label_savings(curves, baseline, metric=metric)
    actions = label_savings(curves, baseline, metric=metric, x="actions_total")
    for name, s in out["strategies"].items():
        a = actions["strategies"].get(name, {})
        s["actions_savings_mean"] = a.get("savings_mean")
        s["actions_savings_min"] = a.get("savings_min")
        s["actions_savings_max"] = a.get("savings_max")
    out["effort"] = effort_summary(curves)
    if ceiling is not None and ceiling.get(metric) is not None:
        out["ceiling"] = {
            "test_map50": ceiling["test_map50"],
            "test_map50_95": ceiling.get("test_map50_95"),
            "labeled": ceiling.get("labeled"),
            **({metric: ceiling[metric]} if metric != "test_map50" else {}),
            **ceiling_savings(curves, ceiling[metric], baseline=baseline, metric=metric),
        }
    return out


def mean_curve(curves: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: mean labeled count and mean/min/max test mAP50 (and mean mAP50-95) over the
    curves (seeds) that reached that round; for curves with mask metrics (segment replays) the
    same of test mask mAP50 (``mask_map50_*``) and the mean defect-free labeled images."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for c in curves:
        for r in c["rounds"]:
            by_round.setdefault(int(r["round"]), []).append(r)
    out = []
    for rnd in sorted(by_round):
        recs = by_round[rnd]
        m50 = [r["test_map50"] for r in recs if r["test_map50"] is not None]
        m95 = [r["test_map50_95"] for r in recs if r["test_map50_95"] is not None]
        out.append(
            {
                "round": rnd,
                "labeled": float(np.mean([r["labeled"] for r in recs])),
                "map50_mean": float(np.mean(m50)) if m50 else None,
                "map50_min": float(np.min(m50)) if m50 else None,
                "map50_max": float(np.max(m50)) if m50 else None,
                "map50_95_mean": float(np.mean(m95)) if m95 else None,
                "actions_mean": float(np.mean([r.get("actions_total", 0) for r in recs])),
                "n_seeds": len(recs),
            }
        )
        k50 = [r["test_mask_map50"] for r in recs if r.get("test_mask_map50") is not None]
        if k50:  # segment replays only: detect curves keep exactly the keys above
            k95 = [r["test_mask_map50_95"] for r in recs if r.get("test_mask_map50_95") is not None]
            out[-1].update(
                {
                    "mask_map50_mean": float(np.mean(k50)),
                    "mask_map50_min": float(np.min(k50)),
                    "mask_map50_max": float(np.max(k50)),
                    "mask_map50_95_mean": float(np.mean(k95)) if k95 else None,
                    "defect_free_mean": float(np.mean([r.get("defect_free", 0) for r in recs])),
                }
            )
    return out
