"""The MLflow client of one project (`TrackerBase`) and the names it writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from loop.config import ProjectConfig
from loop.tracking.gate import metric_name
from loop.tracking.sources import manifest_source_class, quiet_mlflow_env

if TYPE_CHECKING:
    from mlflow import MlflowClient

CANDIDATE = "candidate"

CHAMPION = "champion"

PRODUCTION = "production"

TAG = "defect_loop."
# Where a training run keeps its test confusion matrix (JSON: classes, matrix).
CONFUSION_ARTIFACT = "eval/confusion_matrix.json"
# Where a training run keeps the label quality table (`loop.annotator_quality.label_quality_to_json`).
LABEL_QUALITY_ARTIFACT = "label_quality/label_quality.json"
# The search filter of finished training runs.
FINISHED_TRAINING = "tags.`defect_loop.kind` = 'train' and attributes.status = 'FINISHED'"


class TrackerBase:
    """Thin wrapper over MLflow for one project. No connection is opened until a method runs."""

    def __init__(self, cfg: ProjectConfig) -> None:
        self.cfg = cfg
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            quiet_mlflow_env()
            import mlflow

            mlflow.set_tracking_uri(self.cfg.mlflow_uri)
            mlflow.set_registry_uri(self.cfg.mlflow_uri)
            manifest_source_class()  # so mlflow.data.get_source can parse our inputs
            self._client = mlflow.MlflowClient(self.cfg.mlflow_uri, self.cfg.mlflow_uri)
        return self._client

    def _artifact_location(self) -> str | None:
        """Workspace folder for a local store; None (the server's choice) for a tracking server."""
        uri = self.cfg.mlflow_uri
        if uri.startswith(("http://", "https://", "databricks")):
            return None
        return self.cfg.mlflow_artifact_location

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.mlflow.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        return str(
            self.client.create_experiment(
                self.cfg.mlflow.experiment, artifact_location=self._artifact_location()
            )
        )

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log ``metrics`` to a (finished or running) run in batches of 900."""
        from mlflow.entities import Metric

        items = [Metric(metric_name(k), float(v), 0, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])
