"""One defect-loop project on disk: its pool, dataset versions, state and the steps of a cycle.

Each public method of `Project` is one step that crosses one I/O boundary (ingest, train, predict,
push, pull, log), so that `flows/` can wrap each in a Prefect task and the CLI can call them
directly. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import yaml

from loop.config import ProjectConfig
from loop.datasets import (
    DatasetStore,
    DatasetVersion,
    LabeledImage,
    Split,
    assign_split,
    export_yolo,
)
from loop.detections import Detections
from loop.errors import (
    ConfigError,
    ConversionError,
    DatasetError,
    ImageError,
    LabelStudioError,
    ModelError,
    ServiceError,
    UnknownLabelError,
)
from loop.formats.yolo import yolo_lines_to_detections
from loop.images import (
    ImagePool,
    IngestReport,
    Rejected,
    atomic_write_text,
    iter_image_files,
    sha256_file,
)
from loop.labelfiles import match_label_files
from loop.ledger import RejectionLog, TaskLedger, TaskRejection
from loop.quality import gate_and_record, preannotation_filter, split_status
from loop.review_queue import ReviewQueue
from loop.scheduling import workspace_lock

Progress = Callable[[int, int], None]


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


@dataclass(frozen=True)
class FitResult:
    """One training: the version it saw, Ultralytics' result, the test metrics, and where it
    started: ``init`` (``"champion"``, ``"pretrained"`` or ``"scratch"``), ``init_version`` (the
    champion's model version for ``"champion"``) and ``init_sha256`` (the starting ``.pt``; None
    from scratch)."""

    version: DatasetVersion
    result: Any  # loop.model.TrainResult
    test: Any  # loop.model.EvalResult | None
    init_version: str | None
    round_index: int
    init: str = "scratch"
    init_sha256: str | None = None


@dataclass(frozen=True)
class ScoredImage:
    sha256: str
    score: float
    detections: Detections  # what labelers will see (>= preannotation_conf)


@dataclass(frozen=True)
class PullOutcome:
    """``labeled``: labels taken; ``rejected``: "Label Studio task <id>: <reason>" lines of the
    tasks this pull rejected that were not already open for that reason (``open_rejections``
    counts them all; `Project.rejections` lists them);
    ``unlabeled``: sha256 of images whose Label Studio annotations were deleted (their labels
    were dropped from the new version; they wait in Label Studio again); ``skipped``: tasks only
    skipped by labelers; ``corrections``: correction metrics (`loop.corrections.correction_metrics`)
    of the new version, for MLflow; ``cursor``: where the next incremental pull starts."""

    labeled: int
    rejected: list[str]
    new_version: str | None
    parent: str | None
    unlabeled: list[str] = field(default_factory=list)
    skipped: int = 0
    corrections: dict[str, float] = field(default_factory=dict)
    cursor: str | None = None
    open_rejections: int = 0  # tasks still rejected after this pull (this one's and earlier)


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
        """
        with workspace_lock(
            self.cfg.workspace, what, self.cfg.schedule.wait_timeout_s, on_wait=self.on_wait
        ) as took:
            if took:
                self.reload()
            yield

    def _load_state(self) -> ProjectState:
        if self.cfg.paths.state.exists():
            return ProjectState(**json.loads(self.cfg.paths.state.read_text()))
        return ProjectState()

    def save_state(self) -> None:
        atomic_write_text(self.cfg.paths.state, json.dumps(asdict(self.state), indent=1))

    def current_version(self) -> DatasetVersion | None:
        if self.state.current_version is None:
            return None
        return self.store.load(self.state.current_version)

    def _set_version(self, version: DatasetVersion) -> None:
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
    ) -> tuple[IngestReport, DatasetVersion | None]:
        """Add images below ``source`` to the pool. With ``labels_dir`` (YOLO txt), import those
        labels as a new dataset version: all of them, or a seeded random ``label_limit`` of them
        (the seed set of an active-learning run).

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
        files = list(iter_image_files(source))
        with self.writing("ingest"):
            report = self.pool.ingest(files, self.cfg.ingest, on_progress)
            if labels_dir is None:
                return report, None
            labeled, problems = self._read_labels(source, files, labels_dir, report)
            if problems:
                report.label_problems.extend(problems)
                self.pool.record_rejected(problems)
                self.pool.save()
            if label_limit is not None and label_limit < len(labeled):
                rng = np.random.default_rng(seed)
                keep = sorted(rng.choice(len(labeled), size=label_limit, replace=False).tolist())
                labeled = [labeled[i] for i in keep]
            if not labeled:
                return report, None
            current = self.current_version()
            if current is None:
                version = DatasetVersion.create(self.cfg.classes, labeled)
            else:
                version = current.with_labels(labeled)
            if current is not None and version.digest == current.digest:
                return report, current
            self._set_version(version)
            return report, version

    def _read_labels(
        self, source: Path, files: list[Path], labels_dir: Path, report: IngestReport
    ) -> tuple[list[LabeledImage], list[Rejected]]:
        """The labeled rows of the ingested images (one per sha256, by sha256) and the label
        files that could not be used, with the reason."""
        match = match_label_files(source, files, labels_dir, report.accepted)
        problems = list(match.problems)
        found: dict[str, list[tuple[Path, Path, LabeledImage]]] = {}
        for image, txt in sorted(match.labels.items()):
            entry = report.accepted[str(image)]
            try:
                det = yolo_lines_to_detections(
                    txt.read_text(), (entry.width, entry.height), len(self.cfg.classes)
                )
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(Rejected(str(txt), f"unreadable label file: {exc}"))
                continue
            except (ConversionError, UnknownLabelError) as exc:
                problems.append(
                    Rejected(str(txt), f"{exc}; its image {image} was ingested without labels")
                )
                continue
            row = LabeledImage(
                entry.sha256,
                entry.path,
                entry.width,
                entry.height,
                assign_split(entry.sha256, self.cfg.split),
                det,
                {"source": "import", "file": str(txt)},
            )
            found.setdefault(entry.sha256, []).append((image, txt, row))
        labeled: list[LabeledImage] = []
        classes = list(self.cfg.classes)
        for sha, rows in sorted(found.items()):
            first = rows[0]
            other = next(
                (r for r in rows if r[2].box_keys(classes) != first[2].box_keys(classes)), None
            )
            if other is None:
                labeled.append(first[2])
                continue
            problems.append(
                Rejected(
                    str(first[1]),
                    f"conflicting labels for one image ({sha[:12]}, under two names): "
                    f"{first[1]} (for {first[0]}) and {other[1]} (for {other[0]}) differ; "
                    "neither was imported. Make them agree or remove one",
                )
            )
        return labeled, problems

    # ---------------------------------------------------------------- train
    def export(self, version: DatasetVersion) -> Path:
        return export_yolo(version, self.cfg.paths.images, self.cfg.paths.exports / version.digest)

    def fit(self, tracker: Any, progress: Callable[[str], None] | None = None) -> FitResult:
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
                progress(f"epoch {e}/{n}: val mAP50 {m.get('metrics/mAP50(B)', 0.0):.3f}")
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

    def record(self, tracker: Any, fit: FitResult) -> TrainOutcome:
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
            from loop.corrections import correction_metrics, read_report

            tracker.log_metrics(run_id, correction_metrics(read_report(corrections)))
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
        order, through ``scoring.backend`` (see `scoring_model`)."""
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

    def gateway(self) -> Any:
        from loop.labelstudio import LabelStudioGateway

        return LabelStudioGateway(
            self.cfg.labelstudio.url, self.ls_token(), timeout_s=self.cfg.labelstudio.timeout_s
        )

    def ensure_ls_project(self, gw: Any) -> int:
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
        rel = path.relative_to(root)
        return f"/data/local-files/?d={quote(rel.as_posix(), safe='/')}"

    def push(self, gw: Any, ranked: list[ScoredImage], model_version: str) -> Any:
        """Push the top ``select.batch_size`` new images of ``ranked`` as pre-annotated tasks,
        best first; images of ``ranked`` already waiting in Label Studio get a prediction of
        ``model_version`` (and their new priority) when it is a new model version. Images the
        production monitor queued (`loop.review_queue`) lead the batch, with priorities above
        the rest. Boxes of classes below ``advice.preannotation_min_ap50`` are left out of the
        suggestions (`loop.quality.preannotation_filter`). Returns the gateway's `PushSummary`
        (created, refreshed, skipped, failed).

        Every task pushed (or found waiting) is recorded with its image sha256 and URL in the
        task ledger (`loop.ledger.TaskLedger`), which `pull` checks annotations against; that
        holds for the tasks of a push interrupted half-way, too. Images of the frozen test split
        are never sent (``failed``). Holds the workspace lock."""
        from loop.labelstudio import PushItem

        with self.writing("push"):
            pid = self.ensure_ls_project(gw)
            ledger = self._ledger(pid)
            rows = self._current_rows()
            frozen = [s.sha256 for s in ranked if self._split_of(s.sha256, rows) == "test"]
            usable = [s for s in ranked if s.sha256 not in set(frozen)]
            fresh = [s for s in usable if s.sha256 not in self.state.pending]
            waiting = [s for s in usable if s.sha256 in self.state.pending]
            # Images the production monitor queued lead the push (loop.review_queue).
            queue = ReviewQueue(self.cfg.paths.monitor)
            fresh = queue.first(fresh)
            chosen = fresh[: self.cfg.select.batch_size] + waiting
            # Suggestions of classes the champion does not detect usefully cost labelers time.
            _, shown = preannotation_filter(self.cfg, model_version)
            items = [
                PushItem(
                    sha256=s.sha256,
                    image_url=self.image_url(s.sha256),
                    detections=shown(s.detections),
                    priority=s.score,
                )
                for s in chosen
            ]
            urls = {it.sha256: it.image_url for it in items}

            def remember(task_ids: dict[str, int]) -> None:
                for sha, tid in task_ids.items():
                    ledger.record(pid, tid, sha, urls[sha])
                ledger.save()
                queue.mark_pushed(task_ids)
                self.state.pending.update(task_ids)
                self.save_state()

            try:
                summary = gw.push(
                    pid,
                    items,
                    model_version=model_version,
                    class_names=list(self.cfg.classes),
                    batch_size=self.cfg.labelstudio.batch_size,
                    progress=None if self.cfg.labelstudio.progress else False,
                )
            except (ServiceError, LabelStudioError) as exc:
                partial = getattr(exc, "partial", None)
                if partial is not None and partial.task_ids:
                    remember(partial.task_ids)  # what arrived before the failure
                raise
            remember(summary.task_ids)
            for sha in frozen:
                summary.failed += 1
                summary.failures[sha] = (
                    "in the frozen test split: test images are never sent for labeling"
                )
            self.state.last_model_version = model_version
            self.save_state()
            return summary

    def _ledger(self, pid: int) -> TaskLedger:
        """The ledger of pushed tasks. A workspace from before the ledger starts it from what it
        knows it pushed: the tasks waiting in ``state.pending`` and those its labels came from."""
        ledger = TaskLedger(self.cfg.paths.ledger)
        if ledger.exists:
            return ledger
        known = {tid: sha for sha, tid in self.state.pending.items()}
        known.update(self._ls_labeled_tasks(self.current_version(), pid))
        for tid, sha in sorted(known.items()):
            if sha in self.pool:
                try:
                    ledger.record(pid, tid, sha, self.image_url(sha))
                except ConfigError:
                    continue
        ledger.save()
        return ledger

    def _current_rows(self) -> dict[str, LabeledImage]:
        version = self.current_version()
        return {} if version is None else version.by_sha()

    def _split_of(self, sha: str, rows: dict[str, LabeledImage]) -> Split:
        """The image's split: its row's (frozen when labeled), else the one its hash gives."""
        row = rows.get(sha)
        return row.split if row is not None else assign_split(sha, self.cfg.split)

    def rejections(self) -> list[TaskRejection]:
        """Label Studio tasks that pulls rejected and that have not changed since (see `pull`)."""
        return RejectionLog(self.cfg.paths.rejections).open()

    def _ls_labeled_tasks(self, version: DatasetVersion | None, pid: int) -> dict[int, str]:
        """Task id -> sha256 of the rows of ``version`` that came from Label Studio project
        ``pid`` (rows from before the project id was recorded count as this project's)."""
        out: dict[int, str] = {}
        if version is None:
            return out
        for r in version.rows:
            prov = r.provenance
            if prov.get("source") != "labelstudio" or not str(prov.get("task_id", "")).isdigit():
                continue
            if str(prov.get("project_id", pid)) != str(pid):
                continue
            out[int(prov["task_id"])] = r.sha256
        return out

    def _next_version(
        self, current: DatasetVersion | None, rows: list[LabeledImage], drop: set[str]
    ) -> DatasetVersion | None:
        """``current`` with ``rows`` added or replaced and the ``drop`` images removed (None when
        there is no version and no row). An image keeps its split (the test split is frozen); classes
        appended to the config extend the version's class list."""
        classes = tuple(self.cfg.classes)
        if current is None:
            return DatasetVersion.create(classes, rows) if rows else None
        if classes[: len(current.classes)] != current.classes:
            raise DatasetError(
                f"the config's classes {list(classes)} do not extend the dataset's "
                f"{list(current.classes)}; class ids are fixed: restore the class list"
            )
        merged = {r.sha256: r for r in current.rows if r.sha256 not in drop}
        for r in rows:
            old = merged.get(r.sha256)
            merged[r.sha256] = (
                r if old is None or old.split == r.split else replace(r, split=old.split)
            )
        return DatasetVersion.create(classes, merged.values(), parent=current.digest)

    def pull(self, gw: Any) -> PullOutcome:
        """Bring Label Studio's changes back as a new dataset version (none when nothing changed).

        Incremental: only tasks updated since the stored cursor are read. New or changed
        annotations add or replace labels; images whose annotations were all deleted lose their
        label and wait in Label Studio again. A task that cannot be used is rejected with its id
        and the reason, and never blocks the others: a malformed annotation (any field), an
        unknown label, a rotated or zero-area box, more than ``labelstudio.max_regions``
        regions, bad coordinates, an unsafe image path; a task this workspace never pushed, or
        whose ``data.sha256`` or ``data.image`` no longer matches what was pushed (tampered,
        see `loop.ledger`); an image of the frozen test split (only an explicit import changes
        test labels). Rejections are kept in ``<workspace>/rejected-tasks.json`` until the task
        changes or is deleted (`rejections`). The correction analytics of the pulled labels that
        showed a prediction are written to ``<workspace>/datasets/<digest>/corrections.json``
        of the new version. Holds the workspace lock.
        """
        with self.writing("pull"):
            return self._pull(gw)

    def _pull(self, gw: Any) -> PullOutcome:
        from loop.corrections import (
            CorrectionInput,
            build_report,
            correction_metrics,
            write_report,
        )

        pid = self.ensure_ls_project(gw)
        classes = list(self.cfg.classes)
        scope = f"{pid}:{','.join(classes)}"
        since = self.state.pull_cursor if self.state.pull_cursor_scope == scope else None
        current = self.current_version()
        result = gw.pull(
            pid,
            classes,
            since=since,
            known_labeled=self._ls_labeled_tasks(current, pid),
            document_root=self.cfg.ls_document_root,
            max_regions=self.cfg.labelstudio.max_regions,
        )
        found: dict[int, str] = {r.task_id: r.reason for r in result.rejected}
        ledger = self._ledger(pid)
        current_rows = {} if current is None else current.by_sha()
        rows: list[LabeledImage] = []
        inputs: list[CorrectionInput] = []
        for lab in result.labels:
            problem = self._identity_problem(pid, lab, ledger, current_rows)
            if problem is not None:
                found[lab.task_id] = problem
                continue
            entry = self.pool.get(lab.sha256)
            prov = {
                "source": "labelstudio",
                "project_id": str(pid),
                "task_id": str(lab.task_id),
                "annotation_id": str(lab.annotation_id),
                "annotator": str(lab.annotator),
                "round": str(self.state.round),
            }
            if lab.prediction_model_version:
                prov["model_version"] = str(lab.prediction_model_version)
            if lab.lead_time is not None:
                prov["lead_time_s"] = f"{lab.lead_time:.3f}"
            if len(lab.annotators) > 1:
                prov["annotators"] = ",".join(lab.annotators)
            if lab.agreement is not None:
                prov["agreement"] = f"{lab.agreement:.4f}"
            rows.append(
                LabeledImage(
                    entry.sha256,
                    entry.path,
                    entry.width,
                    entry.height,
                    self._split_of(entry.sha256, current_rows),
                    lab.detections,
                    prov,
                )
            )
            if lab.prediction is not None:
                inputs.append(
                    CorrectionInput(
                        lab.sha256, lab.task_id, lab.prediction, lab.detections, lab.lead_time
                    )
                )
        labeled_now = {r.sha256 for r in rows}
        drop = {
            s
            for s in result.unlabeled_sha256
            if s not in labeled_now and self._split_of(s, current_rows) != "test"
        }
        for r in rows:
            self.state.pending.pop(r.sha256, None)
        for tid, sha in zip(result.unlabeled_task_ids, result.unlabeled_sha256, strict=True):
            if sha in drop:
                self.state.pending[sha] = tid  # back in the labeling queue
        self.state.pull_cursor = result.cursor
        self.state.pull_cursor_scope = scope
        earlier, open_now = self._record_rejections(gw, pid, found, result)
        # This pull's news: a task judged again for the same reason is not listed twice.
        rejected = [
            f"Label Studio task {tid}: {reason}"
            for tid, reason in sorted(found.items())
            if earlier.get(tid) != reason
        ]

        def outcome(new_version: str | None, parent: str | None, metrics: Any) -> PullOutcome:
            return PullOutcome(
                len(rows),
                rejected,
                new_version,
                parent,
                unlabeled=sorted(drop),
                skipped=len(result.skipped_task_ids),
                corrections=metrics,
                cursor=result.cursor,
                open_rejections=open_now,
            )

        version = self._next_version(current, rows, drop) if rows or drop else current
        if version is None or (current is not None and version.digest == current.digest):
            self.save_state()
            return outcome(None, self.state.current_version, {})
        self._set_version(version)
        report = build_report(inputs, classes)
        write_report(self.cfg.paths.corrections(version.digest), report)
        return outcome(version.digest, version.parent, correction_metrics(report))

    def _identity_problem(
        self, pid: int, lab: Any, ledger: TaskLedger, rows: dict[str, LabeledImage]
    ) -> str | None:
        """Why the pulled label ``lab`` (a `PulledLabel`) must not be used, or None: its task
        must be one this workspace pushed, still naming the same image (sha256 and URL), the
        image must be in the pool at the annotated size, and not in the frozen test split."""
        pushed = ledger.get(pid, lab.task_id)
        if pushed is None:
            if lab.sha256 not in self.pool:
                return (
                    f"image {lab.sha256[:12]} is not in this project's pool (imported by hand?); "
                    "delete the task or ingest the image"
                )
            return (
                f"tampered or foreign task: defect-loop never pushed this task (its data names "
                f"image {lab.sha256[:12]}), so its annotation is not used; delete it in Label "
                "Studio (`defect-loop push` creates the tasks to label)"
            )
        if pushed.sha256 != lab.sha256:
            return (
                f"tampered task data: the task was pushed for image {pushed.sha256[:12]} but its "
                f"data.sha256 now names {lab.sha256[:12]}, so its annotation is not used; restore "
                "data.sha256 or delete the task"
            )
        # (None: a stand-in gateway that does not report task data, e.g. the oracle replay's;
        # Label Studio's gateway always does, or rejects the task for a missing image URL.)
        if lab.image_url is not None and lab.image_url != pushed.image:
            return (
                f"tampered task data: the task was pushed showing {pushed.image!r} but its "
                f"data.image is now {lab.image_url!r}, so its annotation is not used; restore "
                "data.image or delete the task"
            )
        if lab.sha256 not in self.pool:
            return f"image {lab.sha256[:12]} is no longer in this project's pool"
        entry = self.pool.get(lab.sha256)
        if tuple(lab.detections.image_wh) != (entry.width, entry.height):
            w, h = lab.detections.image_wh
            return (
                f"the annotation was drawn on a {w}x{h} image but image {lab.sha256[:12]} is "
                f"{entry.width}x{entry.height} px; re-annotate the task"
            )
        if self._split_of(lab.sha256, rows) == "test":
            return (
                f"image {lab.sha256[:12]} is in the frozen test split: only an explicit import "
                "(`defect-loop ingest --labels`) changes test labels, so the annotation is not "
                "used; delete the task"
            )
        return None

    def _record_rejections(
        self, gw: Any, pid: int, found: dict[int, str], result: Any
    ) -> tuple[dict[int, str], int]:
        """Keep the rejections of this pull with the earlier ones whose tasks did not change
        (nor disappear). Returns the open rejections before this pull (task id -> reason) and
        how many are open now."""
        log = RejectionLog(self.cfg.paths.rejections)
        earlier = {r.task_id: r.reason for r in log.open(pid)}
        log.update(pid, found, None if result.full else result.examined_task_ids)
        stale = [r.task_id for r in log.open(pid) if r.task_id not in found]
        list_tasks = getattr(gw, "task_ids", None)  # stand-in gateways may not list tasks
        if stale and list_tasks is not None:
            alive = list_tasks(pid)
            log.forget(pid, [t for t in stale if t not in alive])
        log.save()
        return earlier, len(log.open(pid))

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        version = self.current_version()
        rejections = self.rejections()
        return {
            "workspace": str(self.cfg.workspace),
            "pool_images": len(self.pool),
            "rejected_files": [asdict(r) for r in self.pool.rejected],
            "dataset_version": None if version is None else version.digest,
            "labeled_images": 0 if version is None else len(version),
            "splits": None if version is None else version.split_counts(),
            "class_counts": None if version is None else version.class_counts(),
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


def require_weights(path: Path | None) -> Path:
    if path is None or not path.exists():
        raise ModelError("no champion model yet: run `defect-loop train` first")
    return path
