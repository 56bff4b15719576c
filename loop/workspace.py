"""The workspace layout: every file and folder a project keeps under its workspace, named once.

`ProjectConfig.paths` gives the `Workspace` of a loaded config; nothing else spells a path under
the workspace. A few parts own a folder and name what lies inside it themselves: the dataset
store (``datasets/<digest>/``: manifest and meta, `loop.datasets`), the monitor's database
(``monitor/``, `loop.review_queue`), the local Label Studio and Prefect servers' data
(``labelstudio/``, ``prefect-server/``, `loop.services`) and the lock file of a locked folder
(`loop.scheduling.CycleLock`).

::

    <workspace>/
      images/                 content-addressed image store (Label Studio's local storage)
      pool.json               the pool: sha256 -> file, size, source; skipped files
      state.json              current dataset version, round, pending tasks, pull cursor
      datasets/<digest>/      dataset versions; corrections.json beside each pulled one
      exports/<digest>/       YOLO exports of versions (what training reads)
      runs/                   Ultralytics training runs
      ultralytics/            Ultralytics' settings folder (offline configuration)
      scoring-models/         ONNX (and int8) exports of champions for scoring
      crossfit/<key>/         cached cross-fitted predictions (`defect-loop review-labels`)
      models/v<N>/            model versions downloaded from MLflow
      bundles/                deployment bundles (built, and production ones downloaded)
      monitor/                the production monitor's database
      reports/                lead reports (HTML + Markdown)
      evaluation.json         the champion's per-class test AP (pre-annotation filter)
      next_batch.json         the batch the last push sent (for the report)
      simulation.json         an oracle replay's random baseline (for the report)
      labelstudio-tasks.json  ledger of every task pushed
      rejected-tasks.json     Label Studio tasks pulls rejected
      label-review.json       the suspect labels pushed as review tasks, with their scores
      annotation-log.jsonl    every annotator's raw work and what each pull made of it
      labelstudio/            the local Label Studio's data; credentials.json
      prefect/                PREFECT_HOME of the commands
      prefect-server/         the local Prefect server's home
      mlflow.db, mlartifacts/ the default MLflow store
      logs/defect-loop.log    tracebacks of failed commands
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOG_NAME = "defect-loop.log"


@dataclass(frozen=True)
class Workspace:
    """The paths under one workspace folder ``root`` (absolute after `loop.config.load_config`)."""

    root: Path

    # --- images and labels
    @property
    def images(self) -> Path:
        """Content-addressed image store; also Label Studio's local-storage folder."""
        return self.root / "images"

    @property
    def pool(self) -> Path:
        return self.root / "pool.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    def corrections(self, digest: str) -> Path:
        """Correction analytics of the labels pulled into dataset version ``digest``."""
        return self.datasets / digest / "corrections.json"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    # --- models
    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def yolo_config(self) -> Path:
        return self.root / "ultralytics"

    @property
    def scoring_models(self) -> Path:
        return self.root / "scoring-models"

    def model_version(self, version: str) -> Path:
        """Where model version ``version`` is downloaded from the registry."""
        return self.root / "models" / f"v{version}"

    @property
    def crossfit(self) -> Path:
        """Cached cross-fitted predictions, one folder per key (`loop.crossfit.FoldCache`)."""
        return self.root / "crossfit"

    @property
    def evaluation(self) -> Path:
        """The champion's per-class test AP (`loop.quality`)."""
        return self.root / "evaluation.json"

    # --- deployment and monitoring
    @property
    def bundles(self) -> Path:
        """Deployment bundles built here and production bundles downloaded from MLflow."""
        return self.root / "bundles"

    @property
    def monitor(self) -> Path:
        """The monitor's state, window records, alerts and review queue."""
        return self.root / "monitor"

    # --- the report's inputs and outputs
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def next_batch(self) -> Path:
        return self.root / "next_batch.json"

    @property
    def simulation(self) -> Path:
        return self.root / "simulation.json"

    # --- Label Studio
    @property
    def ledger(self) -> Path:
        """Every task pushed (`loop.ledger.TaskLedger`)."""
        return self.root / "labelstudio-tasks.json"

    @property
    def rejections(self) -> Path:
        """Label Studio tasks that pulls rejected (`loop.ledger.RejectionLog`)."""
        return self.root / "rejected-tasks.json"

    @property
    def label_review(self) -> Path:
        """The suspect labels pushed as review tasks (`loop.review_tasks.ReviewRecord`)."""
        return self.root / "label-review.json"

    @property
    def annotation_log(self) -> Path:
        """Every pulled task's annotations and outcome (`loop.annotation_log`)."""
        return self.root / "annotation-log.jsonl"

    @property
    def labelstudio(self) -> Path:
        """The local Label Studio server's data folder (`defect-loop services`)."""
        return self.root / "labelstudio"

    @property
    def labelstudio_credentials(self) -> Path:
        return self.labelstudio / "credentials.json"

    # --- services and logs
    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def prefect_server(self) -> Path:
        return self.root / "prefect-server"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / LOG_NAME
