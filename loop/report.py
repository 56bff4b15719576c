"""The model-improvement report for leads: one self-contained HTML page and a Markdown summary.

`collect_report_data` reads one round from the project (MLflow training runs, dataset versions
and three optional JSON files) into a `ReportData`; `render_html` and `render_markdown` turn a
`ReportData` into text and touch nothing but the thumbnail image files it names; `write_report`
does both, writes the files and logs them to the round's MLflow training run under ``report/``.

The page needs no network: CSS is inline, plots (matplotlib's Agg canvas) and thumbnails (PIL) are
``data:`` PNGs, there is no JavaScript, and a Content-Security-Policy forbids loading anything
else. Every user-supplied string (class, file and annotator names, promotion reasons) is escaped.

Optional inputs; a section whose input is absent says "no data yet" instead of failing:

- ``<workspace>/datasets/<digest>/corrections.json``: correction analytics of the labels pulled
  into that dataset version (``loop.corrections``)::

      {"per_class": {cls: {"accepted": n, "adjusted": n, "relabeled": n, "removed": n,
                           "added": n}},
       "lead_times": [seconds, ...], "tasks": n,
       "images": [{"sha256": ..., "disagreement": float,
                   "predicted": [[x1, y1, x2, y2, cls, score], ...],
                   "final": [[x1, y1, x2, y2, cls], ...]}]}

  (``cls``: class name or class id; pixels). A round merges the files of every version between
  the previous round's training dataset (exclusive) and its own (inclusive).
- ``<workspace>/simulation.json``: the oracle replay's random-selection baseline, a list of
  ``{"labeled": n, "test_map50": x}`` (or ``{"random": [...]}``).
- ``<workspace>/next_batch.json``: the batch pushed after the last scoring, written by
  `write_next_batch`: ``{"strategy", "size", "class_mix": {cls: n}, ...}``.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import statistics
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loop.errors import DatasetError, ModelError, ServiceError
from loop.images import atomic_write_text
from loop.tracking import TAG, class_metric

if TYPE_CHECKING:
    from loop.datasets import DatasetVersion
    from loop.project import Project, ScoredImage
    from loop.report_production import ProductionData
    from loop.tracking import Tracker

CORRECTIONS_FILE = "corrections.json"
SIMULATION_FILE = "simulation.json"
NEXT_BATCH_FILE = "next_batch.json"
REPORT_ARTIFACT_DIR = "report"

CORRECTION_KINDS = ("accepted", "adjusted", "relabeled", "removed", "added")
MAX_DISAGREEMENTS = 10
THUMB_PX = 300

# Thresholds of the "got worse" flag and of the what-to-do-next rules (AP in units 0..1).
WORSE_THRESHOLD = 0.01  # a class got worse when its test AP50-95 fell by more than this
LOW_ACCEPTANCE = 0.5  # below: labelers corrected most of the model's suggestions for a class
MIN_SUGGESTIONS = 5  # fewer suggestions: acceptance is not judged
HIGH_REMOVED = 0.3  # share of suggestions deleted by labelers (false alarms)
HIGH_ADDED = 0.3  # share of final boxes the model did not suggest (misses)
RARE_BOXES = 10  # a class with fewer labeled boxes (or < RARE_FRACTION of the median) is rare
RARE_FRACTION = 0.25
PLATEAU_GAIN = 0.01  # test mAP50 gain per round below which returns are diminishing

NO_DATA = "no data yet"


# ====================================================================== the input of the renderers


@dataclass(frozen=True)
class RoundPoint:
    """One training round on the learning curve."""

    round: int
    labeled: int | None
    test_map50: float | None
    test_map50_95: float | None
    promoted: bool | None = None
    # Bootstrap interval bounds (None for runs logged before intervals existed).
    map50_lo: float | None = None
    map50_hi: float | None = None
    map50_95_lo: float | None = None
    map50_95_hi: float | None = None


@dataclass(frozen=True)
class ClassRow:
    """Per-class test AP of this round's model and of the previous champion, plus label counts."""

    name: str
    ap50_95: float | None
    previous_ap50_95: float | None = None
    ap50: float | None = None
    previous_ap50: float | None = None
    instances: int | None = None  # labeled boxes in this round's dataset version
    instances_added: int | None = None  # change since the previous round's dataset version
    ap50_lo: float | None = None  # bootstrap interval of ap50
    ap50_hi: float | None = None
    # Paired-bootstrap interval of ``delta`` (same test images for both models).
    delta_lo: float | None = None
    delta_hi: float | None = None
    test_boxes: int | None = None  # boxes of this class in the test split
    train_boxes: int | None = None  # boxes of this class in the train split

    @property
    def delta(self) -> float | None:
        """AP50-95 now minus the previous champion's (None when either is unknown)."""
        if self.ap50_95 is None or self.previous_ap50_95 is None:
            return None
        return self.ap50_95 - self.previous_ap50_95

    @property
    def delta50(self) -> float | None:
        if self.ap50 is None or self.previous_ap50 is None:
            return None
        return self.ap50 - self.previous_ap50

    @property
    def worse(self) -> bool:
        """AP50-95 fell by more than `WORSE_THRESHOLD`, and, when the paired interval of the
        change is known, significantly (the whole interval below 0)."""
        d = self.delta
        if d is None or d >= -WORSE_THRESHOLD:
            return False
        return self.delta_hi is None or self.delta_hi < 0


@dataclass(frozen=True)
class ClassCorrections:
    """What labelers did with the model's suggestions of one class."""

    accepted: int = 0
    adjusted: int = 0
    relabeled: int = 0
    removed: int = 0
    added: int = 0

    @property
    def suggestions(self) -> int:
        """Model boxes labelers saw (``added`` boxes were not suggested)."""
        return self.accepted + self.adjusted + self.relabeled + self.removed

    @property
    def acceptance(self) -> float | None:
        """Share of suggestions accepted unchanged (None without suggestions)."""
        return self.accepted / self.suggestions if self.suggestions else None

    def share(self, kind: str) -> float | None:
        """``kind`` as a share of the suggestions (``added``: of the final boxes)."""
        n = int(getattr(self, kind))
        if kind == "added":
            final = self.accepted + self.adjusted + self.relabeled + self.added
            return n / final if final else None
        return n / self.suggestions if self.suggestions else None

    def __add__(self, other: ClassCorrections) -> ClassCorrections:
        return ClassCorrections(
            *(int(getattr(self, k)) + int(getattr(other, k)) for k in CORRECTION_KINDS)
        )


@dataclass(frozen=True)
class Effort:
    """Labeling effort of the round. ``per_class`` and ``lead_times`` are empty without
    correction analytics; ``annotators`` (tasks per annotator) comes from label provenance."""

    tasks: int | None = None
    lead_times: Sequence[float] = ()
    per_class: Mapping[str, ClassCorrections] = field(default_factory=dict)
    annotators: Mapping[str, int] = field(default_factory=dict)

    @property
    def median_lead_time(self) -> float | None:
        return statistics.median(self.lead_times) if self.lead_times else None


@dataclass(frozen=True)
class Box:
    """A pixel box with its class name (and score for model boxes)."""

    x1: float
    y1: float
    x2: float
    y2: float
    cls: str
    score: float | None = None


@dataclass(frozen=True)
class Disagreement:
    """An image where the model's suggestions and the labelers' final boxes differ."""

    sha256: str
    file_name: str
    disagreement: float
    predicted: Sequence[Box] = ()
    final: Sequence[Box] = ()
    image_path: Path | None = None  # drawn on a grey canvas when absent
    size: tuple[int, int] | None = None  # (width, height)


@dataclass(frozen=True)
class Confusion:
    """``matrix[p][t]``: box counts, rows predicted, columns true; last index = background."""

    classes: Sequence[str]
    matrix: Sequence[Sequence[int]]


