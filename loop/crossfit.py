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

A fold's predictions are cached (`FoldCache`, one ``.npz`` per fold under
``<workspace>/crossfit/<key>/``), keyed by everything that determines them
(`crossfit_key`): the dataset version, the folds and their seed, the training settings, the start
checkpoint's sha256, the classes and the prediction settings. A second run on the same version
trains nothing, and an interrupted run resumes at the first fold it had not finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


_CACHE_FORMAT = 1


def crossfit_key(
    version_digest: str,
    k: int,
    seed: int,
    classes: Sequence[str],
    train: Mapping[str, Any],
    start_sha256: str | None,
    predict: Mapping[str, Any],
) -> str:
    """The cache key (24 hex digits) of the cross-fitted predictions that these inputs determine:
    the dataset version's digest, the number of folds and their seed, the class list, the
    training settings ``train`` (JSON-able; give the start checkpoint by ``start_sha256``, not by
    its path), and the prediction settings ``predict`` (image size, confidence floor, ...)."""
    doc = {
        "format": _CACHE_FORMAT,
        "version": version_digest,
        "folds": int(k),
        "seed": int(seed),
        "classes": list(classes),
        "train": dict(train),
        "start_sha256": start_sha256,
        "predict": dict(predict),
    }
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class FoldCache:
    """One cross-fitting's fold predictions on disk: ``<root>/<key>/fold<f>.npz``.

    A fold file holds the held-out images' sha256s and their `Detections` (pixel xyxy, class
    ids, confidences, class probabilities when present, image sizes). It is written atomically
    once the fold's predictions are complete, so a fold is either cached whole or not at all.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.folder = Path(root) / key
        self.key = key

    def _path(self, fold: int) -> Path:
        return self.folder / f"fold{int(fold)}.npz"

    def load(self, fold: int, held_out: Sequence[str]) -> list[Detections] | None:
        """The cached predictions of ``fold`` in the order of ``held_out``, or None when the fold
        is not cached or was cached for other images (then it is computed again)."""
        path = self._path(fold)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                shas = [str(s) for s in z["shas"]]
                if sorted(shas) != sorted(held_out):
                    return None
                counts, wh, xyxy, cls = z["counts"], z["wh"], z["xyxy"], z["class_id"]
                conf = z["confidence"] if "confidence" in z.files else None
                probs = z["class_probs"] if "class_probs" in z.files else None
        except (OSError, ValueError, KeyError):
            return None  # unreadable: recompute (and overwrite) the fold
        ends = np.cumsum(counts)
        by_sha: dict[str, Detections] = {}
        for i, sha in enumerate(shas):
            a, b = int(ends[i] - counts[i]), int(ends[i])
            by_sha[sha] = Detections(
                xyxy[a:b],
                cls[a:b],
                (int(wh[i, 0]), int(wh[i, 1])),
                confidence=None if conf is None else conf[a:b],
                class_probs=None if probs is None else probs[a:b],
            )
        return [by_sha[s] for s in held_out]

    def save(self, fold: int, held_out: Sequence[str], preds: Sequence[Detections]) -> None:
        """Store ``fold``'s predictions (one `Detections` per held-out image, in order)."""
        self.folder.mkdir(parents=True, exist_ok=True)

        def stacked(get: Callable[[Detections], Any], width: int) -> np.ndarray | None:
            parts = [get(d) for d in preds]
            if any(p is None for p in parts):
                return None
            if not parts:
                return np.zeros((0, width)) if width else np.zeros(0)
            return np.concatenate([np.asarray(p) for p in parts])

        arrays: dict[str, Any] = {
            "shas": np.array(list(held_out), dtype=str),
            "counts": np.array([len(d) for d in preds], dtype=np.int64),
            "wh": np.array([d.image_wh for d in preds], dtype=np.int64).reshape(-1, 2),
            "xyxy": stacked(lambda d: d.xyxy, 4),
            "class_id": stacked(lambda d: d.class_id, 0),
        }
        for name, values in (
            ("confidence", stacked(lambda d: d.confidence, 0)),
            ("class_probs", stacked(lambda d: d.class_probs, 0)),
        ):
            if values is not None:
                arrays[name] = values
        tmp = self.folder / f".fold{int(fold)}.tmp{os.getpid()}.npz"
        try:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self._path(fold))
        finally:
            tmp.unlink(missing_ok=True)


