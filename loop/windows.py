"""One window of production images against the bundle's reference: the ten drift and novelty
tests, the alert (`evaluate_window`), and the images to queue for labeling (`select_for_queue`).
Pure: features in, a `WindowResult` out (see `loop.monitor` for the tests and the threshold).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from loop.config import MonitorConfig
from loop.drift import (
    IMAGE_STATS,
    FeatureSet,
    TestResult,
    bonferroni,
    category_test,
    exceedance_test,
    exceedance_threshold,
    ks_test,
    mmd_test,
    pca_project,
    proportion_test,
)
from loop.errors import ConfigError, DeployError
from loop.tracking import metric_name

if TYPE_CHECKING:
    from loop.bundle import Reference

TESTS: tuple[str, ...] = (
    "embedding_mmd",
    *(f"{s}_ks" for s in IMAGE_STATS),
    "confidence_ks",
    "uncertainty_ks",
    "class_mix",
    "no_defect_rate",
    "novelty",
)


# ============================================================================ the window test


@dataclass(frozen=True)
class QueueCandidate:
    """An image of a window worth labeling first: ``row`` in the window, ``novelty`` and
    ``uncertainty`` relative to the reference's thresholds (> 1: beyond), ``priority`` the
    larger, ``reason`` which one."""

    row: int
    sha256: str
    priority: float
    novelty: float
    uncertainty: float
    reason: str


@dataclass(frozen=True)
class WindowResult:
    """One checked window. ``tests``: every test's result; ``fired``: the tests below
    ``threshold`` (= ``alpha`` / number of tests); ``metrics``: what MLflow gets; ``message``:
    the alert text ("" without alert); ``candidates``: the images selected for the queue."""

    index: int
    bundle_version: str
    n_images: int
    created_at: str
    alpha: float
    threshold: float
    tests: list[TestResult]
    fired: list[str]
    metrics: dict[str, float]
    message: str
    sha256: list[str] = field(default_factory=list)
    candidates: list[QueueCandidate] = field(default_factory=list)

    @property
    def alert(self) -> bool:
        return bool(self.fired)

    def p_values(self) -> dict[str, float]:
        return {t.name: t.p_value for t in self.tests}

    def to_json(self) -> str:
        doc = {
            **{k: v for k, v in self.__dict__.items() if k not in ("tests", "candidates")},
            "tests": [t.to_dict() for t in self.tests],
            "candidates": [c.__dict__ for c in self.candidates],
        }
        return json.dumps(doc)

    @staticmethod
    def from_json(text: str) -> WindowResult:
        doc = json.loads(text)
        doc["tests"] = [TestResult(**t) for t in doc["tests"]]
        doc["candidates"] = [QueueCandidate(**c) for c in doc["candidates"]]
        return WindowResult(**doc)


def select_for_queue(
    window: FeatureSet,
    nn_distance: npt.NDArray[np.float64],
    reference: Reference,
    cfg: MonitorConfig,
    eligible: npt.NDArray[np.bool_] | None = None,
) -> list[QueueCandidate]:
    """The at most ``queue_per_window`` images of ``window`` most beyond the reference: an
    image's novelty is its nearest-neighbour distance over the reference's ``queue_quantile``
    of that distance, its uncertainty its highest box entropy over the same quantile of the
    reference's; priority = the larger; only priority > 1 and ``eligible`` rows, highest first
    (ties by sha256)."""
    if cfg.queue_per_window == 0 or len(window) == 0:
        return []
    t_nov, _ = exceedance_threshold(reference.nn_distance, cfg.queue_quantile)
    t_unc, _ = exceedance_threshold(reference.features.uncertainty, cfg.queue_quantile)
    novelty = nn_distance / max(t_nov, 1e-12)
    uncertainty = window.uncertainty / max(t_unc, 1e-12)
    priority = np.maximum(novelty, uncertainty)
    ok = priority > 1.0
    if eligible is not None:
        ok &= np.asarray(eligible, dtype=bool)
    rows = [int(i) for i in np.flatnonzero(ok)]
    rows.sort(key=lambda i: (-float(priority[i]), window.sha256[i]))
    return [
        QueueCandidate(
            i,
            window.sha256[i],
            round(float(priority[i]), 6),
            round(float(novelty[i]), 6),
            round(float(uncertainty[i]), 6),
            "novel" if novelty[i] >= uncertainty[i] else "uncertain",
        )
        for i in rows[: cfg.queue_per_window]
    ]


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def _describe(t: TestResult, classes: Sequence[str], window: FeatureSet, ref: FeatureSet) -> str:
    p = f"p {t.p_value:.2g}"
    if t.name == "embedding_mmd":
        return f"backbone embeddings shifted (MMD² {t.statistic:.3g}, {p})"
    if t.name.endswith("_ks"):
        what = t.name[:-3]
        return f"{what} {t.window:.4g} vs reference {t.reference:.4g} (KS {t.statistic:.2f}, {p})"
    if t.name == "class_mix":
        names = ["no defect", *classes]
        sw = np.bincount(window.top_class + 1, minlength=len(names)) / len(window)
        sr = np.bincount(ref.top_class + 1, minlength=len(names)) / len(ref)
        k = int(np.argmax(np.abs(sw - sr)))
        return f"predicted class mix changed: {names[k]} {_pct(sw[k])} vs {_pct(sr[k])} ({p})"
    if t.name == "no_defect_rate":
        return f"no-defect rate {_pct(t.window)} vs reference {_pct(t.reference)} ({p})"
    if t.name == "novelty":
        return (
            f"{_pct(t.window)} of images far from every training image vs "
            f"{_pct(t.reference)} of the reference ({p})"
        )
    return f"{t.name} ({p})"


def check_power(cfg: MonitorConfig) -> None:
    """Raise `ConfigError` when a permutation test could never alert: its smallest p-value,
    ``1 / (permutations + 1)``, must lie below the per-test threshold ``alpha / len(TESTS)``."""
    need = math.ceil(len(TESTS) / cfg.alpha)
    if cfg.permutations + 1 <= need:
        raise ConfigError(
            f"monitor.permutations={cfg.permutations} is too few for alpha={cfg.alpha}: the "
            f"permutation tests' smallest p-value 1/{cfg.permutations + 1} never falls below "
            f"{cfg.alpha:g}/{len(TESTS)}; set monitor.permutations to at least {need}"
        )


def evaluate_window(
    reference: Reference,
    window: FeatureSet,
    cfg: MonitorConfig,
    index: int,
    classes: Sequence[str],
    bundle_version: str = "",
    eligible: npt.NDArray[np.bool_] | None = None,
) -> WindowResult:
    """Test ``window`` against ``reference`` (see the module docstring). Deterministic: the
    permutation tests draw from ``np.random.default_rng([cfg.seed, index])``."""
    ref = reference.features
    if len(window) < 2:
        raise DeployError(f"a window needs at least 2 images, got {len(window)}")
    if window.n_classes != len(classes) or ref.n_classes != len(classes):
        raise DeployError(
            f"the window has {window.n_classes} classes and the reference {ref.n_classes}, the "
            f"bundle {len(classes)}; score both with the same bundle"
        )
    check_power(cfg)
    rng = np.random.default_rng([cfg.seed, index])
    n = len(window)
    pooled = pca_project(
        reference.embed_space(np.vstack([window.embedding, ref.embedding])), cfg.pca_dims
    )
    tests = [mmd_test(pooled[:n], pooled[n:], rng, cfg.permutations, name="embedding_mmd")]
    for j, s in enumerate(IMAGE_STATS):
        tests.append(ks_test(window.stats[:, j], ref.stats[:, j], name=f"{s}_ks"))
    tests.append(ks_test(window.max_conf, ref.max_conf, name="confidence_ks"))
    tests.append(ks_test(window.uncertainty, ref.uncertainty, name="uncertainty_ks"))
    nc = len(classes)
    tests.append(
        category_test(
            window.top_class + 1, ref.top_class + 1, nc + 1, rng, cfg.permutations, "class_mix"
        )
    )
    tests.append(
        proportion_test(
            int(np.sum(window.top_class < 0)),
            n,
            int(np.sum(ref.top_class < 0)),
            len(ref),
            "no_defect_rate",
        )
    )
    nn = reference.novelty_distance(window.embedding)
    tests.append(exceedance_test(nn, reference.nn_distance, cfg.novelty_quantile, "novelty"))
    decision = bonferroni(tests, cfg.alpha)
    metrics: dict[str, float] = {
        "n_images": float(n),
        "alert": float(decision.alert),
        "min_p": min(t.p_value for t in tests),
        "embedding_mmd2": tests[0].statistic,
        "novelty_rate": tests[-1].statistic,
        "no_defect_rate": float(np.mean(window.top_class < 0)),
        "confidence_mean": float(window.max_conf.mean()),
        "uncertainty_mean": float(window.uncertainty.mean()),
    }
    for j, s in enumerate(IMAGE_STATS):
        metrics[f"{s}_mean"] = float(window.stats[:, j].mean())
    for c, share in zip(
        classes, np.bincount(window.top_class + 1, minlength=nc + 1)[1:] / n, strict=True
    ):
        metrics[f"class_share_{metric_name(c)}"] = float(share)
    metrics.update({f"p_{t.name}": t.p_value for t in tests})
    message = ""
    if decision.alert:
        parts = [_describe(t, classes, window, ref) for t in tests if t.name in decision.fired]
        message = (
            f"drift alert, window {index} ({n} images, bundle v{bundle_version or '?'}): "
            + "; ".join(parts)
            + f" [threshold p < {decision.threshold:.2g}]"
        )
    return WindowResult(
        index=index,
        bundle_version=bundle_version,
        n_images=n,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        alpha=cfg.alpha,
        threshold=decision.threshold,
        tests=tests,
        fired=list(decision.fired),
        metrics=metrics,
        message=message,
        sha256=list(window.sha256),
        candidates=select_for_queue(window, nn, reference, cfg, eligible),
    )
