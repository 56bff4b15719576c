"""One defect-loop project on disk: its pool, dataset versions, state and the steps of a cycle.

Each public method of `Project` is one step that crosses one I/O boundary (ingest, train, predict,
push, pull, log), so that `flows/` can wrap each in a Prefect task and the CLI can call them
directly. Push and pull, the steps that cross into the labeling backend, live in `loop.sync`.
Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import yaml

from loop import sync
from loop.config import ProjectConfig
from loop.datasets import (
    DatasetStore,
    DatasetVersion,
    LabeledImage,
    assign_split,
    export_yolo,
)
from loop.detections import Detections
from loop.errors import (
    ConfigError,
    ConversionError,
    DatasetError,
    ImageError,
    ModelError,
    TaskTypeChangedError,
)
from loop.formats.labelstudio import local_file_url
from loop.formats.yolo import pose_slots
from loop.images import (
    ImagePool,
    IngestReport,
    Rejected,
    atomic_write_text,
    iter_image_files,
    sha256_file,
)
from loop.label_import import mask_label_rows, yolo_label_rows
from loop.labeling import LabelingBackend, PushSummary
from loop.ledger import RejectionLog, TaskRejection
from loop.mask_import import pair_mask_files
from loop.quality import gate_and_record, split_status
from loop.scheduling import workspace_lock
from loop.sync import PullOutcome

if TYPE_CHECKING:
    from loop.labelstudio import LabelStudioGateway
    from loop.model import EvalResult, TrainResult
    from loop.tracking import Champion, Tracker

Progress = Callable[[int, int], None]


class ChampionSource(Protocol):
    """Where `Project.fit` finds the champion to fine-tune (a `loop.tracking.Tracker`, or the
    oracle replay's newest model)."""

    def champion(self) -> Champion | None: ...


@dataclass
class ProjectState:
    """Mutable bookkeeping persisted in ``state.json`` (everything else is immutable or derived)."""

    current_version: str | None = None
    round: int = 0
    ls_project_id: int | None = None
    pending: dict[str, int] = field(default_factory=dict)  # sha256 -> Label Studio task id
    last_model_version: str | None = None
    # Incremental pull: the newest task ``updated_at`` seen (UTC, Label Studio's filter format)
    # and the "<project id>:<classes>" it belongs to (another project or class list: pull all).
    pull_cursor: str | None = None
    pull_cursor_scope: str | None = None
    # The project's task type (`loop.config.TaskType`), fixed when the state is first written. A
    # state.json written before task types existed holds boxes only: "detect".
    task: str = "detect"
    # The consensus review queue (`loop.sync.pull`): sha256 -> Label Studio task id of the tasks
    # whose annotators disagree, until a lead's ground truth (or a deletion) takes them out.
    review: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    model_version: str
    promoted: bool
    reason: str
    dataset_digest: str
    val_map50: float
    val_map50_95: float
    test_map50: float | None
    test_map50_95: float | None
    weights: Path
    # Segment projects: the test mask figures (what the gate compared); None for detectors.
    test_mask_map50: float | None = None
    test_mask_map50_95: float | None = None


@dataclass(frozen=True)
class FitResult:
    """One training: the version it saw, Ultralytics' result, the test metrics, and where it
    started: ``init`` (``"champion"``, ``"pretrained"`` or ``"scratch"``), ``init_version`` (the
    champion's model version for ``"champion"``) and ``init_sha256`` (the starting ``.pt``; None
    from scratch)."""

    version: DatasetVersion
    result: TrainResult
    test: EvalResult | None
    init_version: str | None
    round_index: int
    init: str = "scratch"
    init_sha256: str | None = None


@dataclass(frozen=True)
class ScoredImage:
    sha256: str
    score: float
    detections: Detections  # what labelers will see (>= preannotation_conf)


class Project:
    """Bundles a config with the on-disk workspace it describes."""

    def __init__(self, cfg: ProjectConfig) -> None:
        self.cfg = cfg
        cfg.workspace.mkdir(parents=True, exist_ok=True)
        self.pool = ImagePool(cfg.paths.images, cfg.paths.pool)
        self.store = DatasetStore(cfg.paths.datasets)
        self.state = self._load_state()
        # Called with the holder's description when a write has to wait for the workspace lock.
        self.on_wait: Callable[[str], None] | None = None

    # ---------------------------------------------------------------- state
    def reload(self) -> None:
        """Re-read the pool and ``state.json`` (another command may have changed them). The
        state object is updated in place, so references to it stay valid."""
        self.pool = ImagePool(self.cfg.paths.images, self.cfg.paths.pool)
        fresh = self._load_state()
        for f in fields(ProjectState):
            setattr(self.state, f.name, getattr(fresh, f.name))

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """One writer at a time: hold the workspace's cycle lock (`loop.scheduling.CycleLock`,
        the one every flow takes) while the block runs, waiting up to
        ``schedule.wait_timeout_s`` for another holder. When this call took the lock, the pool
        and state are re-read first, so nothing another command wrote meanwhile is overwritten.
        Re-entrant: inside a flow or method that already holds the lock it only runs the block.
        The first write to a workspace records the config's task type in ``state.json``.
        """
        with workspace_lock(
            self.cfg.workspace, what, self.cfg.schedule.wait_timeout_s, on_wait=self.on_wait
        ) as took:
            if took:
                self.reload()
            if not self.cfg.paths.state.exists():
                self.save_state()  # the first write fixes the project's task type
            yield

    def _load_state(self) -> ProjectState:
        """``state.json``, or a fresh state for the config's task; refuses a changed task type."""
        if not self.cfg.paths.state.exists():
            return ProjectState(task=self.cfg.task)
        state = ProjectState(**json.loads(self.cfg.paths.state.read_text()))
        if state.task != self.cfg.task:
            raise TaskTypeChangedError(
                f"the workspace {self.cfg.workspace} was made for task {state.task!r} but the "
                f"config says task: {self.cfg.task}; the task type is chosen once per project: "
                f"set task: {state.task} again, or start a new project (another workspace) "
                f"for {self.cfg.task}"
            )
        return state

    def save_state(self) -> None:
        atomic_write_text(self.cfg.paths.state, json.dumps(asdict(self.state), indent=1))

    def current_version(self) -> DatasetVersion | None:
        if self.state.current_version is None:
            return None
        return self.store.load(self.state.current_version)

    def set_version(self, version: DatasetVersion) -> None:
        """Save ``version`` in the store and make it the project's current version."""
        self.store.save(version)
        self.state.current_version = version.digest
        self.save_state()

    # ---------------------------------------------------------------- ingest
    def ingest(
        self,
        source: Path,
        labels_dir: Path | None = None,
        label_limit: int | None = None,
        seed: int = 0,
        on_progress: Callable[[Path], None] | None = None,
        *,
        pose: bool = False,
    ) -> tuple[IngestReport, DatasetVersion | None]:
        """Add images below ``source`` to the pool. With ``labels_dir`` (YOLO txt), import those
        labels as a new dataset version: all of them, or a seeded random ``label_limit`` of them
        (the seed set of an active-learning run). ``pose``: the label files hold Ultralytics
        pose lines in the slot order of the config's ``keypoints`` (what ``datasets export
        --pose`` writes): boxes and their keypoints are imported.

        A label file belongs to the image at the same relative path (`loop.labelfiles`). Label
        files that cannot be used (a bad line, unreadable, ambiguous, two differing labels for one
        image under two names, no image) are listed in ``report.label_problems`` and in
        `status`; they never stop the others. Holds the workspace lock (one writer at a time).
        """
        if not source.exists():
            raise ImageError(f"{source} does not exist; pass a folder of images")
        if labels_dir is not None and not labels_dir.is_dir():
            raise ImageError(
                f"labels folder {labels_dir} does not exist; pass a folder of YOLO .txt"
            )
        slots: tuple[tuple[str, ...], ...] = ()
        if pose:
            try:
                slots = pose_slots(self.cfg.classes, self.cfg.keypoints)
            except ConversionError as exc:
                raise ConfigError(f"ingest of pose labels: {exc}") from None
        files = list(iter_image_files(source))
        with self.writing("ingest"):
            report = self.pool.ingest(files, self.cfg.ingest, on_progress)
            if labels_dir is None:
                return report, None
            found = yolo_label_rows(
                source,
                files,
                labels_dir,
                report,
                self.cfg.classes,
                self.cfg.task,
                self.cfg.split,
                slots,
            )
            labeled = found.rows
            self._record_label_problems(report, found.problems)
            if label_limit is not None and label_limit < len(labeled):
                rng = np.random.default_rng(seed)
                keep = sorted(rng.choice(len(labeled), size=label_limit, replace=False).tolist())
                labeled = [labeled[i] for i in keep]
            return report, self._add_labels(labeled)

    def _record_label_problems(self, report: IngestReport, problems: list[Rejected]) -> None:
        """List label files that were not imported in ``report`` and in the pool (`status`)."""
        if problems:
            report.label_problems.extend(problems)
            self.pool.record_rejected(problems)
            self.pool.save()

    def _add_labels(self, rows: list[LabeledImage]) -> DatasetVersion | None:
        """A new current version with ``rows`` added (or replacing the same images); the
        current version when nothing changed; None (no version) when there are no rows."""
        if not rows:
            return None
        current = self.current_version()
        if current is None:
            version = DatasetVersion.create(self.cfg.classes, rows)
        else:
            version = current.with_labels(rows)
        if current is not None and version.digest == current.digest:
            return current
        self.set_version(version)
        return version

    def ingest_masks(
        self,
        source: Path,
        folder_classes: Mapping[str, str] | None = None,
        threshold: float = 128,
        min_area: int = 4,
        on_progress: Callable[[Path], None] | None = None,
    ) -> tuple[IngestReport, DatasetVersion | None]:
        """Add the images below ``source`` to the pool and import their mask PNGs as labels
        (layout and classes: `loop.mask_import`; masks to polygons: `loop.formats.masks`).

        Each 8-connected region of at least ``min_area`` pixels (value >= ``threshold``)
        becomes one instance of the image folder's class: polygon and box in a ``segment``
        project, its box only in a ``detect`` one. An all-zero mask labels the image
        defect-free. Regions dropped as too small are recorded in the row's provenance
        (``dropped_regions``, kept in the manifest) and listed in ``report.dropped_regions``; a
        mask that cannot be used (unreadable, another size, no class for its folder, values only below the
        threshold) leaves its image unlabeled and is listed there too. Holds the workspace lock.
        """
        if not source.exists():
            raise ImageError(f"{source} does not exist; pass a folder of images and masks")
        pairs = pair_mask_files(iter_image_files(source))
        with self.writing("ingest"):
            report = self.pool.ingest(pairs.images, self.cfg.ingest, on_progress)
            found = mask_label_rows(
                source,
                pairs.masks,
                report,
                self.cfg.classes,
                folder_classes or {},
                threshold,
                min_area,
                self.cfg.task,
                self.cfg.split,
            )
            report.dropped_regions.extend(found.dropped)
            self._record_label_problems(report, [*pairs.problems, *found.problems])
            return report, self._add_labels(found.rows)

    # ---------------------------------------------------------------- train
    def export(self, version: DatasetVersion) -> Path:
        return export_yolo(
            version, self.cfg.paths.images, self.cfg.paths.exports / version.digest, self.cfg.task
        )

    def fit(
        self, tracker: ChampionSource, progress: Callable[[str], None] | None = None
    ) -> FitResult:
        """Export the current version, train and evaluate on the frozen test split. Writes only
        under the workspace's runs folder.

        Where training starts follows ``train.init``: ``champion`` fine-tunes ``tracker``'s
        champion for ``train.finetune_epochs``; ``pretrained`` (and ``champion`` before the first
        champion) starts from ``train.weights`` (verified, see `TrainConfig.start_checkpoint`) or,
        without one, from the ``train.model`` YAML, for ``train.epochs``.
        """
        from loop import model
        from loop.images import sha256_file

        version = self.current_version()
        if version is None:
            raise DatasetError(
                "no labeled dataset version yet: `defect-loop ingest DIR --labels LABELS` "
                "or label tasks in Label Studio and run `defect-loop pull`"
            )
        train_cfg = self.cfg.train
        champion = tracker.champion() if train_cfg.init == "champion" else None
        start = train_cfg.start_checkpoint()  # checked every round: the file may have changed
        epochs = train_cfg.epochs_for(version.split_counts()["train"], champion is not None)
        train_cfg = train_cfg.model_copy(update={"epochs": epochs})
        if champion is not None:
            init_path: Path | None = Path(champion.weights)
            init, init_sha = "champion", sha256_file(Path(champion.weights))
        elif start is not None:
            init_path, init, init_sha = start.path, "pretrained", start.sha256
        else:
            init_path, init, init_sha = None, "scratch", None
        data_yaml = self.export(version)
        round_index = self.state.round + 1
        if progress:
            source = (
                f"champion v{champion.version}"
                if champion is not None
                else self.cfg.train.describe_start()
            )
            progress(
                f"training round {round_index} on {version.short} ({len(version)} images) "
                f"from {source}, {train_cfg.epochs} epochs"
            )

        def on_epoch(e: int, n: int, m: dict[str, float]) -> None:
            if progress is None:
                return
            if train_cfg.val_every_epoch or e == n:
                text = f"epoch {e}/{n}: val mAP50 {m.get('metrics/mAP50(B)', 0.0):.3f}"
                if "metrics/mAP50(M)" in m:
                    text += f", mask mAP50 {m['metrics/mAP50(M)']:.3f}"
                progress(text)
            else:
                progress(f"epoch {e}/{n}")

        result = model.train(
            data_yaml,
            self.cfg.paths.runs,
            train_cfg,
            self.cfg.paths.yolo_config,
            init_weights=init_path,
            name=f"round{round_index}-{version.short}",
            on_epoch=None if progress is None else on_epoch,
            task=self.cfg.task,
        )
        if progress and result.transfer is not None:
            t = result.transfer
            progress(
                f"seeded the segmentation model from {Path(t.source).name}: "
                f"{t.transferred}/{t.total} tensors, backbone {t.backbone_transferred}/"
                f"{t.backbone_total}"
            )
        test = None
        if version.split_counts()["test"]:
            test = model.evaluate(
                result.weights,
                data_yaml,
                "test",
                self.cfg.train.imgsz,
                self.cfg.paths.yolo_config,
                list(self.cfg.classes),
            )
        return FitResult(
            version,
            result,
            test,
            champion.version if champion else None,
            round_index,
            init=init,
            init_sha256=init_sha,
        )

    def record(self, tracker: Tracker, fit: FitResult) -> TrainOutcome:
        """Log a fit to MLflow, register its weights as ``candidate`` and run the promotion gate
        (`loop.quality.gate_and_record`: paired bootstrap against the champion)."""
        start = self.cfg.train.start_checkpoint()
        params = {
            **{f"train.{k}": v for k, v in self.cfg.train.model_dump().items()},
            # The checkpoint every "pretrained" round starts from, as verified at this run.
            "start_weights_sha256": "" if start is None else start.sha256,
            "init_weights": fit.init,
            "init_weights_sha256": fit.init_sha256 or "",
            "champion_version": fit.init_version or "",
            "classes": ",".join(self.cfg.classes),
        }
        # The config is logged for reproducibility, without its secrets.
        config_text = yaml.safe_dump(
            self.cfg.model_dump(mode="json", exclude={"labelstudio": {"password", "api_token"}}),
            sort_keys=False,
        )
        run_id = tracker.log_training(
            version=fit.version,
            store=self.store,
            result=fit.result,
            test=fit.test,
            params=params,
            round_index=fit.round_index,
            config_text=config_text,
        )
        corrections = self.cfg.paths.corrections(fit.version.digest)
        if corrections.exists():
            # How labelers changed the suggestions that produced this version's new labels.
            from loop.corrections import correction_metrics, read_corrections

            tracker.log_metrics(run_id, correction_metrics(read_corrections(corrections)))
        # Per-annotator and per-class label quality over every pulled task so far.
        tracker.log_label_quality(run_id)
        mv = tracker.register(run_id)
        # Paired against the champion on the same test images, with bootstrap intervals.
        decision = gate_and_record(self, tracker, fit, run_id, mv)
        self.state.round = fit.round_index
        self.save_state()
        test = fit.test
        return TrainOutcome(
            run_id,
            mv,
            decision.promoted,
            decision.reason,
            fit.version.digest,
            fit.result.val.map50,
            fit.result.val.map50_95,
            None if test is None else test.map50,
            None if test is None else test.map50_95,
            fit.result.weights,
            None if test is None else test.mask_map50,
            None if test is None else test.mask_map50_95,
        )

    # ---------------------------------------------------------------- score
    def candidates(self) -> list[str]:
        """Pool images worth scoring: unlabeled and not in the test split (the test split is
        frozen: the loop never selects test images). Images already waiting in Label Studio are
        scored too, so that their tasks get the new model's suggestions and priority."""
        version = self.current_version()
        labeled = set() if version is None else {r.sha256 for r in version.rows}
        return [
            p.sha256
            for p in self.pool
            if p.sha256 not in labeled and assign_split(p.sha256, self.cfg.split) != "test"
        ]

    def scoring_model(self, weights: Path) -> Path:
        """The model file ``scoring.backend`` runs for the champion ``weights``: the weights
        themselves (torch), or their ONNX export / int8 quantization, made on first use and kept
        under ``<workspace>/scoring-models`` keyed by the weights' sha256 and ``train.imgsz``
        (written atomically, so concurrent workers at worst make it twice).

        int8 calibration images: the current version's labeled train images (by sha256), else
        the pool's, at most ``scoring.calibration_images``."""
        from loop import model

        backend = self.cfg.scoring.backend
        if backend == "torch":
            return Path(weights)
        if not Path(weights).is_file():
            raise ModelError(f"weights {weights} not found; train a model first")
        imgsz, ycd, threads = (
            self.cfg.train.imgsz,
            self.cfg.paths.yolo_config,
            self.cfg.train.threads,
        )
        key = f"{sha256_file(Path(weights))[:16]}-{imgsz}"
        onnx_path = self.cfg.paths.scoring_models / f"{key}.onnx"
        if not onnx_path.is_file():
            # Ultralytics exports beside the weights: work on a private copy of them.
            private = onnx_path.with_name(f".{key}.{os.getpid()}.pt")
            private.parent.mkdir(parents=True, exist_ok=True)
            private.write_bytes(Path(weights).read_bytes())
            try:
                model.export_onnx(private, imgsz, ycd, onnx_path, threads=threads)
            finally:
                private.unlink(missing_ok=True)
        if backend == "onnx":
            return onnx_path
        int8_path = onnx_path.with_suffix(".int8.onnx")
        if not int8_path.is_file():
            version = self.current_version()
            shas = (
                sorted(r.sha256 for r in version.rows if r.split == "train")
                if version is not None
                else sorted(p.sha256 for p in self.pool)
            )
            model.quantize_onnx(
                onnx_path,
                (self.pool.abs_path(s) for s in shas),
                imgsz,
                ycd,
                int8_path,
                max_images=self.cfg.scoring.calibration_images,
                threads=threads,
            )
        return int8_path

    def predict(self, weights: Path, shas: list[str]) -> Iterator[Detections]:
        """Candidate boxes with class probabilities for ``shas``, one `Detections` each, in
        order, through ``scoring.backend`` (see `scoring_model`); a segment project's model
        adds each instance's simplified outline (``Detections.polygons``, `loop.model.predict`)."""
        from loop import model

        paths = (self.pool.abs_path(s) for s in shas)
        run = model.predict if self.cfg.scoring.backend == "torch" else model.predict_onnx
        return run(
            self.scoring_model(weights),
            paths,
            self.cfg.train.imgsz,
            self.cfg.select.candidate_conf,
            self.cfg.paths.yolo_config,
            len(self.cfg.classes),
            threads=self.cfg.train.threads,
            min_candidates=self.cfg.select.min_candidates,
        )

    # ---------------------------------------------------------------- Label Studio
    def ls_token(self) -> str:
        """The API token: from the environment/config, else from a local `services up`."""
        if self.cfg.labelstudio.api_token is not None:
            return self.cfg.labelstudio.api_token.get_secret_value()
        from loop.services import load_or_create_credentials

        cred_path = self.cfg.paths.labelstudio_credentials
        if cred_path.exists():
            return load_or_create_credentials(cred_path).api_token
        raise ConfigError(
            "no Label Studio token: set DEFECT_LOOP_LABELSTUDIO__API_TOKEN, "
            "or run `defect-loop services up` to start a local Label Studio"
        )

    def gateway(self) -> LabelStudioGateway:
        """A gateway to the configured Label Studio (close it, or use it with ``with``)."""
        from loop.labelstudio import LabelStudioGateway

        return LabelStudioGateway(
            self.cfg.labelstudio.url, self.ls_token(), timeout_s=self.cfg.labelstudio.timeout_s
        )

    def ensure_ls_project(self, gw: LabelingBackend) -> int:
        """Get or create the Label Studio project from the config (idempotent): classes, colours,
        instructions, polygons, the "most valuable first" view and the images' local storage.
        The remembered project id is its identity, so a project renamed in the UI is kept."""
        with self.writing("Label Studio set-up"):
            pid = gw.ensure_project(
                self.cfg.ls_project_title,
                list(self.cfg.classes),
                self.cfg.guidelines,
                polygons=self.cfg.labelstudio.polygons,
                project_id=self.state.ls_project_id,
                brush=self.cfg.labelstudio.brush,
                keypoints=self.cfg.keypoints or None,
            )
            gw.ensure_local_storage(pid, self.cfg.paths.images)
            if self.state.ls_project_id != pid:
                self.state.ls_project_id = pid
                self.save_state()
            return int(pid)

    def image_url(self, sha: str) -> str:
        path = (self.cfg.paths.images / self.pool.get(sha).path).resolve()
        root = self.cfg.ls_document_root.resolve()
        if not path.is_relative_to(root):
            raise ConfigError(
                f"image folder {self.cfg.paths.images} is not below Label Studio's document root "
                f"{root}; set labelstudio.document_root or move the workspace"
            )
        return local_file_url(path.relative_to(root).as_posix())

    def push(
        self, gw: LabelingBackend, ranked: list[ScoredImage], model_version: str
    ) -> PushSummary:
        """Push the best new images of ``ranked`` as pre-annotated tasks (`loop.sync.push`)."""
        return sync.push(self, gw, ranked, model_version)

    def pull(self, gw: LabelingBackend) -> PullOutcome:
        """Bring the labeling backend's changes back as a new dataset version (`loop.sync.pull`)."""
        return sync.pull(self, gw)

    def rejections(self) -> list[TaskRejection]:
        """Label Studio tasks that pulls rejected and that have not changed since (see `pull`)."""
        return RejectionLog(self.cfg.paths.rejections).open()

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        version = self.current_version()
        rejections = self.rejections()
        return {
            "workspace": str(self.cfg.workspace),
            "task": self.cfg.task,
            "pool_images": len(self.pool),
            "rejected_files": [asdict(r) for r in self.pool.rejected],
            "dataset_version": None if version is None else version.digest,
            "labeled_images": 0 if version is None else len(version),
            "splits": None if version is None else version.split_counts(),
            "class_counts": None if version is None else version.class_counts(),
            **(
                {"mask_counts": None if version is None else version.mask_counts()}
                if self.cfg.task == "segment"
                else {}
            ),
            "round": self.state.round,
            "pending_in_label_studio": len(self.state.pending),
            "label_studio_project": self.state.ls_project_id,
            "model_version": self.state.last_model_version,
            "test_split": split_status(self.cfg, version),
            "rejected_tasks": [
                {"task_id": r.task_id, "reason": r.reason, "since": r.first_seen}
                for r in rejections
            ],
        }