def cross_fit(
    shas: Sequence[str],
    k: int,
    train_fold: TrainFold,
    predict: PredictImages,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: FoldCache | None = None,
) -> dict[str, OutOfSample]:
    """Out-of-sample predictions for every image of ``shas`` (see the module docstring).

    For each fold ``f`` (in order): ``train_fold(f, others)`` with the images of every other
    fold (sorted), then ``predict(weights, held_out)`` on fold ``f``'s images (sorted). With a
    ``cache``, a fold already cached for the same held-out images is read instead (no training),
    and each fold computed is stored. Returns sha256 -> `OutOfSample`. Raises `ModelError` when
    ``predict`` returns a different number of results than images asked for, and what
    `assign_folds` raises.
    """
    fold_of = assign_folds(shas, k, seed)
    out: dict[str, OutOfSample] = {}
    for f in range(k):
        held_out = sorted(s for s, g in fold_of.items() if g == f)
        training = sorted(s for s, g in fold_of.items() if g != f)
        cached = None if cache is None else cache.load(f, held_out)
        if cached is not None:
            if progress:
                progress(f"fold {f + 1}/{k}: cached predictions of its {len(held_out)} images")
            for sha, det in zip(held_out, cached, strict=True):
                out[sha] = OutOfSample(sha, f, det)
            continue
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
        if cache is not None:
            cache.save(f, held_out, preds)
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


def project_crossfit_key(project: Project, version: DatasetVersion, k: int, seed: int) -> str:
    """`crossfit_key` of ``project``'s cross-fitting of ``version``: its training settings (the
    start checkpoint by sha256), classes, and prediction settings (``train.imgsz``,
    ``select.candidate_conf``, ``select.min_candidates``)."""
    cfg = project.cfg
    start = cfg.train.start_checkpoint()
    # The checkpoint counts by content (its path may move); threads change speed only.
    train = cfg.train.model_dump(mode="json", exclude={"weights", "weights_sha256", "threads"})
    return crossfit_key(
        version.digest,
        k,
        seed,
        list(cfg.classes),
        {**train, "task": cfg.task},
        None if start is None else start.sha256,
        {
            "imgsz": cfg.train.imgsz,
            "candidate_conf": cfg.select.candidate_conf,
            "min_candidates": cfg.select.min_candidates,
        },
    )


def project_cross_fit(
    project: Project,
    k: int = 5,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
    use_cache: bool = True,
) -> tuple[DatasetVersion, dict[str, OutOfSample]]:
    """Cross-fitted predictions for the current version's train and val images.

    Each fold model trains like a ``pretrained`` round (``train.weights`` or the ``train.model``
    YAML, ``train.epochs`` raised by ``min_iterations``) into ``<runs>/crossfit-<version>-k<k>-
    fold<f>``, on its fold's export under ``<exports>/<fold digest>``, and predicts with torch at
    ``select.candidate_conf`` (cleanlab wants low-confidence boxes too). ``seed`` defaults to
    ``train.seed``. With ``use_cache`` the folds' predictions are read from and written to
    ``<workspace>/crossfit/<project_crossfit_key>/`` (`FoldCache`): the same version with the
    same settings trains nothing the second time. Holds the workspace lock. Returns the version
    and sha256 -> `OutOfSample`. Raises `DatasetError` without a labeled version or with too few
    images per fold, `LabelQualityError` with fewer labeled images than folds.
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

        seed_ = cfg.train.seed if seed is None else seed
        cache = None
        if use_cache:
            cache = FoldCache(cfg.paths.crossfit, project_crossfit_key(project, version, k, seed_))
        out = cross_fit(labeled, k, train_fold, predict, seed_, progress, cache)
    return version, out
