"""MLflow: training runs, dataset versions as run inputs, the model registry and the promotion gate.

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
``bootstrap``, ``preannotation_hidden`` (JSON list) and ``test_split_warnings`` (JSON list).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.config import ProjectConfig
from loop.datasets import DatasetStore, DatasetVersion, read_version_dir
from loop.errors import DatasetError, ModelError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.data.dataset_source import DatasetSource

    from loop.model import EvalResult, TrainResult
    from loop.scoring import ScoringModels

CANDIDATE = "candidate"
CHAMPION = "champion"
PRODUCTION = "production"
MANIFEST_SOURCE_TYPE = "defect_loop_manifest"
TAG = "defect_loop."


def quiet_mlflow_env() -> None:
    """Telemetry, progress bars and run-URL printing off before mlflow is used (mlflow ignores
    DO_NOT_TRACK=1, honours `true`). Explicit settings in the environment win."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a server, finishing a run prints "View run ... at: URL" to stdout (breaks JSON output).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@functools.cache
def manifest_source_class() -> type[DatasetSource]:
    """The `DefectLoopManifestSource` class, defined and registered with ``mlflow.data`` on first
    call (mlflow is imported lazily). Also reachable as ``loop.tracking.DefectLoopManifestSource``.

    A source is ``{"uri": ..., "digest": <64 hex>}``; ``uri`` is anything
    ``mlflow.artifacts.download_artifacts`` takes: ``runs:/<run>/dataset/manifest.parquet``,
    ``mlflow-artifacts:/...``, ``file:///...``, ``s3://...``. ``load()`` downloads the manifest and
    returns its local path; the built-in sources refuse ``runs:/`` and ``mlflow-artifacts:/``.
    Those two resolve against the current ``mlflow.set_tracking_uri`` (a `Tracker` sets it).
    """
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources, register_dataset_source

    class DefectLoopManifestSource(DatasetSource):
        """A defect-loop manifest (``manifest.parquet``) stored as an MLflow artifact."""

        def __init__(self, uri: str, digest: str = "") -> None:
            self.uri = uri
            self.digest = digest

        @staticmethod
        def _get_source_type() -> str:
            return MANIFEST_SOURCE_TYPE

        def load(self, dst_path: str | None = None) -> str:
            """Download the manifest (to ``dst_path`` or a temporary folder); its local path."""
            import mlflow.artifacts

            return mlflow.artifacts.download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False  # built explicitly, never guessed from a bare URI

        @classmethod
        def _resolve(cls, raw_source: Any) -> DefectLoopManifestSource:
            raise NotImplementedError("build DefectLoopManifestSource(uri, digest) explicitly")

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri, "digest": self.digest}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> DefectLoopManifestSource:
            return cls(str(source_dict["uri"]), str(source_dict.get("digest", "")))

    if not any(
        getattr(src, "__name__", "") == "DefectLoopManifestSource"
        for src in get_registered_sources()
    ):
        # mlflow annotates the argument as an instance; it stores and uses the class.
        register_dataset_source(DefectLoopManifestSource)  # type: ignore[arg-type]
    return DefectLoopManifestSource


def manifest_source(uri: str, digest: str = "") -> DatasetSource:
    """A `DefectLoopManifestSource` for the manifest at ``uri`` with our 64-hex ``digest``."""
    cls: Any = manifest_source_class()
    source: DatasetSource = cls(uri, digest)
    return source


def __getattr__(name: str) -> Any:
    # Lazy so that importing loop.tracking does not import mlflow (an mlflow.dataset_source
    # entry point may name "loop.tracking:DefectLoopManifestSource").
    if name == "DefectLoopManifestSource":
        return manifest_source_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


@dataclass(frozen=True)
class ProductionMove:
    """One move of the ``production`` alias of the bundle model (``action``: deploy, promote
    or rollback), recorded as an MLflow run of kind ``production``."""

    version: str
    previous: str | None
    action: str
    moved_by: str
    moved_at: str
    reason: str
    run_id: str


