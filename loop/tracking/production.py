"""Deployment bundles and the ``production`` alias (`Production`, part of
`loop.tracking.Tracker`).

Bundles (`loop.bundle`) are versions of their own registered model (`bundle_model`), whose
``production`` alias names the bundle in use; every move of it is a run of kind ``production``
(who, when, from, to, why), so the history and rollback need no extra store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loop.bundle import SPEC_FILE
from loop.errors import ModelError
from loop.tracking.base import PRODUCTION, TAG, TrackerBase


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


class Production(TrackerBase):
    """Register bundles and move, list and roll back ``production``."""

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
        found = sorted(dest.rglob(SPEC_FILE)) if dest.is_dir() else []
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
            found = sorted(dest.rglob(SPEC_FILE))
        if not found:
            raise ModelError(
                f"bundle v{version} of {self.bundle_model} has no {SPEC_FILE}; deploy again"
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