@dataclass(frozen=True)
class NextBatch:
    """The batch pushed to Label Studio after the last scoring."""

    strategy: str
    size: int
    class_mix: Mapping[str, int]
    round: int | None = None
    images_without_boxes: int | None = None


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows. ``round`` is None before the first training run.

    "Candidate" is this round's model; "champion" the model holding the alias after this round's
    gate; "previous" the champion the candidate was compared against (None in the first round).
    """

    project: str
    round: int | None
    classes: Sequence[str]
    generated_at: str = ""
    run_id: str | None = None
    dataset_digest: str | None = None
    candidate_version: str | None = None
    candidate_map50: float | None = None
    candidate_map50_95: float | None = None
    promoted: bool | None = None
    promotion_reason: str = ""
    champion_version: str | None = None
    champion_round: int | None = None
    champion_map50: float | None = None
    champion_map50_95: float | None = None
    previous_version: str | None = None
    previous_round: int | None = None
    previous_map50: float | None = None
    previous_map50_95: float | None = None
    labels_added: int | None = None
    labels_total: int | None = None
    curve: Sequence[RoundPoint] = ()
    baseline: Sequence[tuple[int, float]] = ()
    class_rows: Sequence[ClassRow] = ()
    confusion: Confusion | None = None
    effort: Effort | None = None
    disagreements: Sequence[Disagreement] = ()
    next_batch: NextBatch | None = None
    notes: Sequence[str] = ()  # why optional inputs were skipped (malformed files, ...)
    production: ProductionData | None = None  # the monitor's records (loop.report_production)
    # Label Studio tasks that pulls rejected and that have not changed since ("Label Studio task
    # <id>: <reason>", see `Project.rejections`).
    rejections: Sequence[str] = ()
    # How sure the figures are: bootstrap intervals ``(lo, hi)`` at ``confidence`` (None when
    # not logged), the paired gate's verdict and mAP50-95 difference ``(value, lo, hi)``.
    confidence: float = 0.95
    candidate_map50_ci: tuple[float, float] | None = None
    candidate_map50_95_ci: tuple[float, float] | None = None
    candidate_recall: float | None = None
    candidate_recall_ci: tuple[float, float] | None = None
    champion_map50_ci: tuple[float, float] | None = None
    champion_map50_95_ci: tuple[float, float] | None = None
    gate_verdict: str | None = None  # improvement | noise | worse
    gate_difference: tuple[float, float, float] | None = None
    test_images: int | None = None
    preannotation_hidden: Sequence[str] = ()
    train_epochs: int | None = None
    # The thresholds of the advice rules (from the project config's evaluation/advice).
    max_halfwidth: float = 0.05
    min_test_boxes: int = 10
    min_recall: float = 0.05
    min_train_boxes: int = 20
    preannotation_min_ap50: float = 0.1

    @property
    def map50_halfwidth(self) -> float | None:
        """Half the width of this round's test mAP50 interval: the smallest mAP50 difference
        the test split can resolve."""
        ci = self.candidate_map50_ci
        return None if ci is None else (ci[1] - ci[0]) / 2


@dataclass(frozen=True)
class Advice:
    """One "what to do next" item. ``level``: act (do something), watch, ok."""

    level: Literal["act", "watch", "ok"]
    text: str


# ====================================================================== what to do next


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _confused_with(conf: Confusion | None, cls: str) -> tuple[str, int] | None:
    """The other class (or "background") the model most often predicts for true ``cls``."""
    if conf is None or cls not in conf.classes:
        return None
    names = [*conf.classes, "background"]
    j = list(conf.classes).index(cls)
    best: tuple[str, int] | None = None
    for i, row in enumerate(conf.matrix):
        if i == j or i >= len(names) or j >= len(row):
            continue
        n = int(row[j])
        if n > 0 and (best is None or n > best[1]):
            best = (names[i], n)
    return best


def what_to_do_next(data: ReportData) -> list[Advice]:
    """Plain-language advice derived from the numbers, most urgent first (see the thresholds)."""
    if data.round is None:
        return [
            Advice(
                "act",
                "No model has been trained yet: import seed labels "
                "(defect-loop ingest DIR --labels LABELS) and run defect-loop cycle.",
            )
        ]
    act: list[Advice] = []
    watch: list[Advice] = []
    useless = _finds_almost_nothing(data)
    if useless is not None:
        act.append(Advice("act", useless))
    per_class = data.effort.per_class if data.effort is not None else {}
    for row in data.class_rows:
        corr = per_class.get(row.name)
        acc = corr.acceptance if corr is not None and corr.suggestions >= MIN_SUGGESTIONS else None
        if row.worse:
            drop = -(row.delta or 0.0)
            if acc is not None and acc < LOW_ACCEPTANCE:
                act.append(
                    Advice(
                        "act",
                        f"Review the labeling guidelines for '{row.name}': its test AP50-95 fell "
                        f"by {drop:.3f} and labelers accepted only {_pct(acc)} of the model's "
                        f"'{row.name}' suggestions. Inconsistent labels are the usual cause; "
                        "compare the disagreement images below with the guidelines.",
                    )
                )
            else:
                extra = (
                    f" No new '{row.name}' boxes were labeled this round."
                    if row.instances_added is not None and row.instances_added <= 0
                    else ""
                )
                act.append(
                    Advice(
                        "act",
                        f"'{row.name}' got worse: test AP50-95 fell by {drop:.3f}.{extra} "
                        f"Check this round's '{row.name}' labels and label more '{row.name}' "
                        "examples.",
                    )
                )
        elif acc is not None and acc < LOW_ACCEPTANCE:
            partner = _confused_with(data.confusion, row.name)
            if partner is None:
                hint = ""
            elif partner[0] == "background" and partner[0] not in data.classes:
                hint = f" On the test split the model most often misses '{row.name}' entirely "
                hint += f"({partner[1]} boxes)."
            else:
                hint = f" On the test split the model most often calls a true '{row.name}' "
                hint += f"'{partner[0]}' ({partner[1]} boxes)."
            watch.append(
                Advice(
                    "watch",
                    f"Labelers corrected most '{row.name}' suggestions (only {_pct(acc)} "
                    f"accepted): its pre-annotations cost time instead of saving it.{hint}",
                )
            )
        if corr is not None:
            removed = corr.share("removed")
            if (
                removed is not None
                and corr.suggestions >= MIN_SUGGESTIONS
                and removed > HIGH_REMOVED
            ):
                watch.append(
                    Advice(
                        "watch",
                        f"{corr.removed} of {corr.suggestions} '{row.name}' suggestions were "
                        "false alarms that labelers deleted: add defect-free examples, or raise "
                        "select.preannotation_conf so labelers see fewer wrong boxes.",
                    )
                )
            added = corr.share("added")
            if added is not None and corr.added >= MIN_SUGGESTIONS and added > HIGH_ADDED:
                watch.append(
                    Advice(
                        "watch",
                        f"The model missed {corr.added} '{row.name}' defects that labelers had "
                        f"to draw ({_pct(added)} of the final '{row.name}' boxes): it needs more "
                        f"'{row.name}' examples.",
                    )
                )
    too_few = [
        r
        for r in data.class_rows
        if r.train_boxes is not None and r.train_boxes < data.min_train_boxes
    ]
    for row in too_few:
        act.append(
            Advice(
                "act",
                f"'{row.name}' has only {row.train_boxes} training boxes: too few to learn it "
                f"(advice.min_train_boxes is {data.min_train_boxes}). Label more '{row.name}' "
                "images: find them in the pool, or let the selection favour rare classes "
                "(select.strategy: class_balance).",
            )
        )
    act.extend(_split_width_advice(data))
    for row in data.class_rows:
        if row.test_boxes is not None and row.test_boxes < data.min_test_boxes:
            watch.append(
                Advice(
                    "watch",
                    f"'{row.name}' has only {row.test_boxes} test boxes (evaluation."
                    f"min_test_boxes is {data.min_test_boxes}): its test AP cannot be trusted. "
                    f"Add labeled '{row.name}' images to the test split (defect-loop datasets "
                    "add-test).",
                )
            )
    counts = [r.instances for r in data.class_rows if r.instances is not None]
    if counts:
        median = statistics.median(counts)
        for row in data.class_rows:
            if row.instances is None or row in too_few:
                continue
            if row.instances < RARE_BOXES or row.instances < RARE_FRACTION * median:
                planned = data.next_batch.class_mix.get(row.name) if data.next_batch else None
                tail = (
                    f" The next batch holds about {planned} predicted '{row.name}' boxes."
                    if planned is not None
                    else ""
                )
                watch.append(
                    Advice(
                        "watch",
                        f"Only {row.instances} labeled '{row.name}' boxes (median class: "
                        f"{median:g}): find and label more '{row.name}' images.{tail}",
                    )
                )
    noise = _noise_advice(data)
    if noise is not None:
        watch.append(noise)
    elif data.promoted is False:
        watch.append(
            Advice(
                "watch",
                f"This round's model was not promoted ({data.promotion_reason or 'no reason'}). "
                "The champion keeps serving pre-annotations; keep labeling and retrain.",
            )
        )
    if data.preannotation_hidden:
        names = ", ".join(f"'{c}'" for c in data.preannotation_hidden)
        watch.append(
            Advice(
                "watch",
                f"Pre-annotations of {names} are not shown to labelers: the champion's test "
                "AP50 for them is below advice.preannotation_min_ap50 "
                f"({data.preannotation_min_ap50:g}). Labelers draw those boxes from scratch "
                "until a model detects them.",
            )
        )
    watch.extend(_curve_advice(data))
    out = act + watch
    if not act:
        nb = data.next_batch
        nxt = f"the next batch ({nb.size} images, {nb.strategy})" if nb else "the next batch"
        out.append(Advice("ok", f"No class got worse: label {nxt} and run the next cycle."))
    return out


def _ci_text(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _finds_almost_nothing(data: ReportData) -> str | None:
    """The "useless model" rule: test recall below ``min_recall``, or a confusion matrix in
    which nothing was predicted as any class."""
    from loop.evaluation import all_background

    symptoms = []
    r = data.candidate_recall
    if r is not None and r < data.min_recall:
        symptoms.append(
            f"test recall {r:.3f}{_ci_text(data.candidate_recall_ci)}, below "
            f"advice.min_recall {data.min_recall:g}"
        )
    if data.confusion is not None and all_background(data.confusion.matrix):
        symptoms.append(
            "the confusion matrix is all background: no test box was predicted as any class"
        )
    if not symptoms:
        return None
    epochs = f" (train.epochs is {data.train_epochs})" if data.train_epochs else ""
    return (
        f"This round's model finds almost nothing ({'; '.join(symptoms)}). Do not trust its "
        "suggestions or its ranking yet: start from a pretrained checkpoint instead of from "
        f"scratch, train longer{epochs}, and check that the labels match the images."
    )


def _split_width_advice(data: ReportData) -> list[Advice]:
    hw = data.map50_halfwidth
    if hw is None or hw <= data.max_halfwidth:
        return []
    n = f"{data.test_images} images" if data.test_images is not None else "its images"
    return [
        Advice(
            "act",
            f"The test split ({n}) cannot tell mAP50 differences smaller than ±{hw:.3f} from "
            f"noise ({100 * data.confidence:g}% interval; evaluation.max_halfwidth is "
            f"{data.max_halfwidth:g}), so rounds and the promotion gate cannot see small "
            "progress. Grow it with labeled images the loop never selected: defect-loop "
            "datasets add-test DIR --labels LABELS.",
        )
    ]


def _noise_advice(data: ReportData) -> Advice | None:
    if data.gate_verdict != "noise":
        return None
    prev = _model_name(data.previous_version, data.previous_round)
    diff = ""
    if data.gate_difference is not None:
        v, lo, hi = data.gate_difference
        diff = f": test mAP50-95 {v:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    n = f" on the same {data.test_images} test images" if data.test_images else ""
    kept = "" if data.promoted else " The champion keeps serving pre-annotations."
    return Advice(
        "watch",
        f"This round's model is no better than the champion ({prev}) within noise{diff} "
        f"({100 * data.confidence:g}% paired interval{n}).{kept} More labels or longer "
        "training may help; a larger test split resolves smaller differences (defect-loop "
        "datasets add-test).",
    )


def _interp(points: Sequence[tuple[int, float]], x: float) -> float | None:
    """Linear interpolation of ``points`` (sorted by x) at ``x``; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def _curve_advice(data: ReportData) -> list[Advice]:
    """Plateau and random-baseline advice from the rounds up to the report's."""
    pts = [
        p
        for p in data.curve
        if p.test_map50 is not None
        and p.labeled is not None
        and (data.round is None or p.round <= data.round)
    ]
    out: list[Advice] = []
    if len(pts) >= 2:
        a, b = pts[-2], pts[-1]
        gain = (b.test_map50 or 0.0) - (a.test_map50 or 0.0)
        more = (b.labeled or 0) - (a.labeled or 0)
        if more > 0 and gain < PLATEAU_GAIN:
            out.append(
                Advice(
                    "watch",
                    f"Test mAP50 changed by {gain:+.3f} with {more} more labeled images: "
                    "returns are diminishing. Try another selection strategy, or decide whether "
                    "the current accuracy is good enough.",
                )
            )
    if pts and data.baseline:
        last = pts[-1]
        base = _interp(data.baseline, float(last.labeled or 0))
        if base is not None and last.test_map50 is not None:
            if last.test_map50 <= base:
                out.append(
                    Advice(
                        "watch",
                        f"Active selection is not beating random selection at {last.labeled} "
                        f"labeled images (test mAP50 {last.test_map50:.3f} vs {base:.3f} in the "
                        "oracle replay): check the strategy in select.strategy.",
                    )
                )
            else:
                out.append(
                    Advice(
                        "ok",
                        f"Active selection is ahead of random selection by "
                        f"{last.test_map50 - base:.3f} test mAP50 at {last.labeled} labeled images.",
                    )
                )
    return out


