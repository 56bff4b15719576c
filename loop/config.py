"""Project configuration: one YAML file loaded into an explicit pydantic-settings object.

Environment variables override the YAML (prefix ``DEFECT_LOOP_``, nested with ``__``, e.g.
``DEFECT_LOOP_LABELSTUDIO__URL``). Secrets come only from the environment: the Label Studio API
token is ``DEFECT_LOOP_LABELSTUDIO__API_TOKEN`` and a YAML file that contains it is refused.
Nothing here runs at import time; call `load_config`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from loop.errors import ConfigError
from loop.uncertainty import Reduction
from loop.workspace import Workspace

DEFAULT_CONFIG_NAME = "defect-loop.yaml"

# What the labels and models of a project are: boxes (``detect``) or instance polygons with their
# boxes (``segment``). Chosen once per workspace (`loop.project.Project` records it).
TaskType = Literal["detect", "segment"]
TASK_TYPES: tuple[TaskType, ...] = ("detect", "segment")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelStudioConfig(_Section):
    url: str = "http://127.0.0.1:8080"
    username: str = "admin@defect-loop.local"
    # The password and token are secrets: environment only (see module docstring).
    password: SecretStr | None = None
    api_token: SecretStr | None = None
    project_title: str | None = None
    # Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; the images folder must lie below it.
    # Default: the workspace (what `defect-loop services up` starts the server with).
    document_root: Path | None = None
    batch_size: int = Field(500, ge=1, description="tasks per bulk import call")
    timeout_s: float = Field(30.0, gt=0)
    # Labelers may also draw polygons (PolygonLabels). In a detect project a polygon becomes its
    # bounding box; in a segment project (always on there) it is kept as a polygon instance.
    polygons: bool = False
    # Labelers may also paint masks (BrushLabels); `segment` projects only. Pull decodes each
    # brush region with label-studio-sdk's RLE decoder and keeps it as a polygon instance.
    brush: bool = False
    # Progress bars for push (shown only when stderr is a terminal).
    progress: bool = True
    # A pulled annotation with more regions than this is rejected (per task), not imported.
    max_regions: int = Field(1000, ge=1, description="regions per annotation before rejection")
    # Webhook receiver (`defect-loop labelstudio webhook-serve`): a callback runs once this many
    # new or changed annotations arrived. Label Studio must run with SSRF_PROTECTION_ENABLED=false
    # to call a loopback URL; polling stays the default trigger.
    webhook_threshold: int = Field(20, ge=1, description="annotations that trigger the callback")
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(8765, ge=0, le=65535)
    # The URL Label Studio calls (default http://<webhook_host>:<webhook_port>/webhook).
    webhook_url: str | None = None


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # default: sqlite file in the workspace
    experiment: str = "defect-loop"
    registered_model: str = "defect-loop-detector"


# The public Ultralytics releases a user is most likely to name (file name -> sha256), so that a
# missing file gets an error that says what to put there. Never used to download anything.
KNOWN_CHECKPOINTS = {
    "yolov8n.pt": "31e20dde3def09e2cf938c7be6fe23d9150bbbe503982af13345706515f2ef95",
}


@dataclass(frozen=True)
class StartCheckpoint:
    """The verified checkpoint training starts from: its absolute path and sha256 (hex)."""

    path: Path
    sha256: str


class TrainConfig(_Section):
    """How models are trained.

    ``weights``: a local ``.pt`` checkpoint every training starts from (e.g. Ultralytics'
    COCO-pretrained ``yolov8n.pt``; relative paths are relative to the YAML file). Its sha256 is
    checked against ``weights_sha256`` when that is set (`defect-loop init --weights` sets it).
    Without ``weights``, models train from ``model``, an architecture YAML shipped with
    Ultralytics (random initialisation: much slower to learn). Nothing is ever downloaded.

    ``init``: where each round's training starts. ``pretrained``: from ``weights`` (or ``model``)
    every round, ``epochs`` epochs; ``champion``: fine-tune the current champion for
    ``finetune_epochs`` (default ``epochs``), falling back to ``pretrained`` before the first.

    ``min_iterations``: a floor on optimizer steps for small label sets: a round trains
    ``max(epochs, ceil(min_iterations * batch / train images))`` epochs (0: exactly ``epochs``).
    Pretrained detectors fine-tuned on 100 images are still far from converged after 15 epochs
    (6 steps each); larger sets reach the floor within ``epochs``.
    ``freeze``: freeze the first N layers (Ultralytics ``freeze``; 10 = yolov8's backbone).
    ``cache``: keep decoded training images in RAM. ``val_every_epoch``: validate after every
    epoch and keep the best epoch's weights (True), or only after the last (False: faster on small
    sets; the last epoch's weights are kept).
    """

    model: str = "yolov8n.yaml"
    weights: Path | None = None
    weights_sha256: str | None = None
    init: Literal["pretrained", "champion"] = "pretrained"
    imgsz: int = Field(256, ge=32)
    epochs: int = Field(30, ge=1)
    finetune_epochs: int | None = Field(None, ge=1)
    batch: int = Field(16, ge=1)
    seed: int = 0
    threads: int = Field(2, ge=1)
    patience: int = Field(100, ge=0)
    min_iterations: int = Field(0, ge=0)
    freeze: int = Field(0, ge=0)
    cache: bool = False
    val_every_epoch: bool = True

    @model_validator(mode="before")
    @classmethod
    def _warm_start_is_init(cls, data: Any) -> Any:
        # `warm_start: true|false` (before `init` existed) still reads as the same policy.
        if isinstance(data, dict) and "warm_start" in data:
            data = dict(data)
            warm = data.pop("warm_start")
            if "init" in data:
                raise ValueError("give train.init, not both train.init and train.warm_start")
            data["init"] = "champion" if warm else "pretrained"
        return data

    @field_validator("model")
    @classmethod
    def _model_is_yaml(cls, v: str) -> str:
        if not v.endswith((".yaml", ".yml")):
            raise ValueError(
                f"train.model={v!r} must name an architecture YAML such as 'yolov8n.yaml'; to "
                f"start from a checkpoint, set train.weights to the local path of {v!r}"
            )
        return v

    @field_validator("weights")
    @classmethod
    def _weights_is_pt(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix != ".pt":
            raise ValueError(f"train.weights={str(v)!r} must be a PyTorch .pt checkpoint")
        return v

    @field_validator("weights_sha256")
    @classmethod
    def _sha_is_hex(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().lower()
        if len(v) != 64 or any(ch not in "0123456789abcdef" for ch in v):
            raise ValueError(f"train.weights_sha256 must be 64 hex digits, got {v!r}")
        return v

    def start_checkpoint(self) -> StartCheckpoint | None:
        """The verified ``weights`` file, or None when training starts from ``model``.

        Raises `ConfigError` when the file is missing (saying where to put it: nothing is
        downloaded) or when its sha256 differs from ``weights_sha256``.
        """
        if self.weights is None:
            return None
        from loop.images import sha256_file

        path = Path(self.weights).expanduser()
        if not path.is_file():
            known = KNOWN_CHECKPOINTS.get(path.name)
            hint = f" (Ultralytics' release {path.name} has sha256 {known})" if known else ""
            raise ConfigError(
                f"train.weights: no checkpoint at {path.resolve()}. defect-loop never downloads "
                f"weights: put the file there{hint}, point train.weights at it, or remove "
                f"train.weights to train {self.model} from random weights"
            )
        digest = sha256_file(path)
        if self.weights_sha256 is not None and digest != self.weights_sha256:
            raise ConfigError(
                f"train.weights {path.resolve()} has sha256 {digest}, but the config pins "
                f"train.weights_sha256 {self.weights_sha256}: the file changed or is not the one "
                "you named; restore it, or set train.weights_sha256 to the new hash if the change "
                "is intended"
            )
        return StartCheckpoint(path.resolve(), digest)

    def epochs_for(self, n_train: int, champion: bool = False) -> int:
        """Epochs of one training on ``n_train`` images: ``finetune_epochs`` (when fine-tuning
        the ``champion`` and set) or ``epochs``, raised to reach ``min_iterations`` steps."""
        base = self.finetune_epochs if champion and self.finetune_epochs else self.epochs
        if self.min_iterations <= 0 or n_train <= 0:
            return base
        steps_per_epoch = math.ceil(n_train / self.batch)
        return max(base, math.ceil(self.min_iterations / steps_per_epoch))

    def describe_start(self) -> str:
        """What a ``pretrained`` round starts from, for logs: the checkpoint or the YAML."""
        if self.weights is None:
            return f"{self.model} (random weights)"
        return str(self.weights)


class SplitConfig(_Section):
    """Fractions of images per split, assigned from the image hash (frozen forever)."""

    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _leave_room_for_train(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError(
                f"split.val + split.test must be below 1 so that some images are left to train "
                f"on, got {self.val} + {self.test} = {self.val + self.test:g}"
            )
        return self


class SelectConfig(_Section):
    """How images are chosen for labeling (see `loop.selection` for the strategies).

    ``strategy``: a scorer (``entropy``, ``calibrated_entropy``, ``margin``, ...) ranked by its
    score, or a selector (``diversity``, ``hybrid``, ``class_quota``, ``class_diversity``) that
    ranks by ``base_strategy``. Unknown names are refused when the config is loaded.
    """

    strategy: str = "entropy"
    reduction: Reduction = "max"
    batch_size: int = Field(20, ge=1, description="images pushed to Label Studio per cycle")
    candidate_conf: float = Field(0.01, gt=0, lt=1, description="lowest score kept for scoring")
    min_candidates: int = Field(
        3, ge=0, description="images with fewer boxes above candidate_conf keep their best N"
    )
    preannotation_conf: float = Field(
        0.25, gt=0, lt=1, description="lowest score shown to labelers"
    )
    seed: int = 0
    topk: int = Field(3, ge=1, description="k of the topk_mean reduction")
    empty_score: float = Field(
        0.0, description="score of an image with no candidate box at all (explicit, never NaN)"
    )
    base_strategy: str = Field(
        "entropy", description="the scorer that hybrid, class_quota and class_diversity rank by"
    )
    hybrid_top_m: int | None = Field(
        None, ge=1, description="hybrid shortlist size M (None: hybrid_factor x batch_size)"
    )
    hybrid_factor: float = Field(5.0, ge=1.0, description="M = factor x batch when top_m is None")
    tta: list[str] = Field(
        default_factory=lambda: ["hflip", "scale:0.75", "scale:1.25"],
        description="views for localization_stability: hflip, vflip, scale:<factor>",
    )
    committee_size: int = Field(
        3, ge=2, description="checkpoints in a committee (the newest ones, current included)"
    )
    difficulty_prior: float = Field(
        10.0,
        ge=0,
        description="validation boxes of pseudo-evidence that pull a class's AP to the mean "
        "(class difficulty of calibrated_entropy, class_quota, class_diversity)",
    )

    @model_validator(mode="before")
    @classmethod
    def _hybrid_base_is_base_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hybrid_base" in data:
            data = dict(data)
            if "base_strategy" in data:
                raise ValueError("give select.base_strategy, not also select.hybrid_base")
            data["base_strategy"] = data.pop("hybrid_base")
        return data

    @model_validator(mode="after")
    def _known_strategy(self) -> SelectConfig:
        from loop.errors import StrategyError
        from loop.selection import resolve_strategy

        try:
            resolve_strategy(self.strategy, self.base_strategy)
        except StrategyError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("tta")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        for aug in v:
            ok = aug in ("hflip", "vflip")
            if aug.startswith("scale:"):
                try:
                    ok = 0.25 <= float(aug.split(":", 1)[1]) <= 4.0
                except ValueError:
                    ok = False
            if not ok:
                raise ValueError(
                    f"select.tta view {aug!r} is not 'hflip', 'vflip' or 'scale:<factor in "
                    "[0.25, 4]>'"
                )
        return v


class IngestConfig(_Section):
    max_bytes: int = Field(50_000_000, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    min_side: int = Field(8, ge=1)


class PromotionConfig(_Section):
    """The gate that moves the ``champion`` alias, on the frozen test split.

    A candidate is promoted when there is no champion yet, or when, with both models evaluated
    on the same test images, the lower bound of the paired-bootstrap interval of its test
    mAP50-95 difference (candidate minus champion) is at least ``-tolerance`` and no class's
    AP50-95 drop is significant (its whole interval lies above 0) and larger than
    ``max_class_drop`` (both absolute, in AP units 0..1; the bootstrap settings are in
    `EvaluationConfig`). With ``tolerance`` 0 a candidate must be measurably better: a
    difference within noise keeps the champion.
    """

    tolerance: float = Field(0.0, ge=0, le=1)
    max_class_drop: float = Field(0.05, ge=0, le=1)


class EvaluationConfig(_Section):
    """How sure the test metrics are (`loop.evaluation`): a percentile bootstrap over the test
    images, ``resamples`` replicates drawn with ``seed``, two-sided intervals at ``confidence``.

    Test split health: `defect-loop status` and the report warn when the test mAP50 interval's
    half-width exceeds ``max_halfwidth`` (smaller differences cannot be told apart) and when a
    class has fewer than ``min_test_boxes`` boxes in the test split.
    """

    resamples: int = Field(1000, ge=100, description="bootstrap replicates")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided interval level")
    seed: int = 0
    max_halfwidth: float = Field(0.05, gt=0, le=1, description="warn above this mAP50 half-width")
    min_test_boxes: int = Field(10, ge=0, description="warn for a class with fewer test boxes")


class AdviceConfig(_Section):
    """Thresholds of the report's "what to do next" rules about the model itself.

    ``min_recall``: below this test recall the model "finds almost nothing". ``min_train_boxes``:
    a class with fewer training boxes has too few labels to learn. ``preannotation_min_ap50``:
    the usefulness bar of pre-annotations: a class whose champion test AP50 is below it gets no
    suggested boxes in Label Studio (0 shows every class); the report lists those classes.
    """

    min_recall: float = Field(0.05, ge=0, le=1)
    min_train_boxes: int = Field(20, ge=0)
    preannotation_min_ap50: float = Field(0.1, ge=0, le=1)


class ScheduleConfig(_Section):
    """When `defect-loop serve` starts cycles by itself, and what a second cycle does meanwhile.

    ``cycle_cron``: cron string (e.g. ``"0 2 * * *"``, nightly at 02:00 in ``timezone``) or None.
    ``count_trigger``: start a cycle once at least this many new annotations exist since the
    last training (checked every ``check_interval_s`` seconds, or when the webhook receiver asks).
    ``concurrency``: a cycle started while another runs ``wait``s (up to ``wait_timeout_s``)
    or is ``skip``ped; two cycles never overlap.
    """

    cycle_cron: str | None = None
    timezone: str = "UTC"
    count_trigger: int | None = Field(None, ge=1)
    check_interval_s: float = Field(300.0, ge=5)
    concurrency: Literal["wait", "skip"] = "skip"
    wait_timeout_s: float = Field(6 * 3600.0, gt=0)

    @field_validator("cycle_cron")
    @classmethod
    def _check_cron(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = " ".join(v.split())
        if not (v.startswith("@") or len(v.split()) in (5, 6)):
            raise ValueError(
                f"cycle_cron {v!r} is not a cron string: give 5 fields like '0 2 * * *'"
            )
        return v


class ScoringConfig(_Section):
    """How the pool is scored: in batches of ``batch_size`` images, one task each; on a Dask
    cluster when ``dask_address`` (e.g. ``tcp://scheduler:8786``) is set, else in-process.
    Per-image scores do not depend on where a batch runs (keep ``batch_size`` a multiple of 16,
    the model's predict chunk, so they also match the unbatched path).

    ``backend``: ``torch`` runs the champion's weights; ``onnx`` an ONNX Runtime export of them
    (same scores, ``train.imgsz`` must be a multiple of 32); ``onnx-int8`` a static int8
    quantization of that export, calibrated on up to ``calibration_images`` labeled images:
    about 2-2.7x faster than torch on CPUs with AVX-512 VNNI, with slightly moved scores
    (measured by ``bench/scoring_throughput.py``). ONNX models are made once per champion and
    kept under ``<workspace>/scoring-models``; both need ``pip install 'defect-loop[onnx]'``."""

    batch_size: int = Field(256, ge=1)
    dask_address: str | None = None
    backend: Literal["torch", "onnx", "onnx-int8"] = "torch"
    calibration_images: int = Field(64, ge=1)

    @field_validator("dask_address")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        if v is None:
            return None
        return v.strip() or None


class DeployConfig(_Section):
    """`defect-loop deploy`: the production bundle of the champion (see `loop.deploy`).

    ``int8``: also quantize the bundle's ONNX model to int8 and score with it (None: when
    ``scoring.backend`` is ``onnx-int8``). ``defect_conf``: a box at or above this confidence is
    a defect (None: ``select.preannotation_conf``). ``registered_model``: the MLflow registered
    model whose ``production`` alias names the bundle in use (None:
    ``<mlflow.registered_model>-bundle``). The monitor's reference is drawn from the champion's
    dataset version: up to ``reference_images`` held-out (val + test) images for the two-sample
    tests, up to ``neighbour_images`` train images for novelty; a version with fewer than
    ``min_reference`` held-out images is refused."""

    int8: bool | None = None
    defect_conf: float | None = Field(None, gt=0, lt=1)
    registered_model: str | None = None
    reference_images: int = Field(500, ge=2)
    neighbour_images: int = Field(2000, ge=1)
    min_reference: int = Field(50, ge=2)
    seed: int = 0


class MonitorConfig(_Section):
    """`defect-loop monitor`: drift and novelty checks on production images (see `loop.monitor`).

    Images are checked in windows of ``window_size`` against the production bundle's reference;
    a window alerts when any of its tests has a p-value below ``alpha`` / (number of tests)
    (Bonferroni: a window without drift alerts with probability at most ``alpha``).
    ``permutations``: of the MMD and class-mix tests (seeded by ``seed`` and the window index;
    at least ``10 / alpha``, or they could never alert). ``novelty_quantile``: the novelty test
    counts the images whose embedding is farther from every training image than this quantile
    of the reference images' distances (0.95: with a few hundred reference images a higher
    quantile rests on a handful of them, and the exact test loses power). Up to
    ``queue_per_window`` images of a window beyond the reference's ``queue_quantile`` of novelty
    or of uncertainty go into the pool, most extreme first, and lead the next push.
    ``watch_dir``: the folder `defect-loop monitor --watch` and the served deployment poll every
    ``interval_s`` seconds."""

    watch_dir: Path | None = None
    interval_s: float = Field(60.0, ge=1)
    window_size: int = Field(200, ge=10)
    alpha: float = Field(0.01, gt=0, lt=1)
    permutations: int = Field(2000, ge=99)
    seed: int = 0
    novelty_quantile: float = Field(0.95, gt=0, lt=1)
    queue_quantile: float = Field(0.99, gt=0, lt=1)
    queue_per_window: int = Field(20, ge=0)
    pca_dims: int = Field(32, ge=1)
    min_flush: int = Field(10, ge=2, description="smallest partial window --flush checks")


class QualityConfig(_Section):
    """Overlap on purpose and consensus at pull (`loop.consensus`; see README "Overlap,
    consensus and the review queue").

    ``overlap_share``: the share (0-1) of each push's NEW tasks that must be labeled by
    ``overlap_annotators`` different annotators (0: none; the count is rounded half up).
    ``overlap_rule``: which tasks: ``random`` (seeded by ``seed`` and the round) or
    ``uncertain`` (the highest priorities of the batch). ``overlap_first``: Label Studio's
    "show overlap first" (annotators get the tasks that still need another annotator first).
    ``agreement_threshold``: tasks whose annotators' mean pairwise F1 (same class, IoU >=
    ``match_iou``, the correction analytics' matching) is below it go to the review queue
    instead of the dataset version. ``merge_rule``: how agreeing annotators' boxes become one
    label: ``fusion`` (matched same-class boxes that a strict majority of annotators drew,
    coordinates averaged) or ``latest`` (the most recently updated annotation).
    """

    overlap_share: float = Field(0.0, ge=0, le=1)
    overlap_annotators: int = Field(2, ge=2, le=20)
    overlap_rule: Literal["random", "uncertain"] = "random"
    overlap_first: bool = True
    agreement_threshold: float = Field(0.7, ge=0, le=1)
    match_iou: float = Field(0.5, gt=0, le=1)
    merge_rule: Literal["fusion", "latest"] = "fusion"
    seed: int = Field(0, ge=0)


class LabelReviewConfig(_Section):
    """`defect-loop review-labels` (`loop.review_tasks`): the labeled images whose labels are
    most likely wrong go back to Label Studio as review tasks.

    ``folds``: cross-fitting folds; each costs one training like a round's (``train.epochs``
    from the start checkpoint). ``top_k``: suspects pushed per run, most suspect first.
    ``seed``: fold assignment (None: ``train.seed``). ``shown_conf``: the lowest confidence of
    the model boxes shown beside the label (None: ``select.preannotation_conf``).
    ``every_cycle``: the cycle runs the finder after training and pushes its suspects (off by
    default: it costs ``folds`` trainings; a version already checked trains nothing, see
    `loop.crossfit.FoldCache`)."""

    folds: int = Field(5, ge=2, description="cross-fitting folds (one training each)")
    top_k: int = Field(20, ge=1, description="suspects pushed as review tasks per run")
    seed: int | None = None
    shown_conf: float | None = Field(None, gt=0, lt=1)
    every_cycle: bool = False


class PrefectConfig(_Section):
    """The local Prefect server `defect-loop prefect-server start` runs (127.0.0.1, SQLite)."""

    port: int = Field(4200, ge=1, le=65535)


class ProjectConfig(BaseSettings):
    """Everything a cycle needs. Paths are absolute after `load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="DEFECT_LOOP_", env_nested_delimiter="__", extra="forbid"
    )

    name: str = "defect-loop"
    task: TaskType = "detect"
    classes: list[str]
    # Keypoints per class, in slot order: ``{crack: [tip_a, tip_b], pit: [centre]}``
    # (`loop.keypoints`). Labeled in Label Studio and versioned; not predicted (no pose model).
    keypoints: dict[str, list[str]] = Field(default_factory=dict)
    workspace: Path = Path(".defect-loop")
    guidelines: str = (
        "Draw a tight box around every visible defect and pick its class. "
        "If the image shows no defect, submit it with no regions: that is a defect-free example."
    )
    labelstudio: LabelStudioConfig = LabelStudioConfig()
    mlflow: MlflowConfig = MlflowConfig()
    train: TrainConfig = TrainConfig()
    split: SplitConfig = SplitConfig()
    select: SelectConfig = SelectConfig()
    ingest: IngestConfig = IngestConfig()
    promotion: PromotionConfig = PromotionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    advice: AdviceConfig = AdviceConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    scoring: ScoringConfig = ScoringConfig()
    prefect: PrefectConfig = PrefectConfig()
    deploy: DeployConfig = DeployConfig()
    monitor: MonitorConfig = MonitorConfig()
    quality: QualityConfig = QualityConfig()
    label_review: LabelReviewConfig = LabelReviewConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the YAML (passed as init kwargs).
        return (env_settings, init_settings)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("classes must list at least one class name")
        stripped = [c.strip() for c in v]
        if any(not c for c in stripped):
            raise ValueError("class names must not be empty")
        if len(set(stripped)) != len(stripped):
            raise ValueError(f"class names must be unique, got {stripped}")
        return stripped

    @model_validator(mode="after")
    def _segment_draws_polygons(self) -> ProjectConfig:
        if self.task == "segment":
            if "polygons" in self.labelstudio.model_fields_set and not self.labelstudio.polygons:
                raise ValueError(
                    "task: segment needs polygons in Label Studio; remove "
                    "labelstudio.polygons: false (a segment project always offers PolygonLabels)"
                )
            self.labelstudio.polygons = True
            if self.scoring.backend != "torch":
                # The ONNX scoring path decodes boxes only: masks (pre-annotation polygons,
                # mask_stability) need the segmentation model itself.
                raise ValueError(
                    f"task: segment scores with the segmentation model itself; set "
                    f"scoring.backend: torch (got {self.scoring.backend!r})"
                )
        return self

    @model_validator(mode="after")
    def _mask_strategies_need_segment(self) -> ProjectConfig:
        from loop.uncertainty import MASK_STRATEGIES

        if self.task != "segment":
            for key in ("strategy", "base_strategy"):
                name = getattr(self.select, key)
                if name in MASK_STRATEGIES:
                    raise ValueError(
                        f"select.{key}: {name} reads the model's instance masks, which only a "
                        "task: segment project has; choose a box strategy (e.g. "
                        "localization_stability)"
                    )
        return self

    @model_validator(mode="after")
    def _check_keypoints_and_brush(self) -> ProjectConfig:
        from loop.keypoints import check_keypoint_config

        try:
            check_keypoint_config(self.keypoints, self.classes)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.labelstudio.brush and self.task != "segment":
            raise ValueError(
                "labelstudio.brush needs task: segment (a brush mask is kept as a polygon "
                "instance); remove labelstudio.brush or start a segment project"
            )
        return self

    @model_validator(mode="after")
    def _check_onnx_size(self) -> ProjectConfig:
        if self.scoring.backend != "torch" and self.train.imgsz % 32:
            raise ValueError(
                f"scoring.backend {self.scoring.backend!r} needs train.imgsz to be a multiple of "
                f"32, got {self.train.imgsz}; change one of them"
            )
        return self

    # --- derived paths and names ---
    @property
    def paths(self) -> Workspace:
        """Every path under the workspace (`loop.workspace`)."""
        return Workspace(self.workspace)

    @property
    def mlflow_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{self.paths.mlflow_db.resolve()}"

    @property
    def mlflow_artifact_location(self) -> str:
        return self.paths.mlflow_artifacts.resolve().as_uri()

    @property
    def ls_document_root(self) -> Path:
        return self.labelstudio.document_root or self.workspace

    @property
    def ls_project_title(self) -> str:
        return self.labelstudio.project_title or f"defect-loop: {self.name}"

    def class_index(self, name: str) -> int:
        """The fixed id of class ``name``; unknown names raise `UnknownLabelError`."""
        from loop.errors import UnknownLabelError

        try:
            return self.classes.index(name)
        except ValueError:
            raise UnknownLabelError(
                f"label {name!r} is not in the project's classes {self.classes}; "
                "fix the label or add the class to the config"
            ) from None


_SECRET_KEYS = {("labelstudio", "api_token"), ("labelstudio", "password")}


def load_config(path: Path | str, **overrides: Any) -> ProjectConfig:
    """Load ``path`` (YAML), apply environment overrides, resolve paths against the file's folder.

    Raises `ConfigError` when the file is missing, malformed, holds a secret or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found; create one with `defect-loop init` or pass --config"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    for section, key in _SECRET_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(
                f"{path} sets {section}.{key}: secrets must not live in the YAML; set "
                f"DEFECT_LOOP_{section.upper()}__{key.upper()} in the environment instead"
            )
    data.update(overrides)
    try:
        cfg = ProjectConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path} is invalid:\n{exc}") from exc
    if not cfg.workspace.is_absolute():
        cfg.workspace = (path.parent / cfg.workspace).resolve()
    watch = cfg.monitor.watch_dir
    if watch is not None and not watch.is_absolute():
        cfg.monitor.watch_dir = (path.parent / watch).resolve()
    weights = cfg.train.weights
    if weights is not None and not weights.expanduser().is_absolute():
        cfg.train.weights = (path.parent / weights).resolve()
    # Named here, checked here: a missing or changed checkpoint stops every command at once.
    cfg.train.start_checkpoint()
    return cfg


def write_default_config(
    path: Path,
    classes: list[str],
    name: str = "defect-loop",
    weights: Path | None = None,
    task: TaskType = "detect",
) -> TrainConfig:
    """Write a starter YAML for ``classes``; refuses to overwrite an existing file.

    ``task``: ``detect`` (boxes) or ``segment`` (instance polygons); fixed once the workspace
    holds anything.

    ``weights``: a local checkpoint the first training starts from (later rounds fine-tune the
    champion: ``init: champion``); it must exist, and its sha256 is pinned in the YAML
    (``train.weights_sha256``). Without it training starts from the
    ``yolov8n.yaml`` architecture (random weights). Returns the written ``train`` section.
    """
    if path.exists():
        raise ConfigError(f"{path} already exists; edit it or choose another path")
    if task not in TASK_TYPES:
        raise ConfigError(f"task must be one of {', '.join(TASK_TYPES)}, got {task!r}")
    train: dict[str, Any] = {"model": "yolov8n.yaml", "imgsz": 256, "epochs": 30}
    if weights is not None:
        start = TrainConfig(weights=Path(weights).expanduser().resolve()).start_checkpoint()
        if start is None:  # pragma: no cover - weights was given
            raise ConfigError("no checkpoint given")
        folder = Path(path).expanduser().resolve().parent
        train.update(
            {
                "weights": os.path.relpath(start.path, folder),
                "weights_sha256": start.sha256,
                # Fine-tuning the champion beats restarting from the checkpoint every round at
                # the same training time per round (README, "Which start production should use").
                "init": "champion",
                "epochs": 20,
                "finetune_epochs": 10,
                "min_iterations": 300,
            }
        )
    doc = {
        "name": name,
        "task": task,
        "classes": classes,
        "workspace": ".defect-loop",
        "labelstudio": {"url": "http://127.0.0.1:8080"},
        "train": train,
        # Plain entropy starves the classes the model misses (README, Benchmarks: -54 % label
        # savings on NEU-DET); class-aware diversity kept pace with random there.
        "select": {"strategy": "class_diversity", "reduction": "max", "batch_size": 20},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return TrainConfig(**{k: v for k, v in train.items() if k != "weights"})
