"""Reading and writing the other records the loop keeps in MLflow (`Records`, part of
`loop.tracking.Tracker`): training runs as the lead report reads them, files logged to a run, the
oracle replay's curves and the production monitor's run."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.errors import DatasetError, LabelQualityError, ServiceError, UnknownLabelError
from loop.tracking.base import FINISHED_TRAINING, LABEL_QUALITY_ARTIFACT, TAG, TrackerBase

if TYPE_CHECKING:
    from loop.annotator_quality import LabelQuality


@dataclass(frozen=True)
class TrainingRun:
    """A finished training run: its round, dataset digest, metrics, params and tags."""

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


class Records(TrackerBase):
    """Runs and files beyond training and deployment."""

    def finished_training_runs(self) -> list[TrainingRun]:
        """Finished defect-loop training runs, one per round (the newest), by round."""
        client = self.client
        found = client.search_runs(
            [self.experiment_id()],
            filter_string=FINISHED_TRAINING,
            order_by=["attributes.start_time ASC"],
        )
        by_round: dict[int, TrainingRun] = {}
        for r in found:
            try:
                rnd = int(r.data.tags.get(TAG + "round", ""))
            except ValueError:
                continue
            by_round[rnd] = TrainingRun(
                str(r.info.run_id),
                rnd,
                r.data.tags.get(TAG + "dataset_digest", ""),
                dict(r.data.metrics),
                dict(r.data.params),
                dict(r.data.tags),
            )
        return [by_round[k] for k in sorted(by_round)]

    def model_versions_by_run(self) -> dict[str, str]:
        """run id -> registered model version (empty when the registry cannot be read)."""
        from mlflow.exceptions import MlflowException

        name = self.cfg.mlflow.registered_model.replace("'", "\\'")
        try:
            mvs = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return {}
        return {str(mv.run_id): str(mv.version) for mv in mvs if mv.run_id}

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The metrics of run ``run_id`` (the last value of each)."""
        return dict(self.client.get_run(run_id).data.metrics)

    def download_artifact(self, run_id: str, artifact_path: str, dst: Path) -> Path | None:
        """Download one artifact of a run into the folder ``dst``; its local path, or None when
        the run has no such artifact (or it cannot be read)."""
        from mlflow.exceptions import MlflowException

        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
        except (MlflowException, OSError):
            return None

    def log_files(self, run_id: str, paths: Sequence[Path], artifact_path: str) -> None:
        """Log ``paths`` to run ``run_id`` under ``artifact_path``. Raises `ServiceError` when
        MLflow refuses them (its ``__cause__``: the MLflow or OS error)."""
        from mlflow.exceptions import MlflowException

        try:
            for p in paths:
                self.client.log_artifact(run_id, str(p), artifact_path)
        except (MlflowException, OSError) as exc:
            raise ServiceError(f"logging {len(paths)} files to MLflow run {run_id}: {exc}") from exc

    def log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set ``tags`` (full keys) on run ``run_id`` in one call."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    # ------------------------------------------------------------------ label quality
    def log_label_quality(self, run_id: str) -> LabelQuality | None:
        """Log the label quality of the workspace's annotation log (`loop.annotator_quality`) to
        run ``run_id``: `label_quality_metrics` as metrics (``label_quality.*``) and the full
        table, `label_quality_to_json`, as the artifact ``label_quality/label_quality.json``.
        Returns the figures; None, logging nothing, while the log holds no task. A log that
        cannot be read does not fail the run: its reason goes to the tag
        ``defect_loop.label_quality_error`` (and the report's notes) and None is returned."""
        from loop.annotator_quality import (
            label_quality_metrics,
            label_quality_to_json,
            read_label_quality,
        )

        try:
            lq = read_label_quality(
                self.cfg.paths.annotation_log, list(self.cfg.classes), self.cfg.quality.match_iou
            )
        except (DatasetError, UnknownLabelError, LabelQualityError) as exc:
            self.log_tags(run_id, {TAG + "label_quality_error": str(exc)[:4000]})
            return None
        if not lq.tasks:
            return None
        self.log_metrics(run_id, label_quality_metrics(lq))
        self.client.log_text(
            run_id, json.dumps(label_quality_to_json(lq), indent=1), LABEL_QUALITY_ARTIFACT
        )
        return lq

    # ------------------------------------------------------------------ the oracle replay
    def ensure_experiment(self, name: str, artifact_location: str | None) -> None:
        """Create experiment ``name`` with its artifacts at ``artifact_location`` (None: the
        server's choice) unless it exists."""
        if self.client.get_experiment_by_name(name) is None:
            self.client.create_experiment(name, artifact_location=artifact_location)

    def log_replay_curve(self, curve: Mapping[str, Any]) -> str:
        """One finished run of kind ``replay`` for a replay curve: ``labeled``, ``test_map50``,
        ``test_map50_95`` and ``round_wall_seconds`` per round (step = round), the strategy and
        seed as params, the curve as ``replay/curve.json``. Returns the run id."""
        from mlflow.entities import Metric, Param

        client = self.client
        run = client.create_run(
            self.experiment_id(),
            run_name=f"replay-{curve['strategy']}-s{curve['seed']}",
            tags={TAG + "kind": "replay", TAG + "replay": f"{curve['strategy']}/s{curve['seed']}"},
        )
        run_id = run.info.run_id
        ts = int(time.time() * 1000)
        metrics = []
        for rec in curve["rounds"]:
            step = int(rec["round"])
            metrics.append(Metric("labeled", float(rec["labeled"]), ts, step))
            for key in ("test_map50", "test_map50_95"):
                if rec[key] is not None:
                    metrics.append(Metric(key, float(rec[key]), ts, step))
            metrics.append(Metric("round_wall_seconds", float(rec["wall_seconds"]), ts, step))
        params = [Param("strategy", curve["strategy"]), Param("seed", str(curve["seed"]))]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.log_text(run_id, json.dumps(curve, indent=1), "replay/curve.json")
        client.set_terminated(run_id, "FINISHED")
        return str(run_id)

    # ------------------------------------------------------------------ the production monitor
    def monitor_run(self, bundle_version: str, bundle_digest: str) -> str:
        """The id of the monitor run (kind ``monitor``) of bundle ``bundle_version``, created
        (finished, ``alert_count`` 0) on first use."""
        client = self.client
        runs = client.search_runs(
            [self.experiment_id()],
            filter_string=(
                "tags.`defect_loop.kind` = 'monitor' and "
                f"tags.`defect_loop.bundle_version` = '{bundle_version}'"
            ),
            max_results=1,
        )
        if runs:
            return str(runs[0].info.run_id)
        run = client.create_run(
            self.experiment_id(),
            run_name=f"monitor-bundle-v{bundle_version}",
            tags={
                TAG + "kind": "monitor",
                TAG + "bundle_version": bundle_version,
                TAG + "bundle_digest": bundle_digest,
                TAG + "alert_count": "0",
            },
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        return str(run.info.run_id)
