"""Training a YOLO detector or segmentation model (`train`) and the metrics of one evaluation
pass (`EvalResult`)."""

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
# A detection checkpoint must seed at least this share of a segmentation model's backbone
# tensors (a matching one seeds all of them); less means another architecture or scale.
MIN_BACKBONE_TRANSFER = 0.9


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
    # Segmentation models only (None / empty for detectors): the same figures on instance masks
    # (mask IoU instead of box IoU), from the same evaluation pass.
    mask_map50: float | None = None
    mask_map50_95: float | None = None
    mask_precision: float | None = None
    mask_recall: float | None = None
    mask_per_class_ap50: dict[str, float] = field(default_factory=dict)
    mask_per_class_ap50_95: dict[str, float] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return self.mask_map50_95 is not None


@dataclass(frozen=True)
class WeightTransfer:
    """How a checkpoint of another architecture seeded a new model (`train`): ``transferred``
    of the new model's ``total`` tensors took the checkpoint's values (same name and shape),
    ``backbone_transferred`` of its ``backbone_total`` backbone tensors."""

    source: str
    transferred: int
    total: int
    backbone_transferred: int
    backbone_total: int

    @property
    def backbone_fraction(self) -> float:
        return self.backbone_transferred / self.backbone_total if self.backbone_total else 0.0


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
    # Set when the weights came from a checkpoint of another task (a COCO detector seeding a
    # segmentation model); None when training from scratch or from a same-task checkpoint.
    transfer: WeightTransfer | None = None


@functools.cache
def _validator_cls(task: str = "detect") -> type:
    """Ultralytics' validator for ``task`` (detect: DetectionValidator, segment:
    SegmentationValidator), filling the confusion matrix (boxes) without plotting anything."""
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.models.yolo.segment import SegmentationValidator

    base: type[DetectionValidator] = (
        SegmentationValidator if task == "segment" else DetectionValidator
    )

    class _ConfusionValidator(base):  # type: ignore[valid-type,misc]
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
def _trainer_cls(task: str = "detect") -> type:
    from copy import copy

    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.models.yolo.segment import SegmentationTrainer

    base: type[DetectionTrainer] = SegmentationTrainer if task == "segment" else DetectionTrainer
    validator = _validator_cls(task)

    class _Trainer(base):  # type: ignore[valid-type,misc]
        def get_validator(self) -> Any:
            super().get_validator()  # keeps any bookkeeping the parent does (loss names)
            return validator(
                self.test_loader,
                save_dir=self.save_dir,
                args=copy(self.args),
                _callbacks=self.callbacks,
            )

    return _Trainer


