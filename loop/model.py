"""YOLO training, evaluation, prediction and embeddings: the only module that imports Ultralytics.

Every public function first calls `loop.offline.configure_ultralytics` with the given
``yolo_config_dir`` and only then imports Ultralytics, so nothing it does can reach the network
(no font/weight downloads, no telemetry, no auto-install) and its MLflow callback stays off.
Everything runs on the CPU.

Coordinates: `Detections` from `predict` hold pixel ``xyxy`` in the original image (top-left
origin); ``class_probs`` are YOLO's independent per-class sigmoid scores at each kept box.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from loop.config import TrainConfig
from loop.detections import Detections
from loop.errors import DefectLoopError, ImageError, ModelError
from loop.offline import configure_ultralytics

if TYPE_CHECKING:
    from ultralytics import YOLO

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


# --------------------------------------------------------------------------------------------
# setup and loading
# --------------------------------------------------------------------------------------------


def _setup(yolo_config_dir: Path, threads: int) -> None:
    """Configure offline mode, then import Ultralytics and pin its CPU thread count."""
    configure_ultralytics(Path(yolo_config_dir), threads=threads)
    from ultralytics.utils import torch_utils

    # select_device() resets torch to this many threads (cpu_count - 1: one on a 2-core box).
    setattr(torch_utils, "NUM_THREADS", threads)  # noqa: B010


def _require_file(path: Path, what: str, hint: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{what} {path} does not exist; {hint}")
    return path.resolve()


def _require_weights(weights: Path) -> Path:
    path = _require_file(
        weights,
        "model weights",
        "train a model first (loop.model.train) or pass the path of an existing best.pt",
    )
    if path.suffix != ".pt":
        raise ModelError(f"model weights {path} must be a PyTorch .pt checkpoint")
    return path


def _read_data_yaml(data_yaml: Path) -> tuple[Path, dict[str, Any]]:
    path = _require_file(
        data_yaml,
        "dataset YAML",
        "export a dataset version first (it writes data.yaml with train/val/test and names)",
    )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelError(f"dataset YAML {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "names" not in data:
        raise ModelError(f"dataset YAML {path} must be a mapping with 'names' and split paths")
    return path, data


def _names_list(names: Any) -> list[str]:
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def load_model(weights: Path, yolo_config_dir: Path, threads: int = 2) -> YOLO:
    """Load a detection checkpoint (absolute or relative ``.pt`` path) on the CPU."""
    path = _require_weights(weights)
    _setup(yolo_config_dir, threads)
    from ultralytics import YOLO

    try:
        # A str(path) of an existing file never triggers Ultralytics' download-by-name logic.
        model = YOLO(str(path), task="detect")
    except Exception as exc:
        raise ModelError(f"could not load model weights {path}: {exc}") from exc
    if model.task != "detect":
        raise ModelError(f"{path} is a '{model.task}' model; defect-loop needs a detection model")
    return model


def _model_names(model: YOLO) -> list[str]:
    return _names_list(model.names)


# --------------------------------------------------------------------------------------------
# Ultralytics subclasses (built lazily: Ultralytics may only be imported after configuration)
# --------------------------------------------------------------------------------------------


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


@functools.cache
def _probs_predictor_cls() -> type:
    """DetectionPredictor whose Results carry ``class_probs``: (n, nc) sigmoid scores per kept box."""
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.utils import nms, ops

    class _ProbsPredictor(DetectionPredictor):
        def postprocess(self, preds: Any, img: Any, orig_imgs: Any, **kwargs: Any) -> list[Any]:
            raw = preds[0] if isinstance(preds, (list, tuple)) else preds
            backend: Any = self.model  # set up before any batch is processed
            nc = len(backend.names)
            if getattr(backend, "end2end", False) or raw.ndim != 3 or raw.shape[1] != 4 + nc:
                raise ModelError(
                    f"model output of shape {tuple(raw.shape)} is not (B, 4 + {nc}, anchors): "
                    "class probabilities need a YOLO detection head with NMS (e.g. yolov8/yolo11; "
                    "for yolo26 keep nms enabled)"
                )
            dets, keep = nms.non_max_suppression(
                raw,
                self.args.conf,
                kwargs.pop("iou", self.args.iou),
                self.args.classes,
                self.args.agnostic_nms,
                max_det=self.args.max_det,
                nc=nc,
                return_idxs=True,
            )
            if not isinstance(orig_imgs, list):
                orig_imgs = ops.convert_torch2numpy_batch(orig_imgs)[..., ::-1]
            results = self.construct_results(dets, img, orig_imgs, **kwargs)
            for b, (res, idx) in enumerate(zip(results, keep, strict=True)):
                # raw[b, 4:, a] are the class scores of anchor a; the kept box's conf is their max.
                res.class_probs = raw[b, 4 : 4 + nc][:, idx.view(-1).long()].T.float().cpu()
            return results

    return _ProbsPredictor


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


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
    when ``init_weights`` is None, else fine-tuned from that ``.pt`` (all weights transferred, a
    fresh optimizer and warm-up). CPU, no AMP, no plots, deterministic with ``cfg.seed``,
    validated on the ``val`` split every epoch. An existing run folder of the same name is reused
    (its results.csv is replaced). Raises `ModelError` for missing inputs or a failed run.
    """
    data_path, data = _read_data_yaml(data_yaml)
    if init_weights is not None:
        source = str(_require_weights(init_weights))
    else:
        if not cfg.model.endswith((".yaml", ".yml")):
            raise ModelError(
                f"train.model={cfg.model!r} must name an architecture YAML such as "
                "'yolov8n.yaml' (a bare '.pt' name would be downloaded); pass init_weights "
                "to fine-tune from a checkpoint"
            )
        source = cfg.model
    project = Path(out_dir).expanduser().resolve()  # relative projects break under pytest
    project.mkdir(parents=True, exist_ok=True)
    _setup(yolo_config_dir, cfg.threads)
    from ultralytics import YOLO

    started = time.time()
    try:
        model = YOLO(source, task="detect")
        if on_epoch is not None:

            def _report(trainer: Any) -> None:
                metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
                on_epoch(int(trainer.epoch) + 1, int(trainer.epochs), metrics)

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
            val=True,
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


