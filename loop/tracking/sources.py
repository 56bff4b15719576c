"""MLflow's environment and defect-loop's dataset source type (`DefectLoopManifestSource`)."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.data.dataset_source import DatasetSource

MANIFEST_SOURCE_TYPE = "defect_loop_manifest"


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
