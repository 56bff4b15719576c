"""Out-of-sample predictions by cross-fitting, for label error finding (`loop.label_errors`).

The labeled images are dealt into ``k`` folds; for each fold a model is trained on the other
folds' images and predicts the fold's own images. Every image is thus predicted by a model that
never saw it (neither to fit its weights nor to pick its best epoch), so the predictions can
disagree with the image's labels where the labels are wrong.

`cross_fit` is the plain procedure over two callables (train a fold, predict images), so that it
can be tested with fakes; `project_cross_fit` binds it to a `Project`: the current dataset
version's train and val images, Ultralytics training (`loop.model.train`) from the configured
start and torch prediction (`loop.model.predict`) at ``select.candidate_conf``. Images are keyed
by sha256; boxes are pixel xyxy (`loop.detections`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.datasets import DatasetVersion
from loop.detections import Detections
from loop.errors import DatasetError, LabelQualityError, ModelError

if TYPE_CHECKING:
    from loop.project import Project

TrainFold = Callable[[int, Sequence[str]], Path]
"""``(fold, training image sha256s) -> weights`` of a model trained on exactly those images."""
PredictImages = Callable[[Path, Sequence[str]], Iterable[Detections]]
"""``(weights, image sha256s) -> one Detections (with confidences) per image, in order``."""


@dataclass(frozen=True)
class OutOfSample:
    """Predictions for one image from the model of the fold that held it out."""

    sha256: str
    fold: int
    predictions: Detections


def assign_folds(shas: Sequence[str], k: int, seed: int = 0) -> dict[str, int]:
    """sha256 -> fold in ``0..k-1``. The sorted hashes are shuffled with ``seed`` and dealt in
    turn, so fold sizes differ by at most one and the result depends on the set of images and
    the seed, never on the input order. Raises `LabelQualityError` for ``k < 2``, fewer images
    than folds, or a repeated sha256."""
    if k < 2:
        raise LabelQualityError(f"cross-fitting needs at least 2 folds, got {k}")
    unique = sorted(set(shas))
    if len(unique) != len(shas):
        raise LabelQualityError("an image is listed twice; give each sha256 once")
    if len(unique) < k:
        raise LabelQualityError(
            f"{len(unique)} images cannot fill {k} folds; label more images or use fewer folds"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[int(j)]: pos % k for pos, j in enumerate(order)}


def cross_fit(
    shas: Sequence[str],
    k: int,
    train_fold: TrainFold,
    predict: PredictImages,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, OutOfSample]:
    """Out-of-sample predictions for every image of ``shas`` (see the module docstring).

    For each fold ``f`` (in order): ``train_fold(f, others)`` with the images of every other
    fold (sorted), then ``predict(weights, held_out)`` on fold ``f``'s images (sorted). Returns
    sha256 -> `OutOfSample`. Raises `ModelError` when ``predict`` returns a different number of
    results than images asked for, and what `assign_folds` raises.
    """
    fold_of = assign_folds(shas, k, seed)
    out: dict[str, OutOfSample] = {}
    for f in range(k):
        held_out = sorted(s for s, g in fold_of.items() if g == f)
        training = sorted(s for s, g in fold_of.items() if g != f)
        if progress:
            progress(f"fold {f + 1}/{k}: training on {len(training)} images")
        weights = train_fold(f, training)
        if progress:
            progress(f"fold {f + 1}/{k}: predicting its {len(held_out)} held-out images")
        preds = list(predict(weights, held_out))
        if len(preds) != len(held_out):
            raise ModelError(
                f"fold {f + 1}: the predictor returned {len(preds)} results for "
                f"{len(held_out)} images; it must return one per image, in order"
            )
        for sha, det in zip(held_out, preds, strict=True):
            out[sha] = OutOfSample(sha, f, det)
    return out


def fold_version(version: DatasetVersion, training: Iterable[str]) -> DatasetVersion:
    """The rows of ``version`` whose sha256 is in ``training``, each in its own split (train or
    val: Ultralytics needs both), as a version of its own (parent: ``version``). Test rows never
    enter. Raises `DatasetError` when the fold has no train or no val image."""
    keep = set(training)
    rows = [r for r in version.rows if r.sha256 in keep and r.split != "test"]
    fold = DatasetVersion.create(version.classes, rows, parent=version.digest)
    counts = fold.split_counts()
    if counts["train"] == 0 or counts["val"] == 0:
        raise DatasetError(
            f"a cross-fitting fold of {version.short} has {counts['train']} train and "
            f"{counts['val']} val images; training needs both: label more images or use "
            "fewer folds"
        )
    return fold


def project_cross_fit(
    project: Project,
    k: int = 5,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[DatasetVersion, dict[str, OutOfSample]]:
    """Cross-fitted predictions for the current version's train and val images.

    Each fold model trains like a ``pretrained`` round (``train.weights`` or the ``train.model``
    YAML, ``train.epochs`` raised by ``min_iterations``) into ``<runs>/crossfit-<version>-k<k>-
    fold<f>``, on its fold's export under ``<exports>/<fold digest>``, and predicts with torch at
    ``select.candidate_conf`` (cleanlab wants low-confidence boxes too). ``seed`` defaults to
    ``train.seed``. Holds the workspace lock. Returns the version and sha256 -> `OutOfSample`.
    Raises `DatasetError` without a labeled version or with too few images per fold.
    """
    from loop import model

    cfg = project.cfg
    with project.writing("cross-fit"):
        version = project.current_version()
        if version is None:
            raise DatasetError(
                "no labeled dataset version yet: ingest labels or pull from Label Studio first"
            )
        labeled = [r.sha256 for r in version.rows if r.split != "test"]
        start = cfg.train.start_checkpoint()

        def train_fold(f: int, training: Sequence[str]) -> Path:
            fold = fold_version(version, training)
            data_yaml = project.export(fold)
            train_cfg = cfg.train.model_copy(
                update={"epochs": cfg.train.epochs_for(fold.split_counts()["train"])}
            )
            result = model.train(
                data_yaml,
                cfg.paths.runs,
                train_cfg,
                cfg.paths.yolo_config,
                init_weights=None if start is None else start.path,
                name=f"crossfit-{version.short}-k{k}-fold{f}",
            )
            return Path(result.weights)

        def predict(weights: Path, shas: Sequence[str]) -> Iterable[Detections]:
            return model.predict(
                weights,
                (project.pool.abs_path(s) for s in shas),
                cfg.train.imgsz,
                cfg.select.candidate_conf,
                cfg.paths.yolo_config,
                len(cfg.classes),
                threads=cfg.train.threads,
                min_candidates=cfg.select.min_candidates,
            )

        out = cross_fit(
            labeled, k, train_fold, predict, cfg.train.seed if seed is None else seed, progress
        )
    return version, out
