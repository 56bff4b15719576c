"""Training a YOLO detector (`train`) and the metrics of one evaluation pass (`EvalResult`)."""

from __future__ import annotations

import csv
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loop.config import TrainConfig
from loop.errors import DefectLoopError, ModelError
from loop.model.loading import _names_list, _read_data_yaml, _require_weights, _setup

# A prediction counts in the confusion matrix when it scores above this (Ultralytics' default
# for its confusion-matrix plot); boxes match ground truth at IoU >= 0.45, class-agnostic.
CONFUSION_CONF = 0.25


@dataclass(frozen=True)
class EvalResult:
    """Box metrics of one model on one dataset split.

    ``map50``/``map50_95``: mean over classes that have labels in the split (Ultralytics'
    convention). ``per_class_ap50``/``per_class_ap50_95`` hold EVERY class of the project; a class
    with no labels in the split gets 0.0 there (check ``n_instances`` to tell "absent" from "missed").
    ``confusion_matrix[p][t]``: ``(nc + 1) x (nc + 1)`` box counts, rows = predicted class,
    columns = true class, index ``nc`` = background (row ``nc``: missed objects, column ``nc``:
    false positives); only predictions scoring above `CONFUSION_CONF` count.
    """

    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class_ap50: dict[str, float]
    per_class_ap50_95: dict[str, float]
    n_instances: dict[str, int]
    confusion_matrix: list[list[int]]
    n_images: int


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one training run.

    ``weights``: ``best.pt`` (``last.pt`` if no best was written). ``epochs``: one dict per epoch,
    the columns of Ultralytics' ``results.csv`` (``epoch``, ``train/box_loss``,
    ``metrics/mAP50(B)``, ``lr/pg0`` ...). ``val``: metrics of ``weights`` on the ``val`` split.
    ``seconds``: wall-clock time of the whole call.
    """

    weights: Path
    run_dir: Path
    epochs: list[dict[str, float]]
    val: EvalResult
    seconds: float = field(default=0.0)


@functools.cache
def _validator_cls() -> type:
    """DetectionValidator that fills the confusion matrix without plotting anything."""
    from ultralytics.models.yolo.detect import DetectionValidator

    class _ConfusionValidator(DetectionValidator):
        def update_metrics(self, preds: list[dict[str, Any]], batch: dict[str, Any]) -> None:
            super().update_metrics(preds, batch)
            if self.args.plots:  # Ultralytics fills it itself when plotting
                return
            matrix: Any = self.confusion_matrix  # created in init_metrics()
            for si, pred in enumerate(preds):
                pbatch = self._prepare_batch(si, batch)
                predn = self._prepare_pred(pred)
                matrix.process_batch(predn, pbatch, conf=CONFUSION_CONF)

    return _ConfusionValidator


@functools.cache
def _trainer_cls() -> type:
    from copy import copy

    from ultralytics.models.yolo.detect import DetectionTrainer

    validator = _validator_cls()

    class _Trainer(DetectionTrainer):
        def get_validator(self) -> Any:
            super().get_validator()  # keeps any bookkeeping the parent does
            return validator(
                self.test_loader,
                save_dir=self.save_dir,
                args=copy(self.args),
                _callbacks=self.callbacks,
            )

    return _Trainer


def _eval_result(validator: Any, class_names: list[str]) -> EvalResult:
    metrics = validator.metrics
    box = metrics.box
    nc = len(class_names)
    ap50 = dict.fromkeys(class_names, 0.0)
    ap = dict.fromkeys(class_names, 0.0)
    # ap_class_index lists the classes that have labels in the split, in the order of box.ap*.
    for i, c in enumerate(np.asarray(box.ap_class_index, dtype=np.int64).tolist()):
        if 0 <= c < nc:
            ap50[class_names[c]] = float(box.ap50[i])
            ap[class_names[c]] = float(box.ap[i])
    counts = np.zeros(nc, dtype=np.int64)
    if metrics.nt_per_class is not None:
        nt = np.asarray(metrics.nt_per_class, dtype=np.int64).reshape(-1)[:nc]
        counts[: nt.shape[0]] = nt
    matrix = np.asarray(validator.confusion_matrix.matrix).round().astype(np.int64)
    return EvalResult(
        map50=float(box.map50),
        map50_95=float(box.map),
        precision=float(box.mp),
        recall=float(box.mr),
        per_class_ap50=ap50,
        per_class_ap50_95=ap,
        n_instances={name: int(counts[i]) for i, name in enumerate(class_names)},
        confusion_matrix=matrix.tolist(),
        n_images=int(validator.seen),
    )


def _read_results_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows: list[dict[str, float]] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, float] = {}
            for k, v in row.items():
                if k is None or v is None:
                    continue
                try:
                    parsed[k.strip()] = float(v)
                except ValueError:
                    parsed[k.strip()] = math.nan
            rows.append(parsed)
    return rows


def train(
    data_yaml: Path,
    out_dir: Path,
    cfg: TrainConfig,
    yolo_config_dir: Path,
    init_weights: Path | None = None,
    name: str = "train",
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a detector on ``data_yaml`` (Ultralytics format) into ``<out_dir>/<name>/``.

    ``on_epoch(epoch, epochs, metrics)`` is called after each epoch's validation (1-based epoch).

    From scratch from ``cfg.model`` (a ``.yaml`` shipped with Ultralytics, e.g. ``yolov8n.yaml``)
    when ``init_weights`` is None, else fine-tuned from that ``.pt`` (a pretrained checkpoint or
    an earlier model: every weight whose shape matches is transferred, so a COCO detector's
    backbone and neck carry over to other classes; a fresh optimizer and warm-up). The caller
    chooses ``init_weights`` (see `loop.project.Project.fit`); ``cfg.weights`` is not read here.
    CPU, no AMP, no plots, deterministic with ``cfg.seed``; ``cfg.freeze``, ``cfg.cache`` and
    ``cfg.val_every_epoch`` as in `TrainConfig`. An existing run folder of the same name is
    reused (its results.csv is replaced). Raises `ModelError` for missing inputs or a failed run.
    """
    data_path, data = _read_data_yaml(data_yaml)
    if init_weights is None and not cfg.model.endswith((".yaml", ".yml")):
        # TrainConfig refuses this, but a model_copy skips validation: never let a bare name
        # reach Ultralytics, which would try to download it.
        raise ModelError(
            f"train.model={cfg.model!r} must name an architecture YAML such as "
            "'yolov8n.yaml'; to start from a checkpoint, set train.weights to its local path"
        )
    source = cfg.model if init_weights is None else str(_require_weights(init_weights))
    project = Path(out_dir).expanduser().resolve()  # relative projects break under pytest
    project.mkdir(parents=True, exist_ok=True)
    _setup(yolo_config_dir, cfg.threads)
    from ultralytics import YOLO

    started = time.time()
    try:
        model = YOLO(source, task="detect")
        if on_epoch is not None:

            def _report(trainer: Any) -> None:
                epoch, epochs = int(trainer.epoch) + 1, int(trainer.epochs)
                if epoch > epochs:
                    return  # the final validation of best.pt reports itself as epoch n + 1
                metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
                on_epoch(epoch, epochs, metrics)

            model.add_callback("on_fit_epoch_end", _report)
        model.train(
            trainer=_trainer_cls(),
            data=str(data_path),
            epochs=cfg.epochs,
            imgsz=cfg.imgsz,
            batch=cfg.batch,
            patience=cfg.patience,
            seed=cfg.seed,
            deterministic=True,
            device="cpu",
            amp=False,
            workers=0,
            plots=False,
            # Ultralytics validates the last epoch even with val=False (best.pt is then the last).
            val=cfg.val_every_epoch,
            freeze=cfg.freeze or None,
            cache="ram" if cfg.cache else False,
            project=str(project),
            name=name,
            exist_ok=True,
            verbose=False,
        )
    except DefectLoopError:
        raise
    except Exception as exc:
        raise ModelError(f"training on {data_path} failed: {type(exc).__name__}: {exc}") from exc
    trainer: Any = model.trainer
    run_dir = Path(trainer.save_dir).resolve()
    weights: Path | None = None
    for candidate in (Path(trainer.best), Path(trainer.last)):
        # Skip checkpoints left by an earlier run in the same folder.
        if candidate.is_file() and candidate.stat().st_mtime >= started - 1:
            weights = candidate.resolve()
            break
    if weights is None:
        raise ModelError(
            f"training finished but wrote no best.pt/last.pt under {run_dir}; "
            "check the dataset (empty train split?) and the log above"
        )
    class_names = _names_list(data["names"])
    return TrainResult(
        weights=weights,
        run_dir=run_dir,
        epochs=_read_results_csv(run_dir / "results.csv"),
        val=_eval_result(trainer.validator, class_names),
        seconds=time.time() - started,
    )
