"""How sure a test metric is: a bootstrap over test images, the paired promotion gate, the test
split's health and the "useless model" checks. Pure numpy; no I/O, no Ultralytics.

Input: the per-image match statistics of ONE evaluation pass (`loop.matches.ImageMatches`), whose
metrics `loop.matches.box_metrics` computes exactly as Ultralytics does. A bootstrap replicate
resamples test IMAGES with replacement (an image drawn k times contributes its boxes k times) and
recomputes the metrics; no model runs again. Intervals are percentile intervals of the
replicates. A class without true boxes in a replicate has no AP there (NaN): its interval comes
from the replicates that have it, and the replicate's mAP averages the classes it has, as
Ultralytics would on that image set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loop.errors import EvaluationError
from loop.matches import BoxMetrics, FloatArray, ImageMatches, IntArray, box_metrics

# ====================================================================== bootstrap


def resample_counts(n_images: int, resamples: int, seed: int) -> IntArray:
    """``(resamples, n_images)``: how often each image is drawn in each replicate (``n_images``
    draws with replacement; ``np.random.default_rng(seed).integers``)."""
    if n_images < 1 or resamples < 1:
        raise EvaluationError(f"need >= 1 image and >= 1 resample, got {n_images}, {resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(resamples, n_images))
    flat = (np.arange(resamples)[:, None] * n_images + idx).ravel()
    return np.bincount(flat, minlength=resamples * n_images).reshape(resamples, n_images)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval ``[lo, hi]`` (NaN: unknown)."""

    value: float
    lo: float
    hi: float

    @property
    def halfwidth(self) -> float:
        return (self.hi - self.lo) / 2

    def text(self, digits: int = 3, signed: bool = False) -> str:
        """``0.612 [0.571, 0.650]`` (``+`` signs with ``signed``)."""
        f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
        if math.isnan(self.lo) or math.isnan(self.hi):
            return f.format(self.value)
        return f"{f.format(self.value)} [{f.format(self.lo)}, {f.format(self.hi)}]"


