"""One defect-loop project on disk: its pool, dataset versions, state and the steps of a cycle.

Each public method of `Project` is one step that crosses one I/O boundary (ingest, train, predict,
push, pull, log), so that `flows/` can wrap each in a Prefect task and the CLI can call them
directly. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import yaml

from loop.config import ProjectConfig
from loop.datasets import DatasetStore, DatasetVersion, LabeledImage, assign_split, export_yolo
from loop.detections import Detections
from loop.errors import ConfigError, DatasetError, ImageError, ModelError
from loop.formats.yolo import yolo_lines_to_detections
from loop.images import ImagePool, IngestReport, atomic_write_text, iter_image_files, sha256_file
from loop.quality import gate_and_record, preannotation_filter, split_status
from loop.review_queue import ReviewQueue

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
    """``labeled``: labels taken; ``rejected``: "Label Studio task <id>: <reason>" lines;
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


class Project:
    """Bundles a config with the on-disk workspace it describes."""

    def __init__(self, cfg: ProjectConfig) -> None:
        self.cfg = cfg
        cfg.workspace.mkdir(parents=True, exist_ok=True)
        self.pool = ImagePool(cfg.images_dir, cfg.workspace / "pool.json")
        self.store = DatasetStore(cfg.datasets_dir)
        self.state = self._load_state()

    # ---------------------------------------------------------------- state
    def _load_state(self) -> ProjectState:
        if self.cfg.state_path.exists():
            return ProjectState(**json.loads(self.cfg.state_path.read_text()))
        return ProjectState()

    def save_state(self) -> None:
        atomic_write_text(self.cfg.state_path, json.dumps(asdict(self.state), indent=1))

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
        """Add images below ``source`` to the pool. With ``labels_dir`` (YOLO txt named like the
        image stems), import those labels as a new dataset version: all of them, or a seeded random
        ``label_limit`` of them (the seed set of an active-learning run)."""
        if not source.exists():
            raise ImageError(f"{source} does not exist; pass a folder of images")
        files = list(iter_image_files(source))
        report = self.pool.ingest(files, self.cfg.ingest, on_progress)
        if labels_dir is None:
            return report, None
        entries = report.accepted
        labeled: list[LabeledImage] = []
        for src, entry in sorted(entries.items()):
            txt = labels_dir / f"{Path(src).stem}.txt"
            if not txt.exists():
                continue
            det = yolo_lines_to_detections(
                txt.read_text(), (entry.width, entry.height), len(self.cfg.classes)
            )
            labeled.append(
                LabeledImage(
                    entry.sha256,
                    entry.path,
                    entry.width,
                    entry.height,
                    assign_split(entry.sha256, self.cfg.split),
                    det,
                    {"source": "import", "file": str(txt)},
                )
            )
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

    # ---------------------------------------------------------------- train
    def export(self, version: DatasetVersion) -> Path:
        return export_yolo(version, self.cfg.images_dir, self.cfg.exports_dir / version.digest)

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
            self.cfg.runs_dir,
            train_cfg,
            self.cfg.yolo_config_dir,
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
                self.cfg.yolo_config_dir,
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
        corrections = self.store.path(fit.version.digest) / "corrections.json"
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
        imgsz, ycd, threads = self.cfg.train.imgsz, self.cfg.yolo_config_dir, self.cfg.train.threads
        key = f"{sha256_file(Path(weights))[:16]}-{imgsz}"
        onnx_path = self.cfg.scoring_models_dir / f"{key}.onnx"
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
            self.cfg.yolo_config_dir,
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

        cred_path = self.cfg.workspace / "labelstudio" / "credentials.json"
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
        pid = gw.ensure_project(
            self.cfg.ls_project_title,
            list(self.cfg.classes),
            self.cfg.guidelines,
            polygons=self.cfg.labelstudio.polygons,
            project_id=self.state.ls_project_id,
        )
        gw.ensure_local_storage(pid, self.cfg.images_dir)
        if self.state.ls_project_id != pid:
            self.state.ls_project_id = pid
            self.save_state()
        return int(pid)

    def image_url(self, sha: str) -> str:
        path = (self.cfg.images_dir / self.pool.get(sha).path).resolve()
        root = self.cfg.ls_document_root.resolve()
        if not path.is_relative_to(root):
            raise ConfigError(
                f"image folder {self.cfg.images_dir} is not below Label Studio's document root "
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
        (created, refreshed, skipped, failed)."""
        from loop.labelstudio import PushItem

        pid = self.ensure_ls_project(gw)
        fresh = [s for s in ranked if s.sha256 not in self.state.pending]
        waiting = [s for s in ranked if s.sha256 in self.state.pending]
        # Images the production monitor queued lead the push (loop.review_queue).
        queue = ReviewQueue(self.cfg.monitor_dir)
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
        summary = gw.push(
            pid,
            items,
            model_version=model_version,
            class_names=list(self.cfg.classes),
            batch_size=self.cfg.labelstudio.batch_size,
            progress=None if self.cfg.labelstudio.progress else False,
        )
        queue.mark_pushed(summary.task_ids)
        self.state.pending.update(summary.task_ids)
        self.state.last_model_version = model_version
        self.save_state()
        return summary

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
        label and wait in Label Studio again; rejected tasks (unknown label, rotated box, bad
        coordinates, unsafe image path, image not in the pool) are reported and never block the
        others. The correction analytics of the pulled labels that showed a prediction are
        written to ``<workspace>/datasets/<digest>/corrections.json`` of the new version.
        """
        from loop.corrections import (
            REPORT_NAME,
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
        )
        rejected = [str(r) for r in result.rejected]
        rows: list[LabeledImage] = []
        inputs: list[CorrectionInput] = []
        for lab in result.labels:
            if lab.sha256 not in self.pool:
                rejected.append(
                    f"Label Studio task {lab.task_id}: image {lab.sha256[:12]} is not in this "
                    "project's pool (imported by hand?); delete the task or ingest the image"
                )
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
                    assign_split(entry.sha256, self.cfg.split),
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
        drop = {s for s in result.unlabeled_sha256 if s not in labeled_now}
        for r in rows:
            self.state.pending.pop(r.sha256, None)
        for tid, sha in zip(result.unlabeled_task_ids, result.unlabeled_sha256, strict=True):
            if sha in drop:
                self.state.pending[sha] = tid  # back in the labeling queue
        self.state.pull_cursor = result.cursor
        self.state.pull_cursor_scope = scope

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
            )

        version = self._next_version(current, rows, drop) if rows or drop else current
        if version is None or (current is not None and version.digest == current.digest):
            self.save_state()
            return outcome(None, self.state.current_version, {})
        self._set_version(version)
        report = build_report(inputs, classes)
        write_report(self.store.path(version.digest) / REPORT_NAME, report)
        return outcome(version.digest, version.parent, correction_metrics(report))

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        version = self.current_version()
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
        }


def require_weights(path: Path | None) -> Path:
    if path is None or not path.exists():
        raise ModelError("no champion model yet: run `defect-loop train` first")
    return path