# ====================================================================== formatting helpers


def _h(text: object) -> str:
    """HTML-escape ``text`` (quotes too: safe in attributes)."""
    return html.escape(str(text), quote=True)


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _signed(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def _int(v: int | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+d}" if signed else f"{v:d}"


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _trend(d: float | None) -> str:
    if d is None:
        return "flat"
    return "up" if d > 1e-9 else "down" if d < -1e-9 else "flat"


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def _mpl(text: str) -> str:
    """Text for matplotlib: ``$`` would start mathtext."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ====================================================================== plots (Agg canvas)


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
    import numpy as np

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


# ====================================================================== thumbnails (PIL)

PRED_COLOR = (230, 159, 0)  # Okabe-Ito orange: the model's suggestions (dashed)
FINAL_COLOR = (0, 114, 178)  # Okabe-Ito blue: the labelers' final boxes (solid)


def _short(text: str, n: int = 16) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _dashed_rect(draw: Any, xy: tuple[float, float, float, float], color: Any, width: int) -> None:
    x1, y1, x2, y2 = xy
    dash, gap = 6.0, 4.0
    for ax, ay, bx, by in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = math.hypot(bx - ax, by - ay)
        if length == 0:
            continue
        ux, uy = (bx - ax) / length, (by - ay) / length
        t = 0.0
        while t < length:
            e = min(t + dash, length)
            draw.line((ax + ux * t, ay + uy * t, ax + ux * e, ay + uy * e), fill=color, width=width)
            t = e + gap


def thumbnail_png(d: Disagreement, px: int = THUMB_PX) -> bytes:
    """``d``'s image scaled to ``px`` on its long side with the final boxes (solid blue) and the
    model's suggestions (dashed orange) drawn; a grey canvas when the image is unavailable."""
    from PIL import Image, ImageDraw, ImageFont

    img: Any = None
    if d.image_path is not None and Path(d.image_path).is_file():
        try:
            with Image.open(d.image_path) as src:
                src.draft("RGB", (px * 2, px * 2))
                img = src.convert("RGB")
        except OSError:
            img = None
    if img is None:
        w, h = d.size or (
            max([1.0, *(b.x2 for b in (*d.predicted, *d.final))]),
            max([1.0, *(b.y2 for b in (*d.predicted, *d.final))]),
        )
        img = Image.new("RGB", (max(1, int(w)), max(1, int(h))), (208, 215, 222))
    ow, oh = img.size
    s = px / max(ow, oh)
    img = img.resize((max(1, round(ow * s)), max(1, round(oh * s))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    try:
        font: Any = ImageFont.load_default(size=12)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()

    def tag(x: float, y: float, text: str, bg: tuple[int, int, int], below: bool) -> None:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 2
        ty = y + 1 if below else y - th - 1
        ty = min(max(ty, 0), img.height - th)
        tx = min(max(x, 0), img.width - tw)
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=bg)
        draw.text((tx + 2 - left, ty + 1 - top), text, fill=(255, 255, 255), font=font)

    for b in d.final:
        xy = (b.x1 * s, b.y1 * s, b.x2 * s, b.y2 * s)
        draw.rectangle(xy, outline=FINAL_COLOR, width=2)
        tag(xy[0], xy[3], _short(b.cls), FINAL_COLOR, below=True)
    for b in d.predicted:
        xy = (b.x1 * s, b.y1 * s, b.x2 * s, b.y2 * s)
        _dashed_rect(draw, xy, PRED_COLOR, 2)
        score = "" if b.score is None else f" {b.score:.2f}"
        tag(xy[0], xy[1], f"{_short(b.cls)}{score}", (176, 112, 0), below=False)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ====================================================================== HTML

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--good:#1a7f37;--bad:#cf222e;
--warn:#9a6700;--pred:#e69f00;--final:#0072b2}
*{box-sizing:border-box}
html{background:#fff}
body{margin:0;color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI","DejaVu Sans",
"Liberation Sans",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 56px}
header h1{font-size:24px;margin:0 0 2px}
.sub,.muted{color:var(--muted);font-size:13px}
code{font:12px/1.4 "DejaVu Sans Mono",Menlo,Consolas,monospace;background:var(--soft);
padding:1px 4px;border-radius:4px}
.cards{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:12px;margin:20px 0 8px}
.card{border:1px solid var(--line);border-radius:10px;padding:12px 16px;background:var(--soft)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .value{font-size:32px;font-weight:650;line-height:1.2;font-variant-numeric:tabular-nums}
.card .value.small{font-size:24px;padding-top:6px}
.card .value.yes{color:var(--good)}.card .value.no{color:var(--bad)}
.card .foot{font-size:13px;color:var(--muted);font-variant-numeric:tabular-nums}
.up{color:var(--good)}.down{color:var(--bad)}.flat{color:var(--muted)}
.ci{color:var(--muted);font-size:12px;white-space:nowrap}
.decision{margin:10px 0 0;padding:10px 14px;border-radius:8px;background:var(--soft);
border-left:4px solid var(--muted);font-size:14px}
.decision.yes{border-left-color:var(--good)}.decision.no{border-left-color:var(--bad)}
section{margin-top:34px}
h2{font-size:18px;margin:0 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 8px}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:middle}
th:first-child,td:first-child{text-align:left}
td.name{font-weight:600;word-break:break-word}
tr.worse td{background:#fff1f0}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
white-space:nowrap}
.badge.bad{background:#ffebe9;color:var(--bad)}.badge.good{background:#dafbe1;color:var(--good)}
.nodata{color:var(--muted);font-style:italic;padding:14px 16px;border:1px dashed var(--line);
border-radius:8px;background:#fcfcfd}
ul.advice{list-style:none;padding:0;margin:0}
ul.advice li{padding:10px 14px;margin:0 0 8px;border-radius:8px;background:var(--soft);
border-left:4px solid var(--muted)}
ul.advice li.act{border-left-color:var(--bad);background:#fff5f4}
ul.advice li.watch{border-left-color:#d4a72c;background:#fffbeb}
ul.advice li.ok{border-left-color:var(--good);background:#f3fbf5}
ul.advice .lvl{font-size:11px;font-weight:700;text-transform:uppercase;letter-spacing:.06em;
margin-right:8px}
li.act .lvl{color:var(--bad)}li.watch .lvl{color:var(--warn)}li.ok .lvl{color:var(--good)}
img.plot{display:block;max-width:100%;height:auto;margin:0 auto}
.stats{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:14px}
.stat{border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:150px}
.stat b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.stat span{font-size:12px;color:var(--muted)}
.bar{display:flex;height:12px;width:100%;min-width:140px;border-radius:3px;overflow:hidden;
background:#eaeef2}
.bar i{display:block;height:100%}
.k-accepted{background:#2da44e}.k-adjusted{background:#a2d96f}.k-relabeled{background:#8250df}
.k-removed{background:#cf222e}.k-mix{background:#0072b2}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12px;color:var(--muted);margin:8px 0}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px}
.legend i.pred{background:none;border:2px dashed var(--pred);width:16px;height:12px}
.legend i.final{background:none;border:2px solid var(--final);width:16px;height:12px}
.gallery{display:grid;grid-template-columns:repeat(5,minmax(0,1fr));gap:14px}
figure{margin:0}
figure img{display:block;width:100%;height:auto;border:1px solid var(--line);border-radius:6px;
background:#d0d7de}
figcaption{font-size:12px;color:var(--muted);margin-top:4px;line-height:1.4}
figcaption b{color:var(--fg);overflow-wrap:anywhere}
.two{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px}
footer{margin-top:40px;font-size:12px;color:var(--muted);border-top:1px solid var(--line);
padding-top:10px}
@media (max-width:800px){.cards{grid-template-columns:repeat(2,minmax(0,1fr))}
.gallery{grid-template-columns:repeat(2,minmax(0,1fr))}.two{grid-template-columns:1fr}}
@media print{main{max-width:none;padding:0}section{break-inside:avoid}}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _nodata(what: str = "") -> str:
    return f'<p class="nodata">{_h(NO_DATA)}{_h(": " + what) if what else ""}</p>'


def _card(label: str, value_id: str, value: str, foot: str, extra: str = "") -> str:
    cls = f"value {extra}".strip()
    return (
        f'<div class="card"><div class="label">{_h(label)}</div>'
        f'<div class="{cls}" id="{value_id}">{_h(value)}</div><div class="foot">{foot}</div></div>'
    )


def _delta_foot(
    now: float | None,
    prev: float | None,
    prev_id: str,
    who: str,
    ci: tuple[float, float] | None = None,
    ci_id: str = "",
) -> str:
    d = _delta(now, prev)
    interval = (
        f'<span class="ci" id="{ci_id}">[{_h(_num(ci[0]))}, {_h(_num(ci[1]))}]</span><br>'
        if ci is not None and ci_id
        else ""
    )
    if prev is None:
        return f'{interval}<span id="{prev_id}">—</span> no previous champion'
    return (
        f'{interval}<span class="{_trend(d)}" id="{prev_id}-delta">{_h(_signed(d))}</span> vs '
        f'<span id="{prev_id}">{_h(_num(prev))}</span> {_h(who)}'
    )


def _model_name(version: str | None, rnd: int | None) -> str:
    parts = []
    if version:
        parts.append(f"v{version}")
    if rnd is not None:
        parts.append(f"round {rnd}")
    return ", ".join(parts) if parts else "the model"


def _headline(data: ReportData) -> str:
    prev_who = f"({_model_name(data.previous_version, data.previous_round)})"
    if data.promoted is None:
        status, sfoot = "—", "no training run"
    elif data.promoted:
        status, sfoot = "Promoted", "this round's model is the new champion"
    else:
        status, sfoot = "Not promoted", "the previous champion stays"
    added = _int(data.labels_added, signed=True) if data.labels_added is not None else "—"
    cards = "".join(
        [
            _card(
                "Champion test mAP50",
                "champion-map50",
                _num(data.champion_map50),
                _delta_foot(
                    data.champion_map50,
                    data.previous_map50,
                    "previous-map50",
                    prev_who,
                    data.champion_map50_ci,
                    "champion-map50-ci",
                ),
            ),
            _card(
                "Champion test mAP50-95",
                "champion-map50-95",
                _num(data.champion_map50_95),
                _delta_foot(
                    data.champion_map50_95,
                    data.previous_map50_95,
                    "previous-map50-95",
                    prev_who,
                    data.champion_map50_95_ci,
                    "champion-map50-95-ci",
                ),
            ),
            _card(
                "Images labeled this round",
                "labels-added",
                added,
                f'<span id="labels-total">{_h(_int(data.labels_total))}</span> labeled in total',
            ),
            _card(
                "Candidate",
                "promotion-status",
                status,
                _h(sfoot),
                "small " + ("yes" if data.promoted else "no" if data.promoted is False else ""),
            ),
        ]
    )
    decision = ""
    if data.round is not None:
        cls = "yes" if data.promoted else "no" if data.promoted is False else ""
        cand = _model_name(data.candidate_version, data.round)
        verdict = "promoted" if data.promoted else "not promoted" if data.promoted is False else "?"
        decision = (
            f'<p class="decision {cls}">This round\'s model ({_h(cand)}): test mAP50 '
            f'<b id="candidate-map50">{_h(_num(data.candidate_map50))}</b>'
            f'<span class="ci" id="candidate-map50-ci">{_h(_ci_text(data.candidate_map50_ci))}'
            "</span>, mAP50-95 "
            f'<b id="candidate-map50-95">{_h(_num(data.candidate_map50_95))}</b>'
            f'<span class="ci">{_h(_ci_text(data.candidate_map50_95_ci))}</span>; '
            f"<b>{_h(verdict)}</b>"
            f"{': ' if data.promotion_reason else ''}"
            f'<span id="promotion-reason">{_h(data.promotion_reason)}</span>.</p>'
            f"{_sureness_html(data)}"
        )
    return f'<div class="cards">{cards}</div>{decision}'


def _sureness_html(data: ReportData) -> str:
    """One line on how sure the figures are: interval level and the split's resolution."""
    hw = data.map50_halfwidth
    if hw is None:
        return ""
    n = f"{data.test_images} test images" if data.test_images is not None else "the test split"
    wide = hw > data.max_halfwidth
    return (
        f'<p class="muted" id="test-resolution">Intervals: {100 * data.confidence:g}% bootstrap '
        f"over {_h(n)}. This test split resolves mAP50 differences larger than "
        f'<b class="{"down" if wide else ""}">±{hw:.3f}</b>'
        + (f" (wider than evaluation.max_halfwidth {data.max_halfwidth:g})" if wide else "")
        + ".</p>"
    )


def _advice_html(data: ReportData) -> str:
    items = "".join(
        f'<li class="{a.level}"><span class="lvl">{_h(a.level)}</span>{_h(a.text)}</li>'
        for a in what_to_do_next(data)
    )
    return f'<ul class="advice" id="advice">{items}</ul>'


def _img(png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return _nodata(missing)
    return f'<img class="plot" alt="{_h(alt)}" src="{_png_uri(png)}">'


def _class_table(data: ReportData) -> str:
    if not data.class_rows:
        return _nodata("no per-class test metrics for this round")
    prev = _model_name(data.previous_version, data.previous_round)
    rows = []
    for r in data.class_rows:
        flag = (
            '<span class="badge bad">got worse</span>'
            if r.worse
            else '<span class="badge good">improved</span>'
            if (r.delta or 0) > WORSE_THRESHOLD
            else ""
        )
        ap_ci = (r.ap50_lo, r.ap50_hi) if r.ap50_lo is not None and r.ap50_hi is not None else None
        d_ci = (
            f" [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
            if r.delta_lo is not None and r.delta_hi is not None
            else ""
        )
        few = r.test_boxes is not None and r.test_boxes < data.min_test_boxes
        rows.append(
            f'<tr class="{"worse" if r.worse else ""}" data-class="{_h(r.name)}">'
            f'<td class="name">{_h(r.name)}</td>'
            f'<td>{_h(_num(r.ap50))}<span class="ci">{_h(_ci_text(ap_ci, 2))}</span></td>'
            f'<td class="{_trend(r.delta50)}">{_h(_signed(r.delta50))}</td>'
            f"<td><b>{_h(_num(r.ap50_95))}</b></td>"
            f'<td class="{_trend(r.delta)}">{_h(_signed(r.delta))}'
            f'<span class="ci">{_h(d_ci)}</span></td>'
            f"<td>{_h(_int(r.instances))}</td>"
            f"<td>{_h(_int(r.instances_added, signed=True))}</td>"
            f"<td>{_h(_int(r.train_boxes))}</td>"
            f'<td class="{"down" if few else ""}">{_h(_int(r.test_boxes))}</td>'
            f"<td>{flag}</td></tr>"
        )
    head = (
        "<tr><th>Class</th><th>AP50</th><th>Δ AP50</th><th>AP50-95</th><th>Δ AP50-95</th>"
        "<th>Labeled boxes</th><th>New this round</th><th>Train boxes</th><th>Test boxes</th>"
        "<th></th></tr>"
    )
    return (
        f'<table id="class-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        f'<p class="muted">AP on the frozen test split of this round\'s model; Δ against the '
        f"previous champion ({_h(prev)}). A class is flagged when its AP50-95 fell by more than "
        f"{WORSE_THRESHOLD:g} (and, where the paired interval is known, significantly). "
        f"Brackets: {100 * data.confidence:g}% bootstrap intervals over the test images; the "
        "Δ interval is paired (both models on the same images).</p>"
    )


def _bar(parts: Sequence[tuple[str, float]]) -> str:
    spans = "".join(
        f'<i class="k-{k}" style="width:{max(0.0, min(100.0, 100 * v)):.1f}%"></i>'
        for k, v in parts
        if v > 0
    )
    return f'<div class="bar">{spans}</div>'


def _effort_html(data: ReportData) -> str:
    e = data.effort
    if e is None:
        return _nodata("no labels were pulled from Label Studio for this round")
    lt = sorted(e.lead_times)
    p90 = lt[min(len(lt) - 1, math.ceil(0.9 * len(lt)) - 1)] if lt else None
    stats = (
        '<div class="stats">'
        f'<div class="stat"><b id="tasks-labeled">{_h(_int(e.tasks))}</b>'
        "<span>tasks labeled</span></div>"
        f'<div class="stat"><b id="median-lead-time">{_h(_seconds(e.median_lead_time))}</b>'
        "<span>median lead time per task</span></div>"
        f'<div class="stat"><b>{_h(_seconds(p90))}</b><span>90th percentile</span></div>'
        f'<div class="stat"><b>{len(e.annotators)}</b><span>annotators</span></div></div>'
    )
    if e.per_class:
        rows = []
        for name in [*data.classes, *(c for c in e.per_class if c not in data.classes)]:
            c = e.per_class.get(name)
            if c is None:
                continue
            cells = "".join(
                f"<td>{getattr(c, k)} <span class='muted'>"
                f"({_h(_pct(c.share(k) or 0.0) if c.share(k) is not None else '—')})</span></td>"
                for k in CORRECTION_KINDS[:4]
            )
            bar = _bar([(k, c.share(k) or 0.0) for k in CORRECTION_KINDS[:4]])
            rows.append(
                f'<tr data-class="{_h(name)}"><td class="name">{_h(name)}</td>'
                f"<td>{c.suggestions}</td>{cells}<td>{c.added}</td><td>{bar}</td></tr>"
            )
        legend = "".join(f'<span><i class="k-{k}"></i>{k}</span>' for k in CORRECTION_KINDS[:4])
        table = (
            "<h3>What labelers did with the model's suggestions</h3>"
            '<table id="acceptance-table"><thead><tr><th>Class</th><th>Suggestions</th>'
            "<th>Accepted</th><th>Adjusted</th><th>Relabeled</th><th>Removed</th>"
            f"<th>Added</th><th>Share</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f'<div class="legend">{legend}<span>added: boxes the model missed</span></div>'
        )
    else:
        table = _nodata("correction analytics (accepted / adjusted / relabeled / removed / added)")
    if e.annotators:
        arows = "".join(
            f'<tr><td class="name">{_h(a)}</td><td>{n}</td></tr>'
            for a, n in sorted(e.annotators.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        ann = (
            '<h3>Tasks per annotator</h3><table id="annotator-table"><thead><tr>'
            f"<th>Annotator</th><th>Tasks</th></tr></thead><tbody>{arows}</tbody></table>"
        )
    else:
        ann = ""
    return stats + table + ann


def _disagreements_html(data: ReportData) -> str:
    if not data.disagreements:
        return _nodata("no model-vs-labeler comparisons for this round")
    figs = []
    top = sorted(data.disagreements, key=lambda d: -d.disagreement)[:MAX_DISAGREEMENTS]
    for d in top:
        png = thumbnail_png(d)
        figs.append(
            f'<figure><img alt="{_h(d.file_name)}" src="{_png_uri(png)}">'
            f"<figcaption><b>{_h(d.file_name)}</b><br>disagreement "
            f"{_h(_num(d.disagreement, 2))} · {len(d.predicted)} suggested · "
            f"{len(d.final)} final</figcaption></figure>"
        )
    legend = (
        '<div class="legend"><span><i class="pred"></i>model suggestion (dashed, score)</span>'
        '<span><i class="final"></i>labelers\' final box</span></div>'
    )
    return f'{legend}<div class="gallery" id="disagreements">{"".join(figs)}</div>'


def _next_batch_html(data: ReportData) -> str:
    nb = data.next_batch
    if nb is None:
        return _nodata("the next batch is recorded when a cycle pushes tasks to Label Studio")
    after = f"selected after round {nb.round}" if nb.round is not None else ""
    stats = (
        '<div class="stats">'
        f'<div class="stat"><b id="next-batch-size">{nb.size}</b><span>images</span></div>'
        f'<div class="stat"><b id="next-batch-strategy">{_h(nb.strategy)}</b>'
        f"<span>selection strategy</span></div>"
    )
    if nb.images_without_boxes is not None:
        stats += (
            f'<div class="stat"><b>{nb.images_without_boxes}</b>'
            "<span>images with no suggested box</span></div>"
        )
    stats += "</div>"
    total = sum(nb.class_mix.values())
    if total:
        rows = "".join(
            f'<tr data-class="{_h(c)}"><td class="name">{_h(c)}</td><td>{n}</td>'
            f"<td>{_h(_pct(n / total))}</td><td>{_bar([('mix', n / total)])}</td></tr>"
            for c, n in sorted(nb.class_mix.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        mix = (
            '<h3>Predicted class mix</h3><table id="class-mix"><thead><tr><th>Class</th>'
            f"<th>Predicted boxes</th><th>Share</th><th></th></tr></thead><tbody>{rows}</tbody>"
            "</table>"
        )
    else:
        mix = _nodata("the model suggested no boxes in the next batch")
    return stats + mix + (f'<p class="muted">{_h(after)}</p>' if after else "")


def render_html(data: ReportData) -> str:
    """The self-contained report page (inline CSS, ``data:`` images, no scripts)."""
    from loop.report_production import production_html

    title = f"defect-loop report: {data.project}" + (
        f", round {data.round}" if data.round is not None else ""
    )
    meta = [f"generated {data.generated_at}"] if data.generated_at else []
    if data.run_id:
        meta.append(f"MLflow run {data.run_id}")
    if data.dataset_digest:
        meta.append(f"dataset {data.dataset_digest[:12]}")
    curve = _img(
        learning_curve_png(data), "learning curve: test mAP against labeled images", "no rounds"
    )
    conf = (
        _img(confusion_png(data.confusion), "confusion matrix", "unreadable confusion matrix")
        if data.confusion is not None
        else _nodata("no confusion matrix was logged for this round")
    )
    curve_note = (
        ""
        if data.baseline
        else '<p class="muted">No oracle replay (simulation.json) for this project: '
        "no random baseline.</p>"
    )
    notes = (
        '<section id="notes"><h2>Notes</h2><ul>'
        + "".join(f"<li>{_h(n)}</li>" for n in data.notes)
        + "</ul></section>"
        if data.notes
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="defect-loop report">
<link rel="icon" href="data:,">
<title>{_h(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header><h1 id="title">{_h(title)}</h1><div class="sub">{_h(" · ".join(meta))}</div></header>
<section id="headline" style="margin-top:8px">{_headline(data)}</section>
<section id="next-steps"><h2>What to do next</h2>{_advice_html(data)}</section>
<section id="learning-curve"><h2>Learning curve</h2>{curve}{curve_note}</section>
<section id="classes"><h2>Per class</h2>{_class_table(data)}</section>
<section id="confusion"><h2>Confusion matrix (test split)</h2>{conf}</section>
<section id="effort"><h2>Labeling effort</h2>{_effort_html(data)}</section>
<section id="disagreement"><h2>Where model and labelers disagreed most</h2>
{_disagreements_html(data)}</section>
<section id="next-batch"><h2>Next batch</h2>{_next_batch_html(data)}</section>
<section id="production"><h2>Production</h2>{production_html(data.production)}</section>
{_rejections_html(data)}
{notes}
<footer>defect-loop model-improvement report. Self-contained: open it from disk, nothing is
loaded from the network.</footer>
</main>
</body>
</html>
"""


# ====================================================================== Markdown

_MD_SPECIAL = set("\\`*_[]<>|&#~!")


def _md(text: object) -> str:
    """``text`` safe inside Markdown (CommonMark backslash escapes; newlines folded)."""
    s = " ".join(str(text).split())
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in s)


def render_markdown(data: ReportData, html_name: str | None = None) -> str:
    """A short Markdown summary: headline, classes that got worse, what to do next."""
    if data.round is None:
        lines = [f"# defect-loop report: {_md(data.project)}", "", "No training run yet."]
    else:
        prev = _model_name(data.previous_version, data.previous_round)
        cmp50 = (
            f"({_signed(_delta(data.champion_map50, data.previous_map50))} vs {prev}: "
            f"{_num(data.previous_map50)})"
            if data.previous_map50 is not None
            else ""
        )
        cmp95 = (
            f"({_signed(_delta(data.champion_map50_95, data.previous_map50_95))} vs "
            f"{_num(data.previous_map50_95)})"
            if data.previous_map50_95 is not None
            else ""
        )
        verdict = (
            "promoted"
            if data.promoted
            else "not promoted"
            if data.promoted is False
            else "no promotion decision"
        )

        def ci_md(ci: tuple[float, float] | None) -> str:
            return f" {_md(_ci_text(ci).strip())}" if ci is not None else ""

        c50, c95 = ci_md(data.champion_map50_ci), ci_md(data.champion_map50_95_ci)
        lines = [
            f"# defect-loop report: {_md(data.project)}, round {data.round}",
            "",
            f"- **Champion test mAP50 {_num(data.champion_map50)}**{c50} {_md(cmp50)}, "
            f"mAP50-95 {_num(data.champion_map50_95)}{c95} {_md(cmp95)}".rstrip(),
            f"- Labeled images: {_int(data.labels_added, signed=True)} this round, "
            f"{_int(data.labels_total)} in total",
            f"- This round's model ({_md(_model_name(data.candidate_version, data.round))}): "
            f"test mAP50 {_num(data.candidate_map50)}{ci_md(data.candidate_map50_ci)}, "
            f"**{verdict}**" + (f": {_md(data.promotion_reason)}" if data.promotion_reason else ""),
        ]
        hw = data.map50_halfwidth
        if hw is not None:
            n = f"{data.test_images} test images" if data.test_images is not None else "test"
            lines.append(
                f"- Intervals: {100 * data.confidence:g}% bootstrap over {n}; the test split "
                f"resolves mAP50 differences larger than ±{hw:.3f}"
            )
        if data.effort is not None:
            lines.append(
                f"- Labeling: {_int(data.effort.tasks)} tasks, median lead time "
                f"{_seconds(data.effort.median_lead_time)}"
            )
        worse = [r for r in data.class_rows if r.worse]
        if worse:
            lines += ["", "## Classes that got worse", ""]
            lines += [
                f"- {_md(r.name)}: AP50-95 {_num(r.ap50_95)} ({_signed(r.delta)})" for r in worse
            ]
    lines += ["", "## What to do next", ""]
    lines += [f"- **{a.level}**: {_md(a.text)}" for a in what_to_do_next(data)]
    from loop.report_production import production_markdown

    lines += production_markdown(data.production)
    if data.rejections:
        lines += ["", f"## Rejected Label Studio tasks ({len(data.rejections)})", ""]
        lines += [f"- {_md(r)}" for r in data.rejections[:_REJECTIONS_LISTED]]
        if len(data.rejections) > _REJECTIONS_LISTED:
            lines.append(f"- ... see `defect-loop rejections` for all {len(data.rejections)}")
    if html_name:
        lines += ["", f"Full report with plots: {_md(html_name)} (MLflow artifact `report/`)."]
    return "\n".join(lines) + "\n"


_REJECTIONS_LISTED = 50


def _rejections_html(data: ReportData) -> str:
    """The tasks pulls rejected and that still wait for a fix (empty when there are none)."""
    if not data.rejections:
        return ""
    items = "".join(f"<li>{_h(r)}</li>" for r in data.rejections[:_REJECTIONS_LISTED])
    more = (
        f'<p class="muted">and {len(data.rejections) - _REJECTIONS_LISTED} more: '
        "<code>defect-loop rejections</code> lists them all.</p>"
        if len(data.rejections) > _REJECTIONS_LISTED
        else ""
    )
    return (
        f'<section id="rejections"><h2>Rejected Label Studio tasks ({len(data.rejections)})</h2>'
        "<p>Their annotations were not used: fix or delete them in Label Studio; the next pull "
        f"judges them again.</p><ul>{items}</ul>{more}</section>"
    )


# ====================================================================== collecting from a project


@dataclass(frozen=True)
class _Run:
    run_id: str
    round: int
    digest: str
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    tags: Mapping[str, str]

    @property
    def promoted(self) -> bool | None:
        v = self.tags.get(TAG + "promoted")
        return None if v is None else v == "true"


def _training_runs(tracker: Tracker) -> list[_Run]:
    """Finished defect-loop training runs, one per round (the newest), by round."""
    client = tracker.client
    found = client.search_runs(
        [tracker.experiment_id()],
        filter_string="tags.`defect_loop.kind` = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    by_round: dict[int, _Run] = {}
    for r in found:
        try:
            rnd = int(r.data.tags.get(TAG + "round", ""))
        except ValueError:
            continue
        by_round[rnd] = _Run(
            str(r.info.run_id),
            rnd,
            r.data.tags.get(TAG + "dataset_digest", ""),
            dict(r.data.metrics),
            dict(r.data.params),
            dict(r.data.tags),
        )
    return [by_round[k] for k in sorted(by_round)]


def _model_versions(tracker: Tracker) -> dict[str, str]:
    """run id -> registered model version (empty when the registry cannot be read)."""
    from mlflow.exceptions import MlflowException

    name = tracker.cfg.mlflow.registered_model.replace("'", "\\'")
    try:
        mvs = tracker.client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return {}
    return {str(mv.run_id): str(mv.version) for mv in mvs if mv.run_id}


def _load_version(
    project: Project, tracker: Tracker, run: _Run, notes: list[str]
) -> DatasetVersion | None:
    """The run's dataset version: from the local store, else from the run's artifacts."""
    try:
        return project.store.load(run.digest)
    except DatasetError:
        pass
    loader = getattr(tracker, "load_dataset_version", None)
    if loader is not None:
        try:
            version: DatasetVersion = loader(run.run_id, project.store)
            return version
        except DatasetError as exc:
            notes.append(f"dataset version of round {run.round} unavailable: {exc}")
            return None
    notes.append(f"dataset version {run.digest[:12]} of round {run.round} is not in the store")
    return None


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} at {path.parent} is not readable JSON ({exc}); skipped")
        return None


def _box(item: Any, classes: Sequence[str], with_score: bool) -> Box:
    vals = list(item)
    if len(vals) < 5:
        raise ValueError(f"box {item!r} needs x1, y1, x2, y2, class")
    c = vals[4]
    if isinstance(c, int | float) and not isinstance(c, bool):
        idx = int(c)
        name = classes[idx] if 0 <= idx < len(classes) else str(idx)
    else:
        name = str(c)
    score = float(vals[5]) if with_score and len(vals) > 5 and vals[5] is not None else None
    x1, y1, x2, y2 = (float(v) for v in vals[:4])
    return Box(x1, y1, x2, y2, name, score)


@dataclass
class _Corrections:
    per_class: dict[str, ClassCorrections] = field(default_factory=dict)
    lead_times: list[float] = field(default_factory=list)
    tasks: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0


def _merge_corrections(acc: _Corrections, doc: Any, classes: Sequence[str]) -> None:
    """Add one corrections.json document to ``acc``; raises ValueError on a wrong shape."""
    if not isinstance(doc, dict):
        raise ValueError("the top level must be an object")
    per_class = doc.get("per_class", {}) or {}
    if not isinstance(per_class, dict):
        raise ValueError("per_class must map class names to counts")
    for cls, counts in per_class.items():
        if not isinstance(counts, dict):
            raise ValueError(f"per_class[{cls!r}] must be an object of counts")
        add = ClassCorrections(*(int(counts.get(k, 0) or 0) for k in CORRECTION_KINDS))
        name = classes[int(cls)] if str(cls).isdigit() and int(cls) < len(classes) else str(cls)
        acc.per_class[name] = acc.per_class.get(name, ClassCorrections()) + add
    acc.lead_times += [float(x) for x in doc.get("lead_times", []) or [] if x is not None]
    acc.tasks += int(doc.get("tasks", 0) or 0)
    images = doc.get("images", []) or []
    if not isinstance(images, list):
        raise ValueError("images must be a list")
    acc.images += [i for i in images if isinstance(i, dict)]
    acc.files += 1


def _version_chain(project: Project, start: str, stop: str | None) -> list[str]:
    """Digests from ``start`` back along ``parent`` links, excluding ``stop`` (and what is
    before it)."""
    out: list[str] = []
    cur: str | None = start
    seen: set[str] = set()
    while cur and cur != stop and cur not in seen and len(out) < 1000:
        seen.add(cur)
        out.append(cur)
        meta = project.store.path(cur) / "meta.json"
        try:
            cur = json.loads(meta.read_text()).get("parent") if meta.is_file() else None
        except (OSError, ValueError):
            cur = None
    return out


def _disagreement(project: Project, item: dict[str, Any], classes: Sequence[str]) -> Disagreement:
    sha = str(item["sha256"])
    from loop.errors import ImageError

    try:
        entry = project.pool.get(sha)
        name = Path(entry.source).name or entry.path
        path: Path | None = project.pool.abs_path(sha)
        size: tuple[int, int] | None = (entry.width, entry.height)
    except ImageError:
        name, path, size = sha[:12], None, None
    return Disagreement(
        sha256=sha,
        file_name=name,
        disagreement=float(item.get("disagreement", 0.0) or 0.0),
        predicted=tuple(_box(b, classes, True) for b in item.get("predicted", []) or []),
        final=tuple(_box(b, classes, False) for b in item.get("final", []) or []),
        image_path=path,
        size=size,
    )


def _labelstudio_rows(version: DatasetVersion | None) -> dict[str, tuple[str, str]]:
    """sha256 -> (annotation id, annotator) of the rows that came from Label Studio."""
    if version is None:
        return {}
    return {
        r.sha256: (str(r.provenance.get("annotation_id", "")), str(r.provenance.get("annotator")))
        for r in version.rows
        if r.provenance.get("source") == "labelstudio"
    }


def _parse_baseline(doc: Any) -> list[tuple[int, float]]:
    pts = doc.get("random", doc.get("baseline")) if isinstance(doc, dict) else doc
    if not isinstance(pts, list):
        raise ValueError("expected a list of {labeled, test_map50}")
    return sorted((int(p["labeled"]), float(p["test_map50"])) for p in pts)


def _parse_next_batch(doc: Any) -> NextBatch:
    if not isinstance(doc, dict):
        raise ValueError("expected an object")
    mix = doc.get("class_mix", {}) or {}
    if not isinstance(mix, dict):
        raise ValueError("class_mix must map class names to counts")
    rnd = doc.get("round")
    empty = doc.get("images_without_boxes")
    strategy = str(doc.get("strategy", "?"))
    if doc.get("reduction"):
        strategy += f" ({doc['reduction']})"
    return NextBatch(
        strategy=strategy,
        size=int(doc.get("size", 0)),
        class_mix={str(k): int(v) for k, v in mix.items()},
        round=None if rnd is None else int(rnd),
        images_without_boxes=None if empty is None else int(empty),
    )


def _optional(
    project: Project, notes: list[str]
) -> tuple[list[tuple[int, float]], NextBatch | None]:
    ws = project.cfg.workspace
    baseline: list[tuple[int, float]] = []
    doc = _read_json(ws / SIMULATION_FILE, notes)
    if doc is not None:
        try:
            baseline = _parse_baseline(doc)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"{SIMULATION_FILE} has an unexpected shape ({exc}); no baseline shown")
    nb = None
    doc = _read_json(ws / NEXT_BATCH_FILE, notes)
    if doc is not None:
        try:
            nb = _parse_next_batch(doc)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"{NEXT_BATCH_FILE} has an unexpected shape ({exc}); section skipped")
    return baseline, nb


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _metric(run: _Run | None, key: str) -> float | None:
    if run is None:
        return None
    v = run.metrics.get(key)
    return None if v is None else float(v)


def collect_report_data(project: Project, tracker: Tracker, round: int | None = None) -> ReportData:
    """Read round ``round`` (default: the newest) of ``project`` into a `ReportData`.

    Raises `ModelError` when ``round`` has no finished training run. Missing optional inputs
    (corrections, simulation, next batch, confusion matrix) leave their fields empty; malformed
    ones are skipped with a line in ``notes``.
    """
    cfg = project.cfg
    classes = tuple(cfg.classes)
    notes: list[str] = []
    baseline, next_batch = _optional(project, notes)
    from loop.report_production import safe_collect

    production = safe_collect(project, notes)
    runs = _training_runs(tracker)
    if not runs:
        if round is not None:
            raise ModelError(
                f"no finished training run for round {round}: run `defect-loop train` first"
            )
        return ReportData(
            project=cfg.name,
            round=None,
            classes=classes,
            generated_at=_now(),
            baseline=baseline,
            next_batch=next_batch,
            notes=notes,
            production=production,
        )
    by_round = {r.round: r for r in runs}
    if round is None:
        target = runs[-1]
    elif round in by_round:
        target = by_round[round]
    else:
        have = ", ".join(str(r.round) for r in runs)
        raise ModelError(f"no finished training run for round {round}; rounds with runs: {have}")
    earlier = [r for r in runs if r.round < target.round]
    prev_run = earlier[-1] if earlier else None
    versions = _model_versions(tracker)
    run_of_version = {v: rid for rid, v in versions.items()}
    runs_by_id = {r.run_id: r for r in runs}
    compared = target.tags.get(TAG + "compared_to", "")
    prev_champ: _Run | None = runs_by_id.get(run_of_version.get(compared, ""))
    if prev_champ is None:
        promoted_before = [r for r in earlier if r.promoted]
        prev_champ = promoted_before[-1] if promoted_before else None
    champ = target if target.promoted else prev_champ

    v_now = _load_version(project, tracker, target, notes)
    v_prev = _load_version(project, tracker, prev_run, notes) if prev_run else None
    counts_now = v_now.class_counts() if v_now is not None else None
    counts_prev = v_prev.class_counts() if v_prev is not None else None
    labels_added: int | None = None
    if v_now is not None:
        before = {r.sha256 for r in v_prev.rows} if v_prev is not None else set()
        labels_added = (
            sum(1 for r in v_now.rows if r.sha256 not in before)
            if v_prev is not None or prev_run is None
            else None
        )

    # The paired gate evaluated the previous champion on this round's test images
    # (``compared_test_*``): compare against those figures when they exist.
    paired = _metric(target, "compared_test_map50_95") is not None

    def prev_metric(key: str) -> float | None:
        if paired:
            return _metric(target, f"compared_{key}")
        return _metric(prev_champ, key)

    split_boxes = _split_boxes(v_now, classes)
    class_rows = []
    for c in classes:
        ap95 = _metric(target, class_metric("test", "ap50_95", c))
        if ap95 is None and _metric(target, "test_map50_95") is None:
            continue
        n_now = counts_now.get(c) if counts_now is not None else None
        n_prev = counts_prev.get(c, 0) if counts_prev is not None else None
        ap50_key = class_metric("test", "ap50", c)
        diff_key = class_metric("gate_diff", "ap50_95", c)
        class_rows.append(
            ClassRow(
                name=c,
                ap50_95=ap95,
                previous_ap50_95=prev_metric(class_metric("test", "ap50_95", c)),
                ap50=_metric(target, ap50_key),
                previous_ap50=prev_metric(ap50_key),
                ap50_lo=_metric(target, f"{ap50_key}_lo"),
                ap50_hi=_metric(target, f"{ap50_key}_hi"),
                delta_lo=_metric(target, f"{diff_key}_lo"),
                delta_hi=_metric(target, f"{diff_key}_hi"),
                test_boxes=split_boxes["test"].get(c) if split_boxes else None,
                train_boxes=split_boxes["train"].get(c) if split_boxes else None,
                instances=n_now,
                instances_added=(
                    n_now - n_prev
                    if n_now is not None and n_prev is not None
                    else n_now
                    if n_now is not None and prev_run is None
                    else None
                ),
            )
        )

    curve = []
    # A report of round N shows the history up to N, not rounds that came after it.
    for r in (r for r in runs if r.round <= target.round):
        labeled: int | None
        try:
            labeled = int(r.params["n_images"])
        except (KeyError, ValueError):
            meta = _read_json(project.store.path(r.digest) / "meta.json", notes)
            labeled = (
                int(meta["n_images"]) if isinstance(meta, dict) and "n_images" in meta else None
            )
        curve.append(
            RoundPoint(
                r.round,
                labeled,
                _metric(r, "test_map50"),
                _metric(r, "test_map50_95"),
                r.promoted,
                _metric(r, "test_map50_lo"),
                _metric(r, "test_map50_hi"),
                _metric(r, "test_map50_95_lo"),
                _metric(r, "test_map50_95_hi"),
            )
        )

    confusion = _confusion(tracker, target, classes, notes)
    effort, disagreements = _effort(project, target, prev_run, v_now, v_prev, classes, notes)
    # The champion after this round's gate: this round's model, or the kept one measured on
    # this round's test images by the paired gate (else its own round's figures).
    kept = paired and not target.promoted
    champ_src, champ_prefix = (target, "compared_test") if kept else (champ, "test")
    gate_diff = _triple(target, "gate_diff_map50_95")
    try:
        epochs: int | None = int(float(target.params.get("train.epochs", "")))
    except ValueError:
        epochs = None
    return ReportData(
        project=cfg.name,
        round=target.round,
        classes=classes,
        generated_at=_now(),
        run_id=target.run_id,
        dataset_digest=target.digest or None,
        candidate_version=versions.get(target.run_id),
        candidate_map50=_metric(target, "test_map50"),
        candidate_map50_95=_metric(target, "test_map50_95"),
        promoted=target.promoted,
        promotion_reason=target.tags.get(TAG + "promotion_reason", ""),
        champion_version=versions.get(champ.run_id) if champ else None,
        champion_round=champ.round if champ else None,
        champion_map50=_metric(champ_src, f"{champ_prefix}_map50"),
        champion_map50_95=_metric(champ_src, f"{champ_prefix}_map50_95"),
        previous_version=versions.get(prev_champ.run_id) if prev_champ else None,
        previous_round=prev_champ.round if prev_champ else None,
        previous_map50=prev_metric("test_map50"),
        previous_map50_95=prev_metric("test_map50_95"),
        labels_added=labels_added,
        labels_total=len(v_now) if v_now is not None else None,
        curve=curve,
        baseline=baseline,
        class_rows=class_rows,
        confusion=confusion,
        effort=effort,
        disagreements=disagreements,
        next_batch=next_batch,
        notes=notes,
        production=production,
        confidence=cfg.evaluation.confidence,
        candidate_map50_ci=_ci(target, "test_map50"),
        candidate_map50_95_ci=_ci(target, "test_map50_95"),
        candidate_recall=_metric(target, "test_recall"),
        candidate_recall_ci=_ci(target, "test_recall"),
        champion_map50_ci=_ci(champ_src, f"{champ_prefix}_map50"),
        champion_map50_95_ci=_ci(champ_src, f"{champ_prefix}_map50_95"),
        gate_verdict=target.tags.get(TAG + "gate_verdict"),
        gate_difference=gate_diff,
        test_images=v_now.split_counts()["test"] if v_now is not None else None,
        preannotation_hidden=_json_list(target.tags.get(TAG + "preannotation_hidden")),
        train_epochs=epochs,
        max_halfwidth=cfg.evaluation.max_halfwidth,
        min_test_boxes=cfg.evaluation.min_test_boxes,
        min_recall=cfg.advice.min_recall,
        min_train_boxes=cfg.advice.min_train_boxes,
        preannotation_min_ap50=cfg.advice.preannotation_min_ap50,
    )


def _ci(run: _Run | None, key: str) -> tuple[float, float] | None:
    lo, hi = _metric(run, f"{key}_lo"), _metric(run, f"{key}_hi")
    return None if lo is None or hi is None else (lo, hi)


def _triple(run: _Run | None, key: str) -> tuple[float, float, float] | None:
    v, ci = _metric(run, key), _ci(run, key)
    return None if v is None or ci is None else (v, ci[0], ci[1])


def _json_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        v = json.loads(text)
    except ValueError:
        return []
    return [str(x) for x in v] if isinstance(v, list) else []


def _split_boxes(
    version: DatasetVersion | None, classes: Sequence[str]
) -> dict[str, dict[str, int]] | None:
    """Boxes per class in the train and test splits of ``version`` (None without it)."""
    if version is None:
        return None
    out = {s: dict.fromkeys(classes, 0) for s in ("train", "test")}
    for r in version.rows:
        if r.split in out:
            for c in r.boxes.class_id.tolist():
                name = version.classes[int(c)]
                if name in out[r.split]:
                    out[r.split][name] += 1
    return out


def _confusion(
    tracker: Tracker, run: _Run, classes: Sequence[str], notes: list[str]
) -> Confusion | None:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="defect-loop-report-") as d:
        try:
            local = tracker.client.download_artifacts(run.run_id, "eval/confusion_matrix.json", d)
        except (MlflowException, OSError):
            return None  # not logged (no test split): the section says "no data yet"
        doc = _read_json(Path(local), notes)
    if not isinstance(doc, dict):
        return None
    names = [str(c) for c in doc.get("classes", classes)]
    matrix = doc.get("matrix")
    n = len(names) + 1
    if (
        not isinstance(matrix, list)
        or len(matrix) != n
        or any(not isinstance(row, list) or len(row) != n for row in matrix)
    ):
        notes.append(f"the confusion matrix of round {run.round} is not {n}x{n}; skipped")
        return None
    return Confusion(names, [[int(v) for v in row] for row in matrix])


def _effort(
    project: Project,
    target: _Run,
    prev_run: _Run | None,
    v_now: DatasetVersion | None,
    v_prev: DatasetVersion | None,
    classes: Sequence[str],
    notes: list[str],
) -> tuple[Effort | None, list[Disagreement]]:
    acc = _Corrections()
    for digest in _version_chain(project, target.digest, prev_run.digest if prev_run else None):
        path = project.store.path(digest) / CORRECTIONS_FILE
        doc = _read_json(path, notes)
        if doc is None:
            continue
        try:
            _merge_corrections(acc, doc, classes)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(
                f"{CORRECTIONS_FILE} of dataset {digest[:12]} is malformed ({exc}); skipped"
            )
    now_ls, prev_ls = _labelstudio_rows(v_now), _labelstudio_rows(v_prev)
    new = {sha: v for sha, v in now_ls.items() if prev_ls.get(sha) != v}
    annotators = Counter(annotator for _, annotator in new.values())
    if not acc.files and not new:
        return None, []
    disagreements = []
    for item in sorted(acc.images, key=lambda i: -float(i.get("disagreement", 0.0) or 0.0))[
        :MAX_DISAGREEMENTS
    ]:
        try:
            disagreements.append(_disagreement(project, item, classes))
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"skipped a disagreement image: {exc}")
    effort = Effort(
        tasks=acc.tasks if acc.files else len(new),
        lead_times=tuple(acc.lead_times),
        per_class=dict(acc.per_class),
        annotators=dict(annotators),
    )
    return effort, disagreements


# ====================================================================== files and MLflow


def report_paths(out_dir: Path, rnd: int | None) -> tuple[Path, Path]:
    """Where `write_report` puts the HTML and Markdown files of round ``rnd``."""
    stem = f"report-round-{rnd}" if rnd is not None else "report-no-model"
    return out_dir / f"{stem}.html", out_dir / f"{stem}.md"


def write_report(
    project: Project, tracker: Tracker, out_dir: Path | None = None, round: int | None = None
) -> tuple[Path, Path]:
    """Collect, render and write the report of ``round`` (default: newest) into ``out_dir``
    (default ``<workspace>/reports``); log both files to the round's training run under
    ``report/``. Returns (html path, markdown path). Raises `ModelError` for an unknown round and
    `ServiceError` when MLflow refuses the artifacts (the files are written by then)."""
    data = collect_report_data(project, tracker, round)
    data = replace(data, rejections=tuple(r.line() for r in project.rejections()))
    out = Path(out_dir) if out_dir is not None else project.cfg.workspace / "reports"
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path = report_paths(out, data.round)
    atomic_write_text(html_path, render_html(data))
    atomic_write_text(md_path, render_markdown(data, html_path.name))
    if data.run_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            for p in (html_path, md_path):
                tracker.client.log_artifact(data.run_id, str(p), REPORT_ARTIFACT_DIR)
        except (MlflowException, OSError) as exc:
            raise ServiceError(
                f"report written to {html_path} and {md_path}, but logging it to MLflow run "
                f"{data.run_id} failed: {exc}; check the tracking server and rerun "
                "`defect-loop report`"
            ) from exc
    return html_path, md_path


def write_next_batch(
    project: Project, ranked: Sequence[ScoredImage], size: int | None = None
) -> Path:
    """Record the batch just pushed (the top ``size`` of ``ranked``, default
    ``select.batch_size``: what `Project.push` sends) as ``<workspace>/next_batch.json`` for the
    report: strategy, size, predicted class mix (boxes shown to labelers: without the classes
    below the pre-annotation usefulness bar, listed as ``hidden_classes``), round."""
    from loop.quality import preannotation_filter, read_quality

    sel = project.cfg.select
    top = list(ranked[: sel.batch_size if size is None else size])
    names = list(project.cfg.classes)
    # What labelers see: `Project.push` leaves out the champion's useless classes.
    rec = read_quality(project.cfg)
    hidden, shown = (
        ([], None) if rec is None else preannotation_filter(project.cfg, rec.model_version)
    )
    mix: Counter[str] = Counter()
    empty = 0
    for s in top:
        det = s.detections if shown is None else shown(s.detections)
        ids = [int(c) for c in det.class_id]
        if not ids:
            empty += 1
        mix.update(names[c] if 0 <= c < len(names) else str(c) for c in ids)
    doc = {
        "strategy": sel.strategy,
        "reduction": sel.reduction,
        "size": len(top),
        "class_mix": {c: mix[c] for c in names if mix[c]}
        | {c: n for c, n in mix.items() if c not in names},
        "images_without_boxes": empty,
        "hidden_classes": hidden,
        "round": project.state.round,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = project.cfg.workspace / NEXT_BATCH_FILE
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path