@dataclass(frozen=True)
class BootstrapSettings:
    """``resamples`` replicates drawn with ``seed``; intervals at ``confidence`` (two-sided)."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise EvaluationError(f"resamples must be >= 1, got {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise EvaluationError(f"confidence must lie in (0, 1), got {self.confidence}")

    @property
    def percentiles(self) -> tuple[float, float]:
        a = (1 - self.confidence) / 2
        return 100 * a, 100 * (1 - a)


@dataclass(frozen=True, eq=False)
class Replicates:
    """Metrics of every replicate: ``overall`` ``(B, 4)`` (mAP50, mAP50-95, precision,
    recall), ``ap50``/``ap50_95`` ``(B, num_classes)`` (NaN where a class is absent)."""

    overall: FloatArray
    ap50: FloatArray
    ap50_95: FloatArray


def replicates(m: ImageMatches, counts: IntArray) -> Replicates:
    """`box_metrics` of ``m`` for each row of ``counts`` (see `resample_counts`)."""
    b = counts.shape[0]
    overall = np.empty((b, 4))
    ap50 = np.empty((b, m.num_classes))
    ap95 = np.empty((b, m.num_classes))
    for k in range(b):
        r = box_metrics(m, counts[k])
        overall[k] = (r.map50, r.map50_95, r.precision, r.recall)
        ap50[k] = r.ap50
        ap95[k] = r.ap50_95
    return Replicates(overall, ap50, ap95)


def _pct(x: FloatArray, q: tuple[float, float]) -> FloatArray:
    """``(2, ...)`` percentiles of ``x`` along axis 0, ignoring NaN (all-NaN -> NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN is the answer
        out: FloatArray = np.nanpercentile(x, list(q), axis=0)
    return out


_OVERALL = ("map50", "map50_95", "precision", "recall")


@dataclass(frozen=True)
class MetricIntervals:
    """Point metrics of a test split with bootstrap intervals.

    ``per_class_ap50``/``per_class_ap50_95``: class name -> `Interval` for the classes with
    true boxes in the split. ``n_targets``: true boxes per class name (every class).
    """

    map50: Interval
    map50_95: Interval
    precision: Interval
    recall: Interval
    per_class_ap50: Mapping[str, Interval]
    per_class_ap50_95: Mapping[str, Interval]
    n_targets: Mapping[str, int]
    n_images: int
    settings: BootstrapSettings

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat MLflow metrics: ``<prefix>_map50`` plus ``_lo``/``_hi``, the same for
        ``map50_95``, ``precision``, ``recall``, and ``<prefix>_ap50_<class>`` ... per class
        (class names made MLflow-safe). Unknown bounds are left out."""
        out: dict[str, float] = {}

        def put(key: str, iv: Interval) -> None:
            out[key] = iv.value
            if not math.isnan(iv.lo):
                out[f"{key}_lo"] = iv.lo
                out[f"{key}_hi"] = iv.hi

        for name in _OVERALL:
            put(f"{prefix}_{name}", getattr(self, name))
        for kind, table in (("ap50", self.per_class_ap50), ("ap50_95", self.per_class_ap50_95)):
            for c, iv in table.items():
                put(f"{prefix}_{kind}_{metric_key(c)}", iv)
        return out


def metric_key(text: str) -> str:
    """``text`` with every character MLflow refuses in a metric key replaced by ``_`` (the
    same rule as ``loop.tracking.metric_name``)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _intervals(
    point: BoxMetrics,
    reps: Replicates,
    classes: Sequence[str],
    n_images: int,
    settings: BootstrapSettings,
) -> MetricIntervals:
    q = settings.percentiles
    lo_hi = _pct(reps.overall, q)
    a50 = _pct(reps.ap50, q)
    a95 = _pct(reps.ap50_95, q)
    values = (point.map50, point.map50_95, point.precision, point.recall)
    overall = {
        name: Interval(float(v), float(lo_hi[0, j]), float(lo_hi[1, j]))
        for j, (name, v) in enumerate(zip(_OVERALL, values, strict=True))
    }
    per50: dict[str, Interval] = {}
    per95: dict[str, Interval] = {}
    for c, name in enumerate(classes):
        if point.n_targets[c] <= 0:
            continue
        per50[name] = Interval(float(point.ap50[c]), float(a50[0, c]), float(a50[1, c]))
        per95[name] = Interval(float(point.ap50_95[c]), float(a95[0, c]), float(a95[1, c]))
    return MetricIntervals(
        overall["map50"],
        overall["map50_95"],
        overall["precision"],
        overall["recall"],
        per50,
        per95,
        {name: int(point.n_targets[c]) for c, name in enumerate(classes)},
        n_images,
        settings,
    )


def _check_classes(m: ImageMatches, classes: Sequence[str]) -> None:
    if len(classes) != m.num_classes:
        raise EvaluationError(
            f"{len(classes)} class names for match statistics of {m.num_classes} classes"
        )


def bootstrap(
    m: ImageMatches, classes: Sequence[str], settings: BootstrapSettings | None = None
) -> MetricIntervals:
    """Point metrics of ``m`` and their percentile intervals over ``settings.resamples``
    resamples of its test images (seeded: the same input gives the same intervals)."""
    settings = settings or BootstrapSettings()
    _check_classes(m, classes)
    counts = resample_counts(m.n_images, settings.resamples, settings.seed)
    return _intervals(box_metrics(m), replicates(m, counts), classes, m.n_images, settings)


# ====================================================================== paired comparison


@dataclass(frozen=True)
class PairedComparison:
    """Candidate and champion evaluated on the same test images, resampled together.

    ``difference_*``: candidate minus champion, with the interval of that difference over the
    SAME replicates (pairing removes what the two share: which images are easy or hard).
    ``per_class_difference_ap50_95``: for classes with true boxes.
    """

    candidate: MetricIntervals
    champion: MetricIntervals
    difference_map50: Interval
    difference_map50_95: Interval
    per_class_difference_ap50_95: Mapping[str, Interval]
    n_images: int
    settings: BootstrapSettings

    def swapped(self) -> PairedComparison:
        """The same comparison with the roles exchanged (champion minus candidate): the
        replicates are shared, so every difference interval is mirrored."""

        def neg(iv: Interval) -> Interval:
            return Interval(-iv.value, -iv.hi, -iv.lo)

        return PairedComparison(
            candidate=self.champion,
            champion=self.candidate,
            difference_map50=neg(self.difference_map50),
            difference_map50_95=neg(self.difference_map50_95),
            per_class_difference_ap50_95={
                c: neg(iv) for c, iv in self.per_class_difference_ap50_95.items()
            },
            n_images=self.n_images,
            settings=self.settings,
        )

    def metrics(self, prefix: str = "gate_diff") -> dict[str, float]:
        """``<prefix>_map50_95`` (+ ``_lo``/``_hi``), ``<prefix>_map50``, and
        ``<prefix>_ap50_95_<class>`` per class, for MLflow."""
        out: dict[str, float] = {}
        items: list[tuple[str, Interval]] = [
            ("map50_95", self.difference_map50_95),
            ("map50", self.difference_map50),
        ]
        items += [
            (f"ap50_95_{metric_key(c)}", iv) for c, iv in self.per_class_difference_ap50_95.items()
        ]
        for key, iv in items:
            out[f"{prefix}_{key}"] = iv.value
            if not math.isnan(iv.lo):
                out[f"{prefix}_{key}_lo"] = iv.lo
                out[f"{prefix}_{key}_hi"] = iv.hi
        return out


def paired_bootstrap(
    candidate: ImageMatches,
    champion: ImageMatches,
    classes: Sequence[str],
    settings: BootstrapSettings | None = None,
) -> PairedComparison:
    """Resample the test images once per replicate and score both models on that resample.

    Both must hold the same images (any order: the champion's are aligned to the candidate's
    keys); `EvaluationError` otherwise.
    """
    settings = settings or BootstrapSettings()
    _check_classes(candidate, classes)
    _check_classes(champion, classes)
    if set(candidate.keys) != set(champion.keys):
        raise EvaluationError(
            f"candidate and champion were evaluated on different test images "
            f"({candidate.n_images} vs {champion.n_images}); evaluate both on the same split"
        )
    champ = champion if champion.keys == candidate.keys else champion.select(candidate.keys)
    counts = resample_counts(candidate.n_images, settings.resamples, settings.seed)
    p_new, p_old = box_metrics(candidate), box_metrics(champ)
    r_new, r_old = replicates(candidate, counts), replicates(champ, counts)
    n = candidate.n_images
    new_iv = _intervals(p_new, r_new, classes, n, settings)
    old_iv = _intervals(p_old, r_old, classes, n, settings)
    q = settings.percentiles
    d_overall = _pct(r_new.overall - r_old.overall, q)
    d_cls = _pct(r_new.ap50_95 - r_old.ap50_95, q)
    per_class: dict[str, Interval] = {}
    for c, name in enumerate(classes):
        if p_new.n_targets[c] <= 0:
            continue
        per_class[name] = Interval(
            float(p_new.ap50_95[c] - p_old.ap50_95[c]), float(d_cls[0, c]), float(d_cls[1, c])
        )
    return PairedComparison(
        candidate=new_iv,
        champion=old_iv,
        difference_map50=Interval(
            p_new.map50 - p_old.map50, float(d_overall[0, 0]), float(d_overall[1, 0])
        ),
        difference_map50_95=Interval(
            p_new.map50_95 - p_old.map50_95, float(d_overall[0, 1]), float(d_overall[1, 1])
        ),
        per_class_difference_ap50_95=per_class,
        n_images=n,
        settings=settings,
    )


Verdict = Literal["improvement", "noise", "worse"]


@dataclass(frozen=True)
class GateDecision:
    """The paired gate's decision.

    ``verdict``: ``improvement`` (the whole interval of the mAP50-95 difference is above 0),
    ``worse`` (below 0) or ``noise`` (it contains 0). ``class_drops``: class -> its AP50-95 drop
    (champion minus candidate) with the interval of the drop, for the classes whose drop is
    significant (interval above 0) and larger than ``max_class_drop``: they block promotion.
    """

    promoted: bool
    verdict: Verdict
    difference: Interval
    class_drops: Mapping[str, Interval]
    reason: str


def paired_gate(
    comparison: PairedComparison,
    tolerance: float,
    max_class_drop: float,
    champion_version: str = "?",
    on: str = "box",
) -> GateDecision:
    """Promote when the lower bound of the mAP50-95 difference (candidate - champion) is at
    least ``-tolerance`` and no class's AP50-95 drop is both significant and larger than
    ``max_class_drop``. With ``tolerance`` 0 a candidate must be measurably better: a
    difference within noise keeps the champion. ``on``: what the matches were made on
    (``box`` or ``mask`` IoU, `loop.model.evaluate_matches`), named in the reason.
    """
    what = "" if on == "box" else "mask "
    d = comparison.difference_map50_95
    s = comparison.settings
    verdict: Verdict = "improvement" if d.lo > 0 else "worse" if d.hi < 0 else "noise"
    drops: dict[str, Interval] = {}
    for c, iv in comparison.per_class_difference_ap50_95.items():
        if math.isnan(iv.hi):
            continue
        if iv.hi < 0 and -iv.value > max_class_drop + 1e-12:
            drops[c] = Interval(-iv.value, -iv.hi, -iv.lo)
    clears = d.lo >= -tolerance - 1e-12
    promoted = clears and not drops
    how = (
        f"{100 * s.confidence:g}% paired bootstrap, {s.resamples} resamples of "
        f"{comparison.n_images} test images"
    )
    head = f"test {what}mAP50-95 {d.text(4, signed=True)} vs champion v{champion_version} ({how})"
    words = {
        "improvement": "an improvement",
        "noise": "within noise",
        "worse": "significantly worse",
    }
    parts = [f"{head}: {words[verdict]}"]
    if clears:
        if verdict != "improvement":
            parts.append(f"the lower bound {d.lo:+.4f} clears -tolerance {tolerance:g}")
    else:
        parts.append(f"the lower bound {d.lo:+.4f} does not clear -tolerance {tolerance:g}")
    for c, iv in sorted(drops.items(), key=lambda kv: -kv[1].value):
        parts.append(
            f"class {c!r} {what}AP50-95 fell by {iv.text(4)}, significantly and by more than "
            f"max_class_drop {max_class_drop:g}"
        )
    return GateDecision(promoted, verdict, d, drops, "; ".join(parts))


# ====================================================================== advice helpers


def split_health(
    n_images: int,
    test_boxes: Mapping[str, int],
    map50_halfwidth: float | None,
    max_halfwidth: float,
    min_test_boxes: int,
) -> list[str]:
    """Warnings about the test split: too wide an mAP50 interval, too few boxes of a class.

    ``map50_halfwidth``: half the width of the test mAP50 interval of the current model (None
    before the first evaluation): differences smaller than this cannot be resolved.
    """
    out: list[str] = []
    if n_images == 0:
        out.append(
            "the test split is empty: no model can be evaluated; add labeled test images "
            "(defect-loop datasets add-test DIR --labels LABELS)"
        )
        return out
    if map50_halfwidth is not None and map50_halfwidth > max_halfwidth:
        out.append(
            f"the test split ({n_images} images) resolves only mAP50 differences larger than "
            f"±{map50_halfwidth:.3f} (half-width of the interval; evaluation.max_halfwidth is "
            f"{max_halfwidth:g}): grow it with defect-loop datasets add-test"
        )
    for c, n in test_boxes.items():
        if n < min_test_boxes:
            out.append(
                f"class {c!r} has {n} test boxes (fewer than evaluation.min_test_boxes "
                f"{min_test_boxes}): its AP cannot be trusted; add labeled {c!r} images to the "
                "test split"
            )
    return out


def all_background(confusion: Sequence[Sequence[int]] | None) -> bool:
    """True when a ``(nc + 1) x (nc + 1)`` confusion matrix (rows predicted, last = background)
    has true boxes and none of them, nor anything else, was predicted as any class."""
    if not confusion:
        return False
    m = np.asarray(confusion, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        return False
    nc = m.shape[0] - 1
    return bool(m[:, :nc].sum() > 0 and m[:nc, :].sum() == 0)


def hidden_classes(
    ap50: Mapping[str, float | None], n_targets: Mapping[str, int], bar: float
) -> list[str]:
    """Classes whose pre-annotations are not worth showing: they have true boxes in the test
    split and the model's test AP50 for them is below ``bar``. (Classes without test boxes are
    unknown, not hidden.) ``bar`` 0 hides nothing."""
    out = []
    for c, n in n_targets.items():
        v = ap50.get(c)
        if n > 0 and v is not None and not math.isnan(v) and v < bar:
            out.append(c)
    return out
