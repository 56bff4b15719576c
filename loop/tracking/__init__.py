"""MLflow: the only package that imports it. Training runs, dataset versions as run inputs, the
model registry, the promotion gate, deployment bundles and the other runs the loop records.

Default store: a SQLite file plus local artifacts in the workspace (no server); with
``mlflow.tracking_uri: http://...`` the server stores artifacts. Every training run logs params,
per-epoch metrics, val and test metrics (mAP, precision, recall, per-class AP), the confusion
matrix, the project config, the dataset version (``dataset/manifest.parquet`` + ``meta.json``
artifacts and an ``mlflow.data`` input whose source is a `DefectLoopManifestSource` pointing at
that artifact, digest = our full-content digest cut to the 36 characters MLflow stores) and the
weights, which are registered as a model version with alias ``candidate``; the gate moves
``champion``.

Run tags written here (all prefixed ``defect_loop.``): ``kind``, ``round``, ``dataset_digest``
(64 hex), ``dataset_parent``, ``test_split_digest``, ``dataset_uri``, ``weights_file``, ``status``
and, after the gate, ``promoted``, ``promotion_reason``, ``compared_to``, ``class_drops`` (JSON)
plus, from the paired gate (`loop.quality`), ``gate_verdict``, ``gate_difference``,
``bootstrap``, ``preannotation_hidden`` (JSON list) and ``test_split_warnings`` (JSON list);
``label_quality_error`` when the annotation log could not be read. A training run also gets the
label quality of the annotation log (``label_quality.*`` metrics and
``label_quality/label_quality.json``, `Records.log_label_quality`).

One module per concern, joined in `Tracker`: `base` (the client, the experiment), `models`
(trainings, registry, champion), `production` (bundles and the ``production`` alias), `records`
(what the report, the replay and the monitor read and write); `gate` is the pure point-estimate
promotion rule and `sources` MLflow's environment and our dataset source type.
"""

from __future__ import annotations

from typing import Any

from loop.tracking.base import (
    CANDIDATE,
    CHAMPION,
    CONFUSION_ARTIFACT,
    LABEL_QUALITY_ARTIFACT,
    PRODUCTION,
    TAG,
)
from loop.tracking.gate import Promotion, class_metric, gate, metric_name
from loop.tracking.models import Champion, ModelRegistry
from loop.tracking.production import Production, ProductionBundle, ProductionMove
from loop.tracking.records import Records, TrainingRun
from loop.tracking.sources import (
    MANIFEST_SOURCE_TYPE,
    manifest_source,
    manifest_source_class,
    quiet_mlflow_env,
)


class Tracker(ModelRegistry, Production, Records):
    """MLflow for one project (see the module docstring). No connection is opened until a
    method runs."""


def __getattr__(name: str) -> Any:
    # Lazy so that importing loop.tracking does not import mlflow (an mlflow.dataset_source
    # entry point may name "loop.tracking:DefectLoopManifestSource").
    if name == "DefectLoopManifestSource":
        return manifest_source_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "CONFUSION_ARTIFACT",
    "LABEL_QUALITY_ARTIFACT",
    "MANIFEST_SOURCE_TYPE",
    "PRODUCTION",
    "TAG",
    "Champion",
    "ProductionBundle",
    "ProductionMove",
    "Promotion",
    "Tracker",
    "TrainingRun",
    "class_metric",
    "gate",
    "manifest_source",
    "manifest_source_class",
    "metric_name",
    "quiet_mlflow_env",
]