@dataclass(frozen=True)
class ProductionBundle:
    """The bundle the ``production`` alias names, downloaded to ``path``."""

    version: str
    run_id: str
    path: Path
    detector_version: str


@dataclass(frozen=True)
class Promotion:
    """The gate's decision; ``class_drops``: class -> AP50-95 drop (champion - candidate) of the
    classes that failed the per-class check (empty when none did)."""

    promoted: bool
    reason: str
    class_drops: Mapping[str, float] = field(default_factory=dict)


def metric_name(text: str, keep: str = "-_.") -> str:
    """``text`` with every character MLflow refuses in a metric key replaced by ``_``."""
    return "".join(ch if ch.isalnum() or ch in keep else "_" for ch in text)


def class_metric(prefix: str, kind: str, class_name: str) -> str:
    """Key of a per-class metric, e.g. ``class_metric("test", "ap50_95", "pit")`` ->
    ``test_ap50_95_pit``."""
    return f"{prefix}_{kind}_{metric_name(class_name)}"


def _metric_dict(prefix: str, ev: EvalResult, classes: list[str]) -> dict[str, float]:
    out = {
        f"{prefix}_map50": ev.map50,
        f"{prefix}_map50_95": ev.map50_95,
        f"{prefix}_precision": ev.precision,
        f"{prefix}_recall": ev.recall,
    }
    for c in classes:
        out[class_metric(prefix, "ap50", c)] = float(ev.per_class_ap50.get(c, 0.0))
        out[class_metric(prefix, "ap50_95", c)] = float(ev.per_class_ap50_95.get(c, 0.0))
        out[class_metric(prefix, "instances", c)] = float(ev.n_instances.get(c, 0))
    return out


def gate(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    classes: list[str],
    tolerance: float,
    max_class_drop: float,
    champion_version: str = "?",
) -> Promotion:
    """The promotion rule on two runs' metric dicts (pure; see `PromotionConfig`).

    Promote when there is no champion, when the champion has no test mAP50-95, or when the
    candidate's ``test_map50_95 >= champion's - tolerance`` and, for every class both runs have a
    ``test_ap50_95_<class>`` for, ``champion's - candidate's <= max_class_drop``.
    """
    if champion is None:
        return Promotion(True, "first model: no champion yet")
    new = candidate.get("test_map50_95")
    old = champion.get("test_map50_95")
    if new is None:
        return Promotion(False, "candidate has no test metrics (no labeled test images)")
    if old is None:
        return Promotion(True, f"champion v{champion_version} has no test metrics to beat")
    drops: dict[str, float] = {}
    for c in classes:
        key = class_metric("test", "ap50_95", c)
        if key in candidate and key in champion:
            drop = champion[key] - candidate[key]
            if drop > max_class_drop + 1e-12:
                drops[c] = round(drop, 6)
    overall_ok = new >= old - tolerance - 1e-12
    if overall_ok and not drops:
        return Promotion(
            True,
            f"test mAP50-95 {new:.4f} >= champion v{champion_version} {old:.4f} - {tolerance:g} "
            f"and no class AP50-95 dropped by more than {max_class_drop:g}",
        )
    parts = []
    if not overall_ok:
        parts.append(
            f"test mAP50-95 {new:.4f} < champion v{champion_version} {old:.4f} - {tolerance:g}"
        )
    for c, d in sorted(drops.items(), key=lambda kv: -kv[1]):
        key = class_metric("test", "ap50_95", c)
        parts.append(
            f"class {c!r} test AP50-95 {candidate[key]:.4f} < champion v{champion_version} "
            f"{champion[key]:.4f} - {max_class_drop:g} (drop {d:.4f})"
        )
    return Promotion(False, "; ".join(parts), drops)


