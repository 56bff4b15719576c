"""`deploy`: bundle a project's champion (`loop.bundle`), register the bundle in MLflow and move
the ``production`` alias to it, recording who moved it and when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.bundle import Progress, build_bundle, current_user
from loop.errors import DeployError

if TYPE_CHECKING:
    from loop.project import Project
    from loop.tracking import ProductionMove, Tracker


# ----------------------------------------------------------------------------- deploy a project


@dataclass(frozen=True)
class DeployOutcome:
    """``bundle_version``: the bundle's version in the bundle registered model;
    ``production``: the move of the ``production`` alias (None with ``activate=False``)."""

    bundle_dir: Path
    digest: str
    detector_version: str
    bundle_version: str
    run_id: str
    production: ProductionMove | None


def _sample(rows: list[tuple[str, Path]], k: int, seed: int) -> list[tuple[str, Path]]:
    """At most ``k`` of ``rows`` (sorted by sha256), a seeded random choice when more."""
    rows = sorted(rows)
    if len(rows) <= k:
        return rows
    keep = np.random.default_rng(seed).choice(len(rows), size=k, replace=False)
    return [rows[i] for i in sorted(keep.tolist())]


def deploy(
    project: Project,
    tracker: Tracker,
    out_dir: Path | None = None,
    moved_by: str | None = None,
    reason: str = "",
    activate: bool = True,
    progress: Progress | None = None,
) -> DeployOutcome:
    """Bundle the project's champion, register it in MLflow and (``activate``) move the
    ``production`` alias to it, recording who (``moved_by``, default ``user@host``) and when.

    The reference comes from the champion's dataset version (its training run's input): the
    held-out val + test images and the train images (see `DeployConfig`). Default folder
    ``<workspace>/bundles/v<detector version>-<time>``. Raises `DeployError`.
    """
    cfg = project.cfg
    dcfg = cfg.deploy
    champ = tracker.champion()
    if champ is None:
        raise DeployError("no champion model yet: run `defect-loop train` (or a cycle) first")
    metrics = tracker.run_metrics(champ.run_id)
    version = tracker.load_dataset_version(champ.run_id, project.store)
    held: list[tuple[str, Path]] = []
    train: list[tuple[str, Path]] = []
    missing = 0
    for r in version.rows:
        if r.sha256 not in project.pool:
            missing += 1
            continue
        (train if r.split == "train" else held).append((r.sha256, project.pool.abs_path(r.sha256)))
    if len(held) < dcfg.min_reference:
        raise DeployError(
            f"the champion's dataset version {version.short} has {len(held)} held-out (val + "
            f"test) images in the pool; the monitor's reference needs at least "
            f"{dcfg.min_reference} (deploy.min_reference): label more images first"
        )
    if not train:
        raise DeployError(f"the champion's dataset version {version.short} has no train images")
    reference = _sample(held, dcfg.reference_images, dcfg.seed)
    neighbours = _sample(train, dcfg.neighbour_images, dcfg.seed)
    classes = list(cfg.classes)
    m = metrics
    test_metrics = None
    if "test_map50_95" in m:
        from loop.tracking import class_metric

        test_metrics = {
            "map50": m.get("test_map50"),
            "map50_95": m.get("test_map50_95"),
            "per_class": {
                c: {
                    "ap50": m.get(class_metric("test", "ap50", c)),
                    "ap50_95": m.get(class_metric("test", "ap50_95", c)),
                }
                for c in classes
            },
        }
    source = {
        "registered_model": cfg.mlflow.registered_model,
        "model_version": champ.version,
        "run_id": champ.run_id,
        "dataset_digest": version.digest,
    }
    card = {
        "test_metrics": test_metrics,
        "dataset": {
            "digest": version.digest,
            "n_images": len(version),
            "splits": version.split_counts(),
            "class_counts": version.class_counts(),
            "images_not_in_pool": missing,
        },
        "reference": {"splits": ["val", "test"], "seed": dcfg.seed},
    }
    int8 = dcfg.int8 if dcfg.int8 is not None else cfg.scoring.backend == "onnx-int8"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(out_dir) if out_dir is not None else cfg.paths.bundles / f"v{champ.version}-{stamp}"
    bundle = build_bundle(
        champ.weights,
        out,
        classes,
        cfg.train.imgsz,
        cfg.paths.yolo_config,
        reference,
        neighbours,
        candidate_conf=cfg.select.candidate_conf,
        min_candidates=cfg.select.min_candidates,
        defect_conf=dcfg.defect_conf
        if dcfg.defect_conf is not None
        else cfg.select.preannotation_conf,
        int8=int8,
        calibration=[p for _, p in train],
        calibration_images=cfg.scoring.calibration_images,
        source=source,
        card=card,
        threads=cfg.train.threads,
        progress=progress,
    )
    if progress:
        progress("registering the bundle in MLflow")
    run_id, bundle_version = tracker.log_bundle(
        bundle.root,
        detector_version=champ.version,
        detector_run_id=champ.run_id,
        dataset_digest=version.digest,
        digest=bundle.digest,
    )
    move = None
    if activate:
        move = tracker.move_production(
            bundle_version, moved_by or current_user(), action="deploy", reason=reason
        )
    return DeployOutcome(bundle.root, bundle.digest, champ.version, bundle_version, run_id, move)
