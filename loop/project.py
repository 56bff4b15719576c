"""One defect-loop project on disk: its pool, dataset versions, state and the steps of a cycle.

Each public method of `Project` is one step that crosses one I/O boundary (ingest, train, predict,
push, pull, log), so that `flows/` can wrap each in a Prefect task and the CLI can call them
directly. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loop.config import ProjectConfig
from loop.datasets import DatasetStore, DatasetVersion, LabeledImage, assign_split, export_yolo
from loop.detections import Detections
from loop.errors import ConfigError, DatasetError, ImageError, ModelError
from loop.formats.yolo import yolo_lines_to_detections
from loop.images import ImagePool, IngestReport, atomic_write_text, iter_image_files
from loop.selection import rank
from loop.uncertainty import score_images

Progress = Callable[[int, int], None]


@dataclass
class ProjectState:
    """Mutable bookkeeping persisted in ``state.json`` (everything else is immutable or derived)."""

    current_version: str | None = None
    round: int = 0
    ls_project_id: int | None = None
    pending: dict[str, int] = field(default_factory=dict)  # sha256 -> Label Studio task id
    last_model_version: str | None = None


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
    version: DatasetVersion
    result: Any  # loop.model.TrainResult
    test: Any  # loop.model.EvalResult | None
    init_version: str | None
    round_index: int


@dataclass(frozen=True)
class ScoredImage:
    sha256: str
    score: float
    detections: Detections  # what labelers will see (>= preannotation_conf)


@dataclass(frozen=True)
class PullOutcome:
    labeled: int
    rejected: list[str]
    new_version: str | None
    parent: str | None


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
        """Export the current version, train (warm start from the champion when configured) and
        evaluate on the frozen test split. Writes only under the workspace's runs folder."""
        from loop import model

        version = self.current_version()
        if version is None:
            raise DatasetError(
                "no labeled dataset version yet: `defect-loop ingest DIR --labels LABELS` "
                "or label tasks in Label Studio and run `defect-loop pull`"
            )
        data_yaml = self.export(version)
        champion = tracker.champion() if self.cfg.train.warm_start else None
        init = champion.weights if champion is not None else None
        round_index = self.state.round + 1
        if progress:
            progress(f"training round {round_index} on {version.short} ({len(version)} images)")
        train_cfg = self.cfg.train
        if init is not None and train_cfg.finetune_epochs is not None:
            train_cfg = train_cfg.model_copy(update={"epochs": train_cfg.finetune_epochs})
        result = model.train(
            data_yaml,
            self.cfg.runs_dir,
            train_cfg,
            self.cfg.yolo_config_dir,
            init_weights=init,
            name=f"round{round_index}-{version.short}",
            on_epoch=None
            if progress is None
            else lambda e, n, m: progress(
                f"epoch {e}/{n}: val mAP50 {m.get('metrics/mAP50(B)', 0.0):.3f}"
            ),
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
        return FitResult(version, result, test, champion.version if champion else None, round_index)

    def record(self, tracker: Any, fit: FitResult) -> TrainOutcome:
        """Log a fit to MLflow, register its weights as ``candidate`` and run the promotion gate."""
        params = {
            **{f"train.{k}": v for k, v in self.cfg.train.model_dump().items()},
            "init_weights": "champion" if fit.init_version else "scratch",
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
        mv = tracker.register(run_id)
        decision = tracker.promote_if_better(mv, run_id)
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
        """Pool images worth scoring: unlabeled, not waiting in Label Studio, not in the test split
        (the test split is frozen: the loop never selects test images)."""
        version = self.current_version()
        labeled = set() if version is None else {r.sha256 for r in version.rows}
        return [
            p.sha256
            for p in self.pool
            if p.sha256 not in labeled
            and p.sha256 not in self.state.pending
            and assign_split(p.sha256, self.cfg.split) != "test"
        ]

    def predict(self, weights: Path, shas: list[str]) -> Iterator[Detections]:
        from loop import model

        paths = (self.pool.abs_path(s) for s in shas)
        return model.predict(
            weights,
            paths,
            self.cfg.train.imgsz,
            self.cfg.select.candidate_conf,
            self.cfg.yolo_config_dir,
            len(self.cfg.classes),
            threads=self.cfg.train.threads,
            min_candidates=self.cfg.select.min_candidates,
        )

    def score(
        self,
        shas: list[str],
        detections: Iterable[Detections],
        progress: Callable[[int], None] | None = None,
    ) -> list[ScoredImage]:
        """Score every image with the configured strategy and rank them, most valuable first.
        Streams: one image's candidate boxes at a time; keeps only the boxes labelers will see."""
        sel = self.cfg.select
        rng = np.random.default_rng([sel.seed, self.state.round])
        scores = np.empty(len(shas))
        shown: dict[str, Detections] = {}
        for i, (sha, det) in enumerate(zip(shas, detections, strict=True)):
            scores[i] = score_images(sel.strategy, [det], reduction=sel.reduction, rng=rng)[0]
            shown[sha] = det.with_min_confidence(sel.preannotation_conf)
            if progress:
                progress(i + 1)
        ranked = rank(shas, scores, rng)
        return [ScoredImage(s, v, shown[s]) for s, v in ranked]

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
        pid = gw.ensure_project(
            self.cfg.ls_project_title, list(self.cfg.classes), self.cfg.guidelines
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
        return f"/data/local-files/?d={rel.as_posix()}"

    def push(self, gw: Any, ranked: list[ScoredImage], model_version: str) -> Any:
        """Push the top ``select.batch_size`` of ``ranked`` as pre-annotated tasks, best first."""
        from loop.labelstudio import PushItem

        pid = self.ensure_ls_project(gw)
        top = ranked[: self.cfg.select.batch_size]
        items = [
            PushItem(
                sha256=s.sha256,
                image_url=self.image_url(s.sha256),
                detections=s.detections,
                priority=s.score,
            )
            for s in top
        ]
        summary = gw.push(
            pid,
            items,
            model_version=model_version,
            class_names=list(self.cfg.classes),
            batch_size=self.cfg.labelstudio.batch_size,
        )
        self.state.pending.update(summary.task_ids)
        self.state.last_model_version = model_version
        self.save_state()
        return summary

    def pull(self, gw: Any) -> PullOutcome:
        """Bring submitted annotations back as a new dataset version (none when nothing changed)."""
        pid = self.ensure_ls_project(gw)
        result = gw.pull(pid, list(self.cfg.classes))
        rows = []
        for lab in result.labels:
            if lab.sha256 not in self.pool:
                raise ImageError(
                    f"Label Studio task {lab.task_id} refers to image {lab.sha256[:12]} that is not "
                    "in this project's pool; was it imported by hand?"
                )
            entry = self.pool.get(lab.sha256)
            rows.append(
                LabeledImage(
                    entry.sha256,
                    entry.path,
                    entry.width,
                    entry.height,
                    assign_split(entry.sha256, self.cfg.split),
                    lab.detections,
                    {
                        "source": "labelstudio",
                        "task_id": str(lab.task_id),
                        "annotation_id": str(lab.annotation_id),
                        "annotator": str(lab.annotator),
                        "round": str(self.state.round),
                    },
                )
            )
        rejected = [str(r) for r in result.rejected]
        current = self.current_version()
        for r in rows:
            self.state.pending.pop(r.sha256, None)
        if not rows:
            self.save_state()
            return PullOutcome(0, rejected, None, self.state.current_version)
        version = (
            DatasetVersion.create(self.cfg.classes, rows)
            if current is None
            else current.with_labels(rows)
        )
        if current is not None and version.digest == current.digest:
            self.save_state()
            return PullOutcome(len(rows), rejected, None, current.digest)
        self._set_version(version)
        return PullOutcome(len(rows), rejected, version.digest, version.parent)

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
        }


def require_weights(path: Path | None) -> Path:
    if path is None or not path.exists():
        raise ModelError("no champion model yet: run `defect-loop train` first")
    return path
