"""Training runs, dataset versions as run inputs, the model registry and the champion
(`ModelRegistry`, part of `loop.tracking.Tracker`)."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.datasets import MANIFEST_FILE, META_FILE, DatasetStore, DatasetVersion, read_version_dir
from loop.errors import DatasetError, ModelError
from loop.tracking.base import (
    CANDIDATE,
    CHAMPION,
    CONFUSION_ARTIFACT,
    FINISHED_TRAINING,
    TAG,
    TrackerBase,
)
from loop.tracking.gate import (
    GATE_METRIC,
    Promotion,
    class_metric,
    gate,
    metric_dict,
    metric_name,
)
from loop.tracking.sources import manifest_source

if TYPE_CHECKING:
    from loop.model import EvalResult, TrainResult
    from loop.scoring import ScoringModels


@dataclass(frozen=True)
class Champion:
    """The champion model version: its run, local weights, test mAP50-95 and the per-class
    validation AP50 / box counts of its run (empty when the run did not log them)."""

    version: str
    run_id: str
    weights: Path
    test_map50_95: float | None
    val_ap50: Mapping[str, float] = field(default_factory=dict)
    val_instances: Mapping[str, int] = field(default_factory=dict)


class ModelRegistry(TrackerBase):
    """Log trainings, register their weights, find and move the champion."""

    def log_training(
        self,
        *,
        version: DatasetVersion,
        store: DatasetStore,
        result: TrainResult,
        test: EvalResult | None,
        params: Mapping[str, Any],
        round_index: int,
        config_text: str | None = None,
    ) -> str:
        """Log one training run; returns the MLflow run id. Batches metrics (one call per kind).

        ``version`` must be saved in ``store``. ``result``: ``epochs`` (one dict per epoch ->
        ``epoch_<key>`` metrics at step = epoch index), ``val``, ``weights`` (a file).
        ``config_text``: the project YAML, logged as ``config/defect-loop.yaml``.
        """
        from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        folder = store.path(version.digest)
        if not (folder / MANIFEST_FILE).is_file():
            raise DatasetError(
                f"dataset version {version.short} is not saved in {store.root}; "
                "call DatasetStore.save(version) before logging a run on it"
            )
        if not Path(result.weights).is_file():
            raise ModelError(f"weights file {result.weights} does not exist; train again")
        client = self.client
        classes = list(version.classes)
        run = client.create_run(
            self.experiment_id(),
            run_name=f"round-{round_index}-train-{version.short}",
            tags={
                TAG + "kind": "train",
                TAG + "round": str(round_index),
                TAG + "dataset_digest": version.digest,
                TAG + "dataset_parent": version.parent or "",
                TAG + "test_split_digest": version.split_digest("test"),
            },
        )
        run_id = str(run.info.run_id)
        manifest_uri = f"runs:/{run_id}/dataset/{MANIFEST_FILE}"
        try:
            all_params = {**params, "dataset_digest": version.digest, "n_images": len(version)}
            if result.transfer is not None:
                # A detector seeded a segmentation model: how much of it carried over.
                t = result.transfer
                all_params["weights_transferred"] = f"{t.transferred}/{t.total}"
                all_params["backbone_transferred"] = f"{t.backbone_transferred}/{t.backbone_total}"
            client.log_batch(
                run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(all_params.items())]
            )
            metrics: list[Metric] = []
            for step, ep in enumerate(result.epochs):
                for k, v in ep.items():
                    metrics.append(Metric("epoch_" + metric_name(k, "-_./"), float(v), 0, step))
            finals = metric_dict("val", result.val, classes)
            if test is not None:
                finals.update(metric_dict("test", test, classes))
            metrics += [Metric(k, float(v), 0, 0) for k, v in finals.items()]
            for i in range(0, len(metrics), 900):
                client.log_batch(run_id, metrics=metrics[i : i + 900])
            client.log_artifact(run_id, str(folder / MANIFEST_FILE), "dataset")
            client.log_artifact(run_id, str(folder / META_FILE), "dataset")
            client.log_artifact(run_id, str(result.weights), "weights")
            last = Path(result.weights).with_name("last.pt")
            if last.is_file() and last.resolve() != Path(result.weights).resolve():
                # The last epoch's weights: the committee's second opinion after one round.
                client.log_artifact(run_id, str(last), "checkpoints")
            if test is not None and test.confusion_matrix:
                client.log_text(
                    run_id,
                    json.dumps({"classes": classes, "matrix": test.confusion_matrix}),
                    CONFUSION_ARTIFACT,
                )
            if config_text is not None:
                client.log_text(run_id, config_text, "config/defect-loop.yaml")
            client.log_inputs(
                run_id,
                datasets=[
                    DatasetInput(
                        self._mlflow_dataset(version, manifest_uri),
                        tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")],
                    )
                ],
            )
            client.log_batch(
                run_id,
                tags=[
                    RunTag(TAG + "dataset_uri", manifest_uri),
                    RunTag(TAG + "weights_file", Path(result.weights).name),
                    RunTag(TAG + "status", "logged"),
                ],
            )
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id

    def _mlflow_dataset(self, version: DatasetVersion, manifest_uri: str) -> Any:
        """The ``mlflow.entities.Dataset`` of an ``mlflow.data`` PandasDataset (one row per
        image: sha256, path, split, n_boxes) whose source is the manifest at ``manifest_uri``."""
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        df = pd.DataFrame(
            {
                "sha256": [r.sha256 for r in version.rows],
                "path": [r.path for r in version.rows],
                "split": [r.split for r in version.rows],
                "n_boxes": [len(r.boxes) for r in version.rows],
            }
        )
        source = manifest_source(manifest_uri, version.digest)
        # Our digest covers every row and box; MLflow's default covers only the first 10k rows.
        with warnings.catch_warnings():
            # MLflow warns that integer columns could hold missing values; ours never do.
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(
                df, source=source, name=f"labels-{version.short}", digest=version.digest[:36]
            )
            return dataset._to_mlflow_entity()  # computes the schema: inside the filter

    def load_dataset_version(
        self, run_id: str, store: DatasetStore | None = None
    ) -> DatasetVersion:
        """The dataset version a training run was logged with, read back from its ``dataset``
        artifacts and verified against the run's ``defect_loop.dataset_digest`` tag. With
        ``store``, also saved there (a no-op when it is already)."""
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise DatasetError(
                f"MLflow run {run_id} not found at {self.cfg.mlflow_uri}; "
                "take a run id from `defect-loop status` or the MLflow UI"
            ) from exc
        expected = run.data.tags.get(TAG + "dataset_digest")
        if not expected:
            raise DatasetError(
                f"MLflow run {run_id} has no dataset version (tag {TAG}dataset_digest); "
                "only training runs logged by defect-loop carry one"
            )
        with tempfile.TemporaryDirectory(prefix="defect-loop-ds-") as d:
            try:
                local = client.download_artifacts(run_id, "dataset", d)
            except (MlflowException, OSError) as exc:
                raise DatasetError(
                    f"could not download the dataset artifacts of run {run_id}: {exc}; "
                    "check that the artifact store is reachable"
                ) from exc
            version = read_version_dir(Path(local), expected)
        if store is not None:
            store.save(version)
        return version

    def register(self, run_id: str) -> str:
        """Register the run's weights as a new model version with alias ``candidate``."""
        client = self.client
        name = self.cfg.mlflow.registered_model
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name)
        run = client.get_run(run_id)
        source = f"{run.info.artifact_uri}/weights"
        tags = {"dataset_digest": run.data.tags.get(TAG + "dataset_digest", "")}
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        client.set_registered_model_alias(name, CANDIDATE, mv.version)
        return str(mv.version)

    def champion(self) -> Champion | None:
        """The current champion with its weights downloaded locally, or None before the first."""
        from mlflow.exceptions import MlflowException

        name = self.cfg.mlflow.registered_model
        try:
            mv = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return None
        if mv.run_id is None:
            raise ModelError(f"model version {mv.version} of {name} has no run; re-register it")
        run = self.client.get_run(mv.run_id)
        weights = self._download_weights(str(mv.version), run)
        metrics = run.data.metrics
        classes = list(self.cfg.classes)
        ap = {c: metrics[k] for c in classes if (k := class_metric("val", "ap50", c)) in metrics}
        n = {
            c: int(metrics[k])
            for c in classes
            if (k := class_metric("val", "instances", c)) in metrics
        }
        return Champion(
            str(mv.version), str(mv.run_id), weights, metrics.get("test_map50_95"), ap, n
        )

    def scoring_models(self, committee_size: int) -> ScoringModels:
        """The champion as `loop.scoring.ScoringModels`: its weights, its per-class validation
        AP50 and box counts (None when its run logged none), and a committee of the newest other
        registered versions (up to ``committee_size - 1``; with none, the champion run's
        last-epoch weights when they were logged). Raises `ModelError` before the first model."""
        from loop.scoring import ScoringModels

        champ = self.champion()
        if champ is None:
            raise ModelError("no champion model yet: run `defect-loop train` first")
        name = self.cfg.mlflow.registered_model
        others = sorted(
            (
                mv
                for mv in self.client.search_model_versions(f"name = '{name}'")
                if str(mv.version) != champ.version and mv.run_id
            ),
            key=lambda mv: -int(mv.version),
        )[: max(committee_size - 1, 0)]
        committee = [
            self._download_weights(str(mv.version), self.client.get_run(str(mv.run_id)))
            for mv in others
        ]
        if not committee and committee_size > 1:
            last = self._download_last(champ)
            if last is not None:
                committee = [last]
        complete = set(champ.val_ap50) == set(self.cfg.classes)
        return ScoringModels(
            weights=champ.weights,
            committee=tuple(committee),
            val_ap50=dict(champ.val_ap50) if complete else None,
            val_instances=dict(champ.val_instances) if complete else None,
            name=f"v{champ.version}",
        )

    def _download_last(self, champ: Champion) -> Path | None:
        """The champion run's ``checkpoints/last.pt`` (None when it was not logged)."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        dest = self.cfg.paths.model_version(champ.version) / "checkpoints"
        target = dest / "last.pt"
        if not target.is_file():
            try:
                mlflow.artifacts.download_artifacts(
                    run_id=champ.run_id,
                    artifact_path="checkpoints/last.pt",
                    dst_path=str(dest.parent),
                    tracking_uri=self.cfg.mlflow_uri,
                )
            except (MlflowException, OSError):
                return None
        return target if target.is_file() else None

    def _download_weights(self, version: str, run: Any) -> Path:
        import mlflow.artifacts

        dest = self.cfg.paths.model_version(version)
        name = run.data.tags.get(TAG + "weights_file", "best.pt")
        if not (dest / "weights" / name).exists():
            dest.mkdir(parents=True, exist_ok=True)
            # By number, not by alias: the alias may move while we download.
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.cfg.mlflow.registered_model}/{version}",
                dst_path=str(dest / "weights"),
                tracking_uri=self.cfg.mlflow_uri,
            )
        found = sorted((dest / "weights").rglob(name))
        if not found:
            raise ModelError(
                f"champion v{version} has no weights file {name}; retrain with `defect-loop train`"
            )
        return found[0]

    def promote_if_better(
        self,
        model_version: str,
        run_id: str,
        tolerance: float | None = None,
        max_class_drop: float | None = None,
    ) -> Promotion:
        """Move ``champion`` to ``model_version`` when the point-estimate `gate` allows it on the
        runs' logged metrics (defaults: the config's ``promotion`` section), via
        `apply_promotion`. The loop itself uses the paired gate (`loop.quality`); this one
        serves runs without per-image statistics (no test split)."""
        tol = self.cfg.promotion.tolerance if tolerance is None else tolerance
        mcd = self.cfg.promotion.max_class_drop if max_class_drop is None else max_class_drop
        client = self.client
        new_run = client.get_run(run_id)
        current = self._champion_run()
        decision = gate(
            new_run.data.metrics,
            None if current is None else current[1].data.metrics,
            list(self.cfg.classes),
            tol,
            mcd,
            "?" if current is None else current[0],
            metric=GATE_METRIC[self.cfg.task],
        )
        reason = decision.reason
        if current is not None:
            old_test = current[1].data.tags.get(TAG + "test_split_digest")
            new_test = new_run.data.tags.get(TAG + "test_split_digest")
            if old_test and new_test and old_test != new_test:
                reason += " (note: the champion was tested on a different test split)"
        decision = Promotion(decision.promoted, reason, decision.class_drops)
        return self.apply_promotion(
            model_version, run_id, decision, "" if current is None else current[0]
        )

    def apply_promotion(
        self,
        model_version: str,
        run_id: str,
        decision: Promotion,
        compared_to: str,
        tags: Mapping[str, str] | None = None,
    ) -> Promotion:
        """Carry out a gate's ``decision``: move ``champion`` to ``model_version`` when promoted;
        tag the run with the decision, reason, compared champion version, failing classes and
        ``tags`` (keys get the ``defect_loop.`` prefix); tag the model version too."""
        from mlflow.entities import RunTag

        client = self.client
        name = self.cfg.mlflow.registered_model
        reason = decision.reason
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, model_version)
        extra = [RunTag(TAG + k, str(v)[:5000]) for k, v in sorted((tags or {}).items())]
        client.log_batch(
            run_id,
            tags=[
                RunTag(TAG + "promoted", str(decision.promoted).lower()),
                RunTag(TAG + "promotion_reason", reason[:5000]),
                RunTag(TAG + "compared_to", compared_to),
                RunTag(TAG + "class_drops", json.dumps(dict(decision.class_drops))),
                *extra,
            ],
        )
        client.set_model_version_tag(
            name, model_version, "promoted", str(decision.promoted).lower()
        )
        client.set_model_version_tag(name, model_version, "promotion_reason", reason[:5000])
        return decision

    def _champion_run(self) -> tuple[str, Any] | None:
        """(champion model version, its run) or None."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.cfg.mlflow.registered_model, CHAMPION)
        except MlflowException:
            return None
        return str(mv.version), self.client.get_run(str(mv.run_id))

    def last_trained_digest(self) -> str | None:
        """Dataset digest of the newest finished training run (None before the first)."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=FINISHED_TRAINING,
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].data.tags.get(TAG + "dataset_digest") if runs else None

    def training_runs(self) -> list[dict[str, Any]]:
        """All training runs, oldest first, with their dataset digest and test metrics."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string="tags.`defect_loop.kind` = 'train'",
            order_by=["attributes.start_time ASC"],
        )
        return [
            {
                "run_id": r.info.run_id,
                "round": r.data.tags.get(TAG + "round"),
                "dataset_digest": r.data.tags.get(TAG + "dataset_digest"),
                "metrics": dict(r.data.metrics),
                "status": r.info.status,
                "promoted": r.data.tags.get(TAG + "promoted"),
            }
            for r in runs
        ]