def evaluate(
    weights: Path,
    data_yaml: Path,
    split: str,
    imgsz: int,
    yolo_config_dir: Path,
    class_names: list[str],
    batch: int = 16,
    threads: int = 2,
) -> EvalResult:
    """Box metrics of ``weights`` on ``split`` (``train``/``val``/``test``) of ``data_yaml``.

    ``class_names`` must equal the model's class list (same order). Classes with no labels in the
    split report AP 0.0 (see `EvalResult`). Raises `ModelError` for missing files, a split the
    YAML does not define or a class-list mismatch.
    """
    data_path, data = _read_data_yaml(data_yaml)
    if not data.get(split):
        raise ModelError(
            f"dataset YAML {data_path} defines no '{split}' split; "
            "choose one of " + ", ".join(k for k in ("train", "val", "test") if data.get(k))
        )
    model = load_model(weights, yolo_config_dir, threads)
    names = _model_names(model)
    if names != list(class_names):
        raise ModelError(
            f"model {weights} was trained for classes {names}, not {list(class_names)}; "
            "evaluate with the project's class list or retrain"
        )
    validator_cls = _validator_cls()
    captured: list[Any] = []

    class _Capturing(validator_cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            captured.append(self)

    try:
        model.val(
            validator=_Capturing,
            data=str(data_path),
            split=split,
            imgsz=imgsz,
            batch=batch,
            device="cpu",
            workers=0,
            plots=False,
            # The validator creates its save dir even when it writes nothing into it.
            project=str(Path(yolo_config_dir).expanduser().resolve() / "runs"),
            name=f"val-{split}",
            exist_ok=True,
            verbose=False,
        )
    except DefectLoopError:
        raise
    except Exception as exc:
        raise ModelError(
            f"evaluating {weights} on {data_path}:{split} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return _eval_result(captured[-1], list(class_names))


def _batched(items: Iterable[Path], n: int) -> Iterator[list[Path]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def _read_images(paths: list[Path]) -> list[np.ndarray]:
    from ultralytics.utils.patches import imread

    images = []
    for p in paths:
        im = imread(str(p))  # BGR uint8, the same reader Ultralytics trains with
        if im is None:
            raise ImageError(f"cannot read image {p}; check that it exists and is a valid image")
        images.append(im)
    return images


def predict(
    weights: Path,
    images: Iterable[Path],
    imgsz: int,
    conf: float,
    yolo_config_dir: Path,
    num_classes: int,
    batch: int = 16,
    iou: float = 0.7,
    threads: int = 2,
    min_candidates: int = 0,
) -> Iterator[Detections]:
    """Stream one `Detections` per image, in input order, with ``confidence`` and ``class_probs``.

    ``min_candidates``: an image with fewer boxes above ``conf`` keeps its strongest
    ``min_candidates`` boxes below it instead (still with their true, low confidences), so that
    an image where the model sees nothing still gets a defined uncertainty score.

    Boxes are pixel ``xyxy`` in the original image; ``class_probs`` is ``(n, num_classes)``
    independent sigmoid scores with ``class_probs[i, class_id[i]] == confidence[i]``; only boxes
    scoring above ``conf`` are kept (at most 300 an image), class-aware NMS at ``iou``. ``meta={"path": str(path)}``. Images are read
    ``batch`` at a time, so memory stays bounded for any number of images. The model is loaded
    once, when this function is called; missing weights or a class-count mismatch raise
    `ModelError` right away, an unreadable image raises `ImageError` when reached.
    """
    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ModelError(f"conf and iou must be within [0, 1], got conf={conf}, iou={iou}")
    if batch < 1:
        raise ModelError(f"batch must be >= 1, got {batch}")
    if min_candidates < 0:
        raise ModelError(f"min_candidates must be >= 0, got {min_candidates}")
    model = load_model(weights, yolo_config_dir, threads)
    if len(model.names) != num_classes:
        raise ModelError(
            f"model {weights} predicts {len(model.names)} classes but the project has "
            f"{num_classes}; retrain on the current class list"
        )
    return _predict_stream(model, images, imgsz, conf, iou, batch, num_classes, min_candidates)


def _predict_stream(
    model: Any,
    images: Iterable[Path],
    imgsz: int,
    conf: float,
    iou: float,
    batch: int,
    num_classes: int,
    min_candidates: int = 0,
) -> Iterator[Detections]:
    predictor = _probs_predictor_cls()
    # With a candidate floor NMS must see every anchor; the threshold is applied afterwards.
    nms_conf = 0.0 if min_candidates else conf
    for chunk in _batched(images, batch):
        arrays = _read_images(chunk)
        # Arrays, not paths: Ultralytics sorts path lists and skips unreadable files silently.
        results = model.predict(
            arrays,
            predictor=predictor,
            imgsz=imgsz,
            conf=nms_conf,
            iou=iou,
            batch=batch,  # constant, so the predictor is built once and reused
            device="cpu",
            save=False,
            verbose=False,
        )
        for path, arr, res in zip(chunk, arrays, results, strict=True):
            boxes = res.boxes
            h, w = arr.shape[:2]
            det = Detections(
                xyxy=boxes.xyxy.cpu().numpy().astype(np.float64),
                class_id=boxes.cls.cpu().numpy().astype(np.int64),
                image_wh=(w, h),
                confidence=boxes.conf.cpu().numpy().astype(np.float64),
                class_probs=res.class_probs.numpy().astype(np.float64).reshape(-1, num_classes),
                meta={"path": str(path)},
            )
            if min_candidates and det.confidence is not None:
                order = np.argsort(-det.confidence, kind="stable")
                n_keep = max(int((det.confidence >= conf).sum()), min_candidates)
                det = det[order[:n_keep]]
            yield det


def embed(
    weights: Path,
    images: Iterable[Path],
    imgsz: int,
    yolo_config_dir: Path,
    layer: int | None = None,
    batch: int = 16,
    threads: int = 2,
) -> np.ndarray:
    """``(n, d)`` float32 image embeddings, one row per image in input order.

    Each row is the global average pool of layer ``layer``'s feature map (default: the layer just
    before the Detect head; 256-d for yolov8n). No images gives shape ``(0, 0)``.
    """
    if batch < 1:
        raise ModelError(f"batch must be >= 1, got {batch}")
    model = load_model(weights, yolo_config_dir, threads)
    net: Any = model.model  # the DetectionModel; .model is its layer list
    n_layers = len(net.model)
    index = n_layers - 2 if layer is None else layer
    if not 0 <= index < n_layers - 1:
        raise ModelError(f"layer must be within [0, {n_layers - 2}] for this model, got {layer}")
    rows: list[np.ndarray] = []
    for chunk in _batched(images, batch):
        vectors = model.embed(
            _read_images(chunk),
            embed=[index],
            imgsz=imgsz,
            batch=batch,
            device="cpu",
            verbose=False,
        )
        rows.extend(v.detach().cpu().float().numpy().reshape(-1) for v in vectors)
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(rows).astype(np.float32)
