"""What the report shows, as plain frozen dataclasses (`ReportData` and its parts), and the
thresholds of the "got worse" flag and of the what-to-do-next rules. The collector
(`loop.report.collect`) fills them; the renderers read nothing else."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from loop.annotator_quality import LabelQuality

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
REJECTIONS_LISTED = 50  # rejected Label Studio tasks listed by name
MAX_NOVEL = 10

MAX_ALERTS = 20

TASK_LINKS = 30  # task links listed per annotator and error kind (all are in the MLflow table)

CONFUSED_PAIRS = 3  # class swaps shown per annotator

NO_PRODUCTION = "no production data yet"

# The tests of a window, grouped for the production plot (the smallest p-value of a group is drawn).
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
    # Segment projects: the instance's outline, rings of pixel (x, y) points (even-odd fill);
    # empty for a box without one.
    rings: Sequence[Sequence[tuple[float, float]]] = ()


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


@dataclass(frozen=True)
class LabelQualityData:
    """The "Label quality" section: ``quality`` of the annotation log (no tasks while there is
    no log; None when it could not be read) and ``task_url``, the Label Studio address a task id is
    appended to (``<labelstudio.url>/projects/<id>/data/?task=``; None while the workspace has
    no Label Studio project)."""

    quality: LabelQuality | None
    task_url: str | None = None

    def link(self, task_id: int) -> str | None:
        return None if self.task_url is None else f"{self.task_url}{int(task_id)}"


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
    production: ProductionData | None = None  # the monitor's records (`collect_production`)
    # Label Studio tasks that pulls rejected and that have not changed since ("Label Studio task
    # <id>: <reason>", see `Project.rejections`).
    rejections: Sequence[str] = ()
    label_quality: LabelQualityData | None = None  # the annotation log's figures
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
