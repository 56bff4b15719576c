"""The point-estimate promotion rule on two runs' metric dicts, and metric names (pure: no
MLflow)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loop.model import EvalResult


@dataclass(frozen=True)
class Promotion:
    """The gate's decision; ``class_drops``: class -> AP50-95 drop (champion - candidate) of the
    classes that failed the per-class check (empty when none did)."""

    promoted: bool
    reason: str
    class_drops: Mapping[str, float] = field(default_factory=dict)


def metric_name(text: str, keep: str = "-_.") -> str:
    """``text`` with every character MLflow refuses in a metric key replaced by ``_``."""
    return "".join(ch if ch.isalnum() or ch in keep else "_" for ch in text)


def class_metric(prefix: str, kind: str, class_name: str) -> str:
    """Key of a per-class metric, e.g. ``class_metric("test", "ap50_95", "pit")`` ->
    ``test_ap50_95_pit``."""
    return f"{prefix}_{kind}_{metric_name(class_name)}"


# Which figures the promotion gate compares, by config ``task``: box mAP for detectors, mask
# mAP (``test_mask_map50_95``, ``test_mask_ap50_95_<class>``) for segmentation models.
GATE_METRIC = {"detect": "box", "segment": "mask"}


def _kind(metric: str, kind: str) -> str:
    return kind if metric == "box" else f"mask_{kind}"


def metric_dict(prefix: str, ev: EvalResult, classes: list[str]) -> dict[str, float]:
    """MLflow metrics of one evaluation: ``<prefix>_map50``, ``_map50_95``, ``_precision``,
    ``_recall`` and per class ``<prefix>_ap50_<class>``, ``_ap50_95_<class>``,
    ``_instances_<class>`` (boxes); a segmentation model's evaluation adds the same on masks:
    ``<prefix>_mask_map50``, ``<prefix>_mask_ap50_95_<class>`` ..."""
    out = {
        f"{prefix}_map50": ev.map50,
        f"{prefix}_map50_95": ev.map50_95,
        f"{prefix}_precision": ev.precision,
        f"{prefix}_recall": ev.recall,
    }
    for c in classes:
        out[class_metric(prefix, "ap50", c)] = float(ev.per_class_ap50.get(c, 0.0))
        out[class_metric(prefix, "ap50_95", c)] = float(ev.per_class_ap50_95.get(c, 0.0))
        out[class_metric(prefix, "instances", c)] = float(ev.n_instances.get(c, 0))
    if ev.mask_map50 is not None and ev.mask_map50_95 is not None:
        out[f"{prefix}_mask_map50"] = ev.mask_map50
        out[f"{prefix}_mask_map50_95"] = ev.mask_map50_95
        out[f"{prefix}_mask_precision"] = float(ev.mask_precision or 0.0)
        out[f"{prefix}_mask_recall"] = float(ev.mask_recall or 0.0)
        for c in classes:
            out[class_metric(prefix, "mask_ap50", c)] = float(ev.mask_per_class_ap50.get(c, 0.0))
            out[class_metric(prefix, "mask_ap50_95", c)] = float(
                ev.mask_per_class_ap50_95.get(c, 0.0)
            )
    return out


def gate(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    classes: list[str],
    tolerance: float,
    max_class_drop: float,
    champion_version: str = "?",
    metric: str = "box",
) -> Promotion:
    """The promotion rule on two runs' metric dicts (pure; see `PromotionConfig`).

    Promote when there is no champion, when the champion has no test mAP50-95, or when the
    candidate's ``test_map50_95 >= champion's - tolerance`` and, for every class both runs have a
    ``test_ap50_95_<class>`` for, ``champion's - candidate's <= max_class_drop``.
    ``metric="mask"`` (segment projects, `GATE_METRIC`) reads the mask figures instead:
    ``test_mask_map50_95`` and ``test_mask_ap50_95_<class>``.
    """
    if metric not in ("box", "mask"):
        raise ValueError(f"metric must be 'box' or 'mask', got {metric!r}")
    label = "mAP50-95" if metric == "box" else "mask mAP50-95"
    class_label = "AP50-95" if metric == "box" else "mask AP50-95"
    overall = f"test_{_kind(metric, 'map50_95')}"
    if champion is None:
        return Promotion(True, "first model: no champion yet")
    new = candidate.get(overall)
    old = champion.get(overall)
    if new is None:
        return Promotion(
            False, f"candidate has no test {label} (no labeled test images, or no masks)"
        )
    if old is None:
        return Promotion(True, f"champion v{champion_version} has no test {label} to beat")
    drops: dict[str, float] = {}
    for c in classes:
        key = class_metric("test", _kind(metric, "ap50_95"), c)
        if key in candidate and key in champion:
            drop = champion[key] - candidate[key]
            if drop > max_class_drop + 1e-12:
                drops[c] = round(drop, 6)
    overall_ok = new >= old - tolerance - 1e-12
    if overall_ok and not drops:
        return Promotion(
            True,
            f"test {label} {new:.4f} >= champion v{champion_version} {old:.4f} - {tolerance:g} "
            f"and no class {class_label} dropped by more than {max_class_drop:g}",
        )
    parts = []
    if not overall_ok:
        parts.append(
            f"test {label} {new:.4f} < champion v{champion_version} {old:.4f} - {tolerance:g}"
        )
    for c, d in sorted(drops.items(), key=lambda kv: -kv[1]):
        key = class_metric("test", _kind(metric, "ap50_95"), c)
        parts.append(
            f"class {c!r} test {class_label} {candidate[key]:.4f} < champion v{champion_version} "
            f"{champion[key]:.4f} - {max_class_drop:g} (drop {d:.4f})"
        )
    return Promotion(False, "; ".join(parts), drops)


# Metric families that carry a ``mask_`` variant in segment projects (see `metric_dict` and
# `loop.quality`).
_MASK_PREFIXES = ("compared_test_", "gate_diff_", "test_", "val_")


def mask_metrics_view(metrics: Mapping[str, float]) -> dict[str, float]:
    """A segment run's metrics with the mask figures under the box names, for readers that know
    only the box names (the lead report): ``test_mask_map50`` -> ``test_map50``,
    ``gate_diff_mask_ap50_95_pit`` -> ``gate_diff_ap50_95_pit`` ...; each box figure that a mask
    figure replaces stays under ``<prefix>box_<rest>`` (``test_box_map50``). A run without mask
    figures comes back unchanged."""
    out = dict(metrics)
    for key, value in metrics.items():
        for prefix in _MASK_PREFIXES:
            if key.startswith(f"{prefix}mask_"):
                rest = key[len(prefix) + len("mask_") :]
                if f"{prefix}{rest}" in metrics:
                    out[f"{prefix}box_{rest}"] = metrics[f"{prefix}{rest}"]
                out[f"{prefix}{rest}"] = value
                break
    return out