def _per_class(metric: Any, class_names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-class AP50 and AP50-95 of one Ultralytics ``Metric`` (box or seg), every class."""
    nc = len(class_names)
    ap50 = dict.fromkeys(class_names, 0.0)
    ap = dict.fromkeys(class_names, 0.0)
    # ap_class_index lists the classes that have labels in the split, in the order of .ap*.
    for i, c in enumerate(np.asarray(metric.ap_class_index, dtype=np.int64).tolist()):
        if 0 <= c < nc:
            ap50[class_names[c]] = float(metric.ap50[i])
            ap[class_names[c]] = float(metric.ap[i])
    return ap50, ap


def _eval_result(validator: Any, class_names: list[str]) -> EvalResult:
    metrics = validator.metrics
    box = metrics.box
    nc = len(class_names)
    ap50, ap = _per_class(box, class_names)
    counts = np.zeros(nc, dtype=np.int64)
    if metrics.nt_per_class is not None:
        nt = np.asarray(metrics.nt_per_class, dtype=np.int64).reshape(-1)[:nc]
        counts[: nt.shape[0]] = nt
    matrix = np.asarray(validator.confusion_matrix.matrix).round().astype(np.int64)
    seg = getattr(metrics, "seg", None)
    mask: dict[str, Any] = {}
    if seg is not None:
        m_ap50, m_ap = _per_class(seg, class_names)
        mask = {
            "mask_map50": float(seg.map50),
            "mask_map50_95": float(seg.map),
            "mask_precision": float(seg.mp),
            "mask_recall": float(seg.mr),
            "mask_per_class_ap50": m_ap50,
            "mask_per_class_ap50_95": m_ap,
        }
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
        **mask,
    )


def segment_architecture(model: str) -> str:
    """The segmentation twin of a detection architecture YAML: ``yolov8n.yaml`` ->
    ``yolov8n-seg.yaml``; a name that already ends in ``-seg.yaml`` is returned as is."""
    stem, dot, ext = model.rpartition(".")
    if not dot or ext not in ("yaml", "yml"):
        raise ModelError(
            f"train.model={model!r} must name an architecture YAML such as 'yolov8n.yaml'"
        )
    return model if stem.endswith("-seg") else f"{stem}-seg.{ext}"


def _transfer(model: Any, weights: Path) -> WeightTransfer:
    """Load ``weights`` into ``model`` (an Ultralytics ``YOLO`` built from a YAML) through
    Ultralytics' ``load`` (every tensor of the same name and shape), then count what took the
    checkpoint's values. The backbone is the YAML's ``backbone`` section (layers ``0 ..
    len(backbone) - 1``)."""
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    model.load(str(weights))
    src_model, _ = load_checkpoint(str(weights))
    src = src_model.float().state_dict()
    dst = model.model.state_dict()
    n_backbone = len(model.model.yaml.get("backbone", []))

    def in_backbone(key: str) -> bool:
        parts = key.split(".")
        return (
            len(parts) > 1
            and parts[0] == "model"
            and parts[1].isdigit()
            and int(parts[1]) < n_backbone
        )

    same = {
        k
        for k, v in dst.items()
        if k in src and src[k].shape == v.shape and torch.equal(src[k].to(v.dtype), v)
    }
    backbone = [k for k in dst if in_backbone(k)]
    return WeightTransfer(
        source=str(weights),
        transferred=len(same),
        total=len(dst),
        backbone_transferred=sum(k in same for k in backbone),
        backbone_total=len(backbone),
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
    task: str = "detect",
) -> TrainResult:
    """Train a detector (``task="detect"``) or an instance segmentation model
    (``task="segment"``, on an Ultralytics segmentation export) on ``data_yaml`` into
    ``<out_dir>/<name>/``.

    Segmentation: the architecture is the ``-seg`` twin of ``cfg.model``
    (`segment_architecture`: ``yolov8n.yaml`` -> ``yolov8n-seg.yaml``); a detection
    ``init_weights`` (e.g. the COCO ``yolov8n.pt``) seeds it through Ultralytics' ``load``, which
    transfers every tensor of the same name and shape (backbone and neck; not the mask head),
    counted in ``TrainResult.transfer``; a segmentation ``init_weights`` (an earlier round)
    fine-tunes as for detection.

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
    if task not in ("detect", "segment"):
        raise ModelError(f"task must be 'detect' or 'segment', got {task!r}")
    source = cfg.model if init_weights is None else str(_require_weights(init_weights))
    project = Path(out_dir).expanduser().resolve()  # relative projects break under pytest
    project.mkdir(parents=True, exist_ok=True)
    _setup(yolo_config_dir, cfg.threads)
    from ultralytics import YOLO

    started = time.time()
    transfer: WeightTransfer | None = None
    try:
        if task == "segment":
            arch = segment_architecture(cfg.model)
            if init_weights is None:
                model = YOLO(arch, task="segment")
            else:
                model = YOLO(source)
                if model.task == "detect":
                    # A detector seeds backbone and neck; the mask head starts fresh. Ultralytics
                    # trains this pre-built model (``load`` sets its checkpoint) and seeds torch
                    # only later, so the unseeded tensors would take whatever the process's
                    # random state is now: seed it, or two same-seed trainings differ.
                    import torch

                    torch.manual_seed(cfg.seed)
                    model = YOLO(arch, task="segment")
                    transfer = _transfer(model, Path(source))
                    _log_transfer(transfer)
                    if transfer.backbone_fraction < MIN_BACKBONE_TRANSFER:
                        raise ModelError(
                            f"{Path(source).name} seeds only {transfer.backbone_transferred} of "
                            f"{transfer.backbone_total} backbone tensors of {segment_architecture(cfg.model)}: "
                            "it is another architecture or scale. Set train.model to the "
                            "checkpoint's own architecture (yolov8s.pt -> yolov8s.yaml)"
                        )
                elif model.task != "segment":
                    raise ModelError(
                        f"{source} is a '{model.task}' model; a segment project starts from a "
                        "detection or segmentation checkpoint"
                    )
        else:
            model = YOLO(source, task="detect")
            if model.task != "detect":
                raise ModelError(
                    f"{source} is a '{model.task}' model; a detect project needs a detection "
                    "checkpoint (set task: segment for segmentation models)"
                )
        if on_epoch is not None:

            def _report(trainer: Any) -> None:
                epoch, epochs = int(trainer.epoch) + 1, int(trainer.epochs)
                if epoch > epochs:
                    return  # the final validation of best.pt reports itself as epoch n + 1
                metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
                on_epoch(epoch, epochs, metrics)

            model.add_callback("on_fit_epoch_end", _report)
        model.train(
            trainer=_trainer_cls(task),
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
        transfer=transfer,
    )


def _log_transfer(t: WeightTransfer) -> None:
    import logging

    logging.getLogger("loop.model").info(
        "seeded from %s: %d/%d tensors transferred, backbone %d/%d (%.0f%%)",
        t.source,
        t.transferred,
        t.total,
        t.backbone_transferred,
        t.backbone_total,
        100 * t.backbone_fraction,
    )
