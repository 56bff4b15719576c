"""Project configuration: one YAML file loaded into an explicit pydantic-settings object.

Environment variables override the YAML (prefix ``DEFECT_LOOP_``, nested with ``__``, e.g.
``DEFECT_LOOP_LABELSTUDIO__URL``). Secrets come only from the environment: the Label Studio API
token is ``DEFECT_LOOP_LABELSTUDIO__API_TOKEN`` and a YAML file that contains it is refused.
Nothing here runs at import time; call `load_config`.
"""

from __future__ import annotations

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

DEFAULT_CONFIG_NAME = "defect-loop.yaml"


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
    # Labelers may also draw polygons (PolygonLabels); a polygon becomes its bounding box.
    polygons: bool = False
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


class TrainConfig(_Section):
    model: str = "yolov8n.yaml"
    imgsz: int = Field(256, ge=32)
    epochs: int = Field(30, ge=1)
    batch: int = Field(16, ge=1)
    seed: int = 0
    threads: int = Field(2, ge=1)
    warm_start: bool = True
    # Epochs when fine-tuning from the champion (None: same as ``epochs``); fine-tuning
    # converges much faster than training from scratch.
    finetune_epochs: int | None = Field(None, ge=1)
    patience: int = Field(100, ge=0)


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
    strategy: str = "entropy"
    reduction: Literal["max", "mean", "sum", "topk_mean"] = "max"
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
    hybrid_base: str = Field("entropy", description="uncertainty strategy hybrid pre-filters by")
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


class IngestConfig(_Section):
    max_bytes: int = Field(50_000_000, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    min_side: int = Field(8, ge=1)


class PromotionConfig(_Section):
    """The gate that moves the ``champion`` alias, on the frozen test split.

    A candidate is promoted when there is no champion yet, or when its test mAP50-95 is at least
    the champion's minus ``tolerance`` AND no class's test AP50-95 falls by more than
    ``max_class_drop`` (both absolute, in AP units 0..1).
    """

    tolerance: float = Field(0.0, ge=0, le=1)
    max_class_drop: float = Field(0.05, ge=0, le=1)


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


class PrefectConfig(_Section):
    """The local Prefect server `defect-loop prefect-server start` runs (127.0.0.1, SQLite)."""

    port: int = Field(4200, ge=1, le=65535)


class ProjectConfig(BaseSettings):
    """Everything a cycle needs. Paths are absolute after `load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="DEFECT_LOOP_", env_nested_delimiter="__", extra="forbid"
    )

    name: str = "defect-loop"
    classes: list[str]
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
    schedule: ScheduleConfig = ScheduleConfig()
    scoring: ScoringConfig = ScoringConfig()
    prefect: PrefectConfig = PrefectConfig()

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
    def _check_onnx_size(self) -> ProjectConfig:
        if self.scoring.backend != "torch" and self.train.imgsz % 32:
            raise ValueError(
                f"scoring.backend {self.scoring.backend!r} needs train.imgsz to be a multiple of "
                f"32, got {self.train.imgsz}; change one of them"
            )
        return self

    # --- derived paths (the workspace layout lives here and only here) ---
    @property
    def images_dir(self) -> Path:
        """Content-addressed image store; also Label Studio's local-storage folder."""
        return self.workspace / "images"

    @property
    def datasets_dir(self) -> Path:
        return self.workspace / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.workspace / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.workspace / "exports"

    @property
    def scoring_models_dir(self) -> Path:
        return self.workspace / "scoring-models"

    @property
    def yolo_config_dir(self) -> Path:
        return self.workspace / "ultralytics"

    @property
    def state_path(self) -> Path:
        return self.workspace / "state.json"

    @property
    def mlflow_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{(self.workspace / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifact_location(self) -> str:
        return (self.workspace / "mlartifacts").resolve().as_uri()

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
    return cfg


def write_default_config(path: Path, classes: list[str], name: str = "defect-loop") -> None:
    """Write a starter YAML for ``classes``; refuses to overwrite an existing file."""
    if path.exists():
        raise ConfigError(f"{path} already exists; edit it or choose another path")
    doc = {
        "name": name,
        "classes": classes,
        "workspace": ".defect-loop",
        "labelstudio": {"url": "http://127.0.0.1:8080"},
        "train": {"model": "yolov8n.yaml", "imgsz": 256, "epochs": 30},
        "select": {"strategy": "entropy", "reduction": "max", "batch_size": 20},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