class Tracker:
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
        if not (folder / "manifest.parquet").is_file():
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
        manifest_uri = f"runs:/{run_id}/dataset/manifest.parquet"
        try:
            all_params = {**params, "dataset_digest": version.digest, "n_images": len(version)}
            client.log_batch(
                run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(all_params.items())]
            )
            metrics: list[Metric] = []
            for step, ep in enumerate(result.epochs):
                for k, v in ep.items():
                    metrics.append(Metric("epoch_" + metric_name(k, "-_./"), float(v), 0, step))
            finals = _metric_dict("val", result.val, classes)
            if test is not None:
                finals.update(_metric_dict("test", test, classes))
            metrics += [Metric(k, float(v), 0, 0) for k, v in finals.items()]
            for i in range(0, len(metrics), 900):
                client.log_batch(run_id, metrics=metrics[i : i + 900])
            client.log_artifact(run_id, str(folder / "manifest.parquet"), "dataset")
            client.log_artifact(run_id, str(folder / "meta.json"), "dataset")
            client.log_artifact(run_id, str(result.weights), "weights")
            last = Path(result.weights).with_name("last.pt")
            if last.is_file() and last.resolve() != Path(result.weights).resolve():
                # The last epoch's weights: the committee's second opinion after one round.
                client.log_artifact(run_id, str(last), "checkpoints")
            if test is not None and test.confusion_matrix:
                client.log_text(
                    run_id,
                    json.dumps({"classes": classes, "matrix": test.confusion_matrix}),
                    "eval/confusion_matrix.json",
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

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log ``metrics`` to a (finished or running) run in batches of 900."""
        from mlflow.entities import Metric

        items = [Metric(metric_name(k), float(v), 0, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

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

    def champion_metrics(self) -> tuple[str, float | None] | None:
        """(champion model version, its test mAP50-95) or None; downloads nothing."""
        current = self._champion_run()
        if current is None:
            return None
        return current[0], current[1].data.metrics.get("test_map50_95")

    def last_trained_digest(self) -> str | None:
        """Dataset digest of the newest finished training run (None before the first)."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string="tags.`defect_loop.kind` = 'train' and attributes.status = 'FINISHED'",
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

    # ------------------------------------------------------------ deployment bundles, production
    # Bundles (`loop.deploy`) are versions of their own registered model (`bundle_model`), whose
    # ``production`` alias names the bundle in use; every move of it is a run of kind
    # ``production`` (who, when, from, to, why), so the history and rollback need no extra store.

    @property
    def bundle_model(self) -> str:
        return self.cfg.deploy.registered_model or f"{self.cfg.mlflow.registered_model}-bundle"

    def log_bundle(
        self,
        bundle_dir: Path,
        *,
        detector_version: str,
        detector_run_id: str,
        dataset_digest: str,
        digest: str,
    ) -> tuple[str, str]:
        """Log ``bundle_dir`` as the ``bundle/`` artifacts of a new run (kind ``deploy``) and
        register it as a new version of `bundle_model`; returns (run id, bundle version)."""
        client = self.client
        run = client.create_run(
            self.experiment_id(),
            run_name=f"deploy-detector-v{detector_version}",
            tags={
                TAG + "kind": "deploy",
                TAG + "detector_version": detector_version,
                TAG + "detector_run_id": detector_run_id,
                TAG + "dataset_digest": dataset_digest,
                TAG + "bundle_digest": digest,
            },
        )
        run_id = str(run.info.run_id)
        try:
            client.log_artifacts(run_id, str(bundle_dir), "bundle")
            name = self.bundle_model
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                client.create_registered_model(name)
            mv = client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/bundle",
                run_id=run_id,
                tags={
                    "detector_version": detector_version,
                    "bundle_digest": digest,
                    "dataset_digest": dataset_digest,
                },
            )
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id, str(mv.version)

    def production_version(self) -> str | None:
        """The bundle version the ``production`` alias names (None before the first deploy)."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.bundle_model, PRODUCTION)
        except MlflowException:
            return None
        return str(mv.version)

    def production(self) -> ProductionBundle | None:
        """The production bundle downloaded to ``<workspace>/bundles/production-v<N>`` (kept
        for the next call), or None when nothing was deployed."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.bundle_model, PRODUCTION)
        except MlflowException:
            return None
        version = str(mv.version)
        dest = self.cfg.paths.bundles / f"production-v{version}"
        found = sorted(dest.rglob("bundle.json")) if dest.is_dir() else []
        if not found:
            import mlflow.artifacts

            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
            tmp.mkdir(parents=True, exist_ok=True)
            # By number, not by alias: the alias may move while we download.
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.bundle_model}/{version}",
                dst_path=str(tmp),
                tracking_uri=self.cfg.mlflow_uri,
            )
            os.replace(tmp, dest)
            found = sorted(dest.rglob("bundle.json"))
        if not found:
            raise ModelError(
                f"bundle v{version} of {self.bundle_model} has no bundle.json; deploy again"
            )
        return ProductionBundle(
            version, str(mv.run_id), found[0].parent, str(mv.tags.get("detector_version", ""))
        )

    def move_production(
        self, version: str, moved_by: str, action: str = "promote", reason: str = ""
    ) -> ProductionMove:
        """Point ``production`` at bundle ``version`` and record the move (a run of kind
        ``production`` with who, when, from, to and why; tags on the model version too)."""
        from datetime import UTC, datetime

        from mlflow.exceptions import MlflowException

        client = self.client
        name = self.bundle_model
        try:
            client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise ModelError(
                f"{name} has no version {version}; see `defect-loop deploy history`"
            ) from exc
        previous = self.production_version()
        moved_at = datetime.now(UTC).isoformat(timespec="microseconds")
        run = client.create_run(
            self.experiment_id(),
            run_name=f"production-{action}-v{version}",
            tags={
                TAG + "kind": "production",
                TAG + "action": action,
                TAG + "version": str(version),
                TAG + "previous": previous or "",
                TAG + "moved_by": moved_by,
                TAG + "moved_at": moved_at,
                TAG + "reason": reason[:5000],
            },
        )
        client.set_registered_model_alias(name, PRODUCTION, str(version))
        client.set_model_version_tag(name, str(version), "production_moved_by", moved_by)
        client.set_model_version_tag(name, str(version), "production_moved_at", moved_at)
        client.set_terminated(run.info.run_id, "FINISHED")
        return ProductionMove(
            str(version), previous, action, moved_by, moved_at, reason, str(run.info.run_id)
        )

    def production_history(self) -> list[ProductionMove]:
        """Every recorded move of ``production``, oldest first."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string="tags.`defect_loop.kind` = 'production'",
            order_by=["attributes.start_time ASC"],
        )
        moves = [
            ProductionMove(
                r.data.tags.get(TAG + "version", ""),
                r.data.tags.get(TAG + "previous") or None,
                r.data.tags.get(TAG + "action", ""),
                r.data.tags.get(TAG + "moved_by", ""),
                r.data.tags.get(TAG + "moved_at", ""),
                r.data.tags.get(TAG + "reason", ""),
                str(r.info.run_id),
            )
            for r in runs
        ]
        return sorted(moves, key=lambda m: m.moved_at)

    def rollback_target(self) -> str:
        """The production version before the current one: the moves are replayed as a stack
        (deploy and promote push, rollback pops), so two rollbacks go two versions back."""
        stack: list[str] = []
        for m in self.production_history():
            if m.action == "rollback":
                if stack:
                    stack.pop()
                if not stack or stack[-1] != m.version:
                    stack.append(m.version)
            else:
                stack.append(m.version)
        current = self.production_version()
        if current is None:
            raise ModelError("nothing is in production yet: run `defect-loop deploy` first")
        if not stack or stack[-1] != current:
            raise ModelError(
                f"production (v{current}) was moved outside defect-loop (its last recorded move "
                f"is to v{stack[-1] if stack else '?'}); choose the version yourself with "
                "`defect-loop deploy promote VERSION`"
            )
        if len(stack) < 2:
            raise ModelError(f"v{current} is the first production bundle: nothing to roll back to")
        return stack[-2]

    def rollback_production(self, moved_by: str, reason: str = "") -> ProductionMove:
        """Move ``production`` back to the version before the current one (`rollback_target`)."""
        return self.move_production(self.rollback_target(), moved_by, "rollback", reason)
