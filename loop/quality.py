"""The paired promotion gate of a cycle and the record of how good (and how sure) the champion is.

`gate_and_record` runs after a training run is logged: it takes the per-image match statistics
of the candidate's test evaluation (`loop.model.evaluate_matches`, the same pass `Project.fit`
ran), evaluates the champion on the SAME test images, bootstraps both together
(`loop.evaluation.paired_bootstrap`), decides with `loop.evaluation.paired_gate`, logs the
intervals to MLflow next to the point values and writes ``<workspace>/evaluation.json``
(`QualityRecord`) about the champion that holds the alias afterwards. `defect-loop status`, the
pre-annotations of `Project.push` and the report read that file.

MLflow metrics added to the training run: ``test_<metric>_lo``/``_hi`` for mAP50, mAP50-95,
precision, recall and per-class AP (``test_ap50_<class>_lo`` ...); with a champion also
``gate_diff_map50_95`` (+ ``_lo``/``_hi``), ``gate_diff_map50``, ``gate_diff_ap50_95_<class>``
and the champion's own figures on this test split, ``compared_test_*``.

``segment`` projects gate on instance masks (`loop.tracking.gate.GATE_METRIC`): the matches are
made by mask IoU (``matches="mask"``), the keys carry ``_mask`` (``test_mask_map50_lo``,
``gate_diff_mask_map50_95``, ``compared_test_mask_*``) and `QualityRecord`'s figures are mask
figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.config import ProjectConfig
from loop.detections import Detections
from loop.errors import DefectLoopError
from loop.evaluation import (
    BootstrapSettings,
    GateDecision,
    Interval,
    MetricIntervals,
    bootstrap,
    hidden_classes,
    paired_bootstrap,
    paired_gate,
    split_health,
)
from loop.images import atomic_write_text

if TYPE_CHECKING:
    from loop.datasets import DatasetVersion
    from loop.project import FitResult, Project
    from loop.tracking import Promotion, Tracker


def bootstrap_settings(cfg: ProjectConfig) -> BootstrapSettings:
    e = cfg.evaluation
    return BootstrapSettings(resamples=e.resamples, confidence=e.confidence, seed=e.seed)


def _triple(iv: Interval) -> list[float]:
    return [iv.value, iv.lo, iv.hi]


@dataclass(frozen=True)
class QualityRecord:
    """``<workspace>/evaluation.json``: the champion after the last gate, on the test split of
    the dataset version that round trained on.

    Metrics are ``[value, lo, hi]`` (None without test images); ``per_class_ap50`` holds the
    classes with test boxes. ``gate``: ``{"verdict", "difference": [v, lo, hi], "reason"}`` of
    the paired comparison (None for a first model or without test images). ``hidden_classes``:
    classes whose pre-annotations were below ``preannotation_min_ap50`` when it was written.
    """

    round: int
    model_version: str
    candidate_version: str
    promoted: bool
    n_test_images: int
    test_split_digest: str
    map50: list[float] | None = None
    map50_95: list[float] | None = None
    precision: list[float] | None = None
    recall: list[float] | None = None
    per_class_ap50: dict[str, list[float]] = field(default_factory=dict)
    test_boxes: dict[str, int] = field(default_factory=dict)
    confidence: float = 0.95
    resamples: int = 0
    seed: int = 0
    preannotation_min_ap50: float = 0.0
    hidden_classes: list[str] = field(default_factory=list)
    gate: dict[str, Any] | None = None

    @property
    def map50_halfwidth(self) -> float | None:
        if self.map50 is None or any(math.isnan(v) for v in self.map50[1:]):
            return None
        return (self.map50[2] - self.map50[1]) / 2

    def hidden_for(self, bar: float) -> list[str]:
        """Classes whose test AP50 is below ``bar`` (those with test boxes only)."""
        ap = {c: v[0] for c, v in self.per_class_ap50.items()}
        return hidden_classes(ap, self.test_boxes, bar)


def read_quality(cfg: ProjectConfig) -> QualityRecord | None:
    """The record `gate_and_record` wrote last; None before the first gate. A file that is not
    a record raises `DefectLoopError` (it is only ever written atomically by the loop)."""
    path = cfg.paths.evaluation
    if not path.is_file():
        return None
    try:
        return QualityRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DefectLoopError(
            f"{path} is not a defect-loop evaluation record ({exc}); delete it and run "
            "`defect-loop train` to write it again"
        ) from exc


def write_quality(cfg: ProjectConfig, rec: QualityRecord) -> Path:
    path = cfg.paths.evaluation
    atomic_write_text(path, json.dumps(asdict(rec), indent=1))
    return path


def _test_boxes(version: DatasetVersion) -> dict[str, int]:
    counts = dict.fromkeys(version.classes, 0)
    for r in version.rows:
        if r.split == "test":
            for c in r.boxes.class_id.tolist():
                counts[version.classes[int(c)]] += 1
    return counts


def _record(
    fit: FitResult,
    cfg: ProjectConfig,
    candidate_version: str,
    champion_version: str,
    promoted: bool,
    iv: MetricIntervals | None,
    gate: GateDecision | None,
) -> QualityRecord:
    version = fit.version
    bar = cfg.advice.preannotation_min_ap50
    s = bootstrap_settings(cfg)
    rec = QualityRecord(
        round=fit.round_index,
        model_version=champion_version,
        candidate_version=candidate_version,
        promoted=promoted,
        n_test_images=version.split_counts()["test"],
        test_split_digest=version.split_digest("test"),
        map50=None if iv is None else _triple(iv.map50),
        map50_95=None if iv is None else _triple(iv.map50_95),
        precision=None if iv is None else _triple(iv.precision),
        recall=None if iv is None else _triple(iv.recall),
        per_class_ap50={} if iv is None else {c: _triple(v) for c, v in iv.per_class_ap50.items()},
        test_boxes=_test_boxes(version),
        confidence=s.confidence,
        resamples=s.resamples,
        seed=s.seed,
        preannotation_min_ap50=bar,
        gate=None
        if gate is None
        else {
            "verdict": gate.verdict,
            "difference": _triple(gate.difference),
            "reason": gate.reason,
        },
    )
    return QualityRecord(**{**asdict(rec), "hidden_classes": rec.hidden_for(bar)})


def gate_and_record(
    project: Project, tracker: Tracker, fit: FitResult, run_id: str, model_version: str
) -> Promotion:
    """Run the promotion gate for the logged run ``run_id`` (registered as ``model_version``)
    and record the result (see the module docstring). Without test images the point-estimate
    gate of `Tracker.promote_if_better` decides (it refuses a candidate without test metrics
    once a champion exists)."""
    from loop import model
    from loop.tracking import Promotion
    from loop.tracking.gate import GATE_METRIC

    cfg = project.cfg
    classes = list(cfg.classes)
    settings = bootstrap_settings(cfg)
    # Segment projects gate on instance masks: predictions matched to labels by mask IoU.
    on = GATE_METRIC[cfg.task]
    mask = "mask " if on == "mask" else ""
    sfx = "_mask" if on == "mask" else ""
    if fit.test is None:
        decision = tracker.promote_if_better(model_version, run_id)
        if decision.promoted:
            write_quality(cfg, _record(fit, cfg, model_version, model_version, True, None, None))
        return decision
    data_yaml = project.export(fit.version)
    imgsz, ycd, threads = cfg.train.imgsz, cfg.paths.yolo_config, cfg.train.threads
    # The same pass Project.fit ran (loop.model keeps the last few evaluations).
    _, cand = model.evaluate_matches(
        fit.result.weights, data_yaml, "test", imgsz, ycd, classes, threads=threads, matches=on
    )
    champ = tracker.champion()
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    gate: GateDecision | None = None
    if champ is None:
        iv = bootstrap(cand, classes, settings)
        decision = Promotion(
            True,
            f"first model: no champion yet (test {mask}mAP50 {iv.map50.text()}, "
            f"{100 * settings.confidence:g}% bootstrap over {cand.n_images} test images)",
        )
        after = iv
    elif (names := model.model_class_names(champ.weights, ycd, threads)) != classes:
        iv = bootstrap(cand, classes, settings)
        decision = Promotion(
            True,
            f"champion v{champ.version} predicts the classes {names}, not the project's "
            f"{classes}: it cannot be evaluated on this test split, so the candidate, which "
            "knows the current classes, is promoted",
        )
        after = iv
    else:
        _, old = model.evaluate_matches(
            champ.weights, data_yaml, "test", imgsz, ycd, classes, threads=threads, matches=on
        )
        comp = paired_bootstrap(cand, old, classes, settings)
        gate = paired_gate(
            comp, cfg.promotion.tolerance, cfg.promotion.max_class_drop, champ.version, on=on
        )
        decision = Promotion(
            gate.promoted,
            gate.reason,
            {c: round(d.value, 6) for c, d in gate.class_drops.items()},
        )
        iv = comp.candidate
        after = comp.candidate if gate.promoted else comp.champion
        metrics.update(comp.metrics(f"gate_diff{sfx}"))
        metrics.update(comp.champion.metrics(f"compared_test{sfx}"))
        tags["gate_verdict"] = gate.verdict
        tags["gate_difference"] = gate.difference.text(4, signed=True)
    # The point values are logged already (Ultralytics' own, identical): add the bounds.
    metrics.update(
        {k: v for k, v in iv.metrics(f"test{sfx}").items() if k.endswith(("_lo", "_hi"))}
    )
    tracker.log_metrics(run_id, metrics)
    champion_version = model_version if decision.promoted else str(champ.version if champ else "")
    rec = _record(fit, cfg, model_version, champion_version, decision.promoted, after, gate)
    warnings = split_health(
        rec.n_test_images,
        rec.test_boxes,
        iv.map50.halfwidth,
        cfg.evaluation.max_halfwidth,
        cfg.evaluation.min_test_boxes,
    )
    tags["bootstrap"] = (
        f"{settings.resamples} resamples, {100 * settings.confidence:g}%, seed {settings.seed}, "
        f"{cand.n_images} test images"
    )
    tags["preannotation_hidden"] = json.dumps(rec.hidden_classes)
    tags["test_split_warnings"] = json.dumps(warnings)
    tracker.apply_promotion(
        model_version, run_id, decision, "" if champ is None else str(champ.version), tags
    )
    write_quality(cfg, rec)
    return decision


def preannotation_filter(
    cfg: ProjectConfig, model_version: str
) -> tuple[list[str], Callable[[Detections], Detections]]:
    """Which classes' suggested boxes labelers should not see for ``model_version`` (a name
    ending in ``-v<version>`` or the bare version), and a function that removes them.

    The champion's test AP50 per class comes from the last `QualityRecord`; a class below
    ``advice.preannotation_min_ap50`` is hidden. Nothing is hidden for another model, before
    the first gate, or for classes without test boxes (their usefulness is unknown).
    """
    rec = read_quality(cfg)
    if rec is None or not (
        model_version == rec.model_version or model_version.endswith(f"-v{rec.model_version}")
    ):
        return [], _identity
    hidden = rec.hidden_for(cfg.advice.preannotation_min_ap50)
    ids = np.asarray([cfg.classes.index(c) for c in hidden if c in cfg.classes], dtype=np.int64)
    if not ids.size:
        return [], _identity

    def keep(det: Detections) -> Detections:
        mask = ~np.isin(det.class_id, ids)
        return det if bool(mask.all()) else det[mask]

    return hidden, keep


def _identity(det: Detections) -> Detections:
    return det


def split_status(cfg: ProjectConfig, version: DatasetVersion | None) -> dict[str, Any]:
    """The test split for `defect-loop status`: images, boxes per class, the champion's test
    mAP50 interval (when it was measured on this very split) and the warnings of
    `loop.evaluation.split_health`."""
    n = 0 if version is None else version.split_counts()["test"]
    boxes = {} if version is None else _test_boxes(version)
    rec = read_quality(cfg)
    same = (
        rec is not None
        and version is not None
        and rec.test_split_digest == version.split_digest("test")
    )
    halfwidth = rec.map50_halfwidth if same and rec is not None else None
    out: dict[str, Any] = {
        "images": n,
        "boxes_per_class": boxes,
        "champion": None if rec is None else rec.model_version,
        "champion_map50": rec.map50 if same and rec is not None else None,
        "map50_halfwidth": halfwidth,
        "confidence": cfg.evaluation.confidence,
        "preannotations_hidden": (
            rec.hidden_for(cfg.advice.preannotation_min_ap50) if rec is not None else []
        ),
        "warnings": [],
    }
    if version is None:
        return out
    warnings = split_health(
        n, boxes, halfwidth, cfg.evaluation.max_halfwidth, cfg.evaluation.min_test_boxes
    )
    if rec is not None and not same and n:
        warnings.append(
            "the test split changed since the champion was last evaluated: its interval is "
            "measured again at the next training (`defect-loop train`)"
        )
    out["warnings"] = warnings
    return out
