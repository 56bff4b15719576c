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
import importlib.util
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from loop.config import TrainConfig
from loop.detections import Detections
from loop.errors import DefectLoopError, EvaluationError, ImageError, ModelError
from loop.evaluation import ImageMatches
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


def model_class_names(weights: Path, yolo_config_dir: Path, threads: int = 2) -> list[str]:
    """The class names a detection checkpoint predicts, in id order."""
    return _model_names(load_model(weights, yolo_config_dir, threads))


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


def _nms_with_floor(
    raw: Any,
    conf: float,
    iou: float,
    max_det: int,
    min_candidates: int,
    classes: Any = None,
    agnostic: bool = False,
) -> tuple[list[Any], list[Any]]:
    """Class-aware NMS over raw head output ``(B, 4 + nc, anchors)`` (centre-xywh in input
    pixels, sigmoid class scores): per image the kept boxes ``(n, 6)`` (xyxy input pixels, conf,
    class) and the anchor index of each, so that ``raw[b, 4:, idx]`` are their class scores.

    Candidate floor (``min_candidates > 0``): an image left with fewer boxes above ``conf`` gets
    NMS at threshold 0 instead, keeping its strongest ``min_candidates`` boxes. Greedy NMS keeps
    a box unless a higher-scoring kept box overlaps it, so the first ``k`` boxes NMS keeps among
    the ``m`` highest-scoring anchors are the first ``k`` it keeps among all of them: the floor
    runs one NMS over the top 64 anchors of each short image (doubling while too few survive)
    instead of NMS over every anchor of every image.
    """
    import torch
    import torchvision  # noqa: F401  # Ultralytics uses torchvision's NMS kernel only once imported; its fallback is a Python loop, ~10x slower
    from ultralytics.utils import nms

    nc = raw.shape[1] - 4
    dets, keep = nms.non_max_suppression(
        raw, conf, iou, classes, agnostic, max_det=max_det, nc=nc, return_idxs=True
    )
    keep = [k.view(-1).long() for k in keep]
    short = [i for i, d in enumerate(dets) if len(d) < min_candidates]
    if not short:
        return dets, keep
    sub_raw = raw[short]  # (S, 4 + nc, anchors)
    scores = sub_raw[:, 4:].amax(1)  # (S, anchors)
    anchors = raw.shape[2]
    m = min(64, anchors)
    while True:
        top = scores.topk(m, dim=1).indices  # (S, m), descending score
        sub = torch.gather(sub_raw, 2, top[:, None, :].expand(-1, 4 + nc, -1))
        floor_dets, floor_keep = nms.non_max_suppression(
            sub,
            0.0,
            iou,
            classes,
            agnostic,
            # The floor keeps only the strongest min_candidates boxes anyway.
            max_det=min(max_det, min_candidates),
            nc=nc,
            return_idxs=True,
        )
        if m == anchors or all(len(d) >= min_candidates for d in floor_dets):
            break
        m = min(2 * m, anchors)
    for j, i in enumerate(short):
        dets[i] = floor_dets[j]
        keep[i] = top[j][floor_keep[j].view(-1).long()]
    return dets, keep


@functools.cache
def _probs_predictor_cls(min_candidates: int = 0) -> type:
    """DetectionPredictor whose Results carry ``class_probs``: (n, nc) sigmoid scores per kept
    box, with the candidate floor of `_nms_with_floor`."""
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.utils import ops

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
            dets, keep = _nms_with_floor(
                raw,
                self.args.conf,
                kwargs.pop("iou", self.args.iou),
                self.args.max_det,
                min_candidates,
                self.args.classes,
                self.args.agnostic_nms,
            )
            if not isinstance(orig_imgs, list):
                orig_imgs = ops.convert_torch2numpy_batch(orig_imgs)[..., ::-1]
            results = self.construct_results(dets, img, orig_imgs, **kwargs)
            for b, (res, idx) in enumerate(zip(results, keep, strict=True)):
                # raw[b, 4:, a] are the class scores of anchor a; the kept box's conf is their max.
                res.class_probs = raw[b, 4 : 4 + nc][:, idx].T.float().cpu()
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
    YAML does not define or a class-list mismatch. `evaluate_matches` also returns the
    per-image match statistics of the same pass.
    """
    return evaluate_matches(
        weights, data_yaml, split, imgsz, yolo_config_dir, class_names, batch, threads
    )[0]


# The last few evaluations, so that the promotion gate's per-image statistics of a model that
# `evaluate` just scored cost nothing. Keyed by the weights file (path, size, mtime), the dataset
# YAML's text, the split's images (names, sizes, mtimes) and label files (names and CONTENT:
# re-exporting a version rewrites identical labels), size, batch and classes.
_EVAL_MEMO: OrderedDict[tuple[Any, ...], tuple[EvalResult, ImageMatches]] = OrderedDict()
_EVAL_MEMO_SIZE = 4


def _split_fingerprint(data_path: Path, data: dict[str, Any], split: str) -> str:
    """sha256 over what an evaluation of ``split`` reads, without decoding images."""
    import hashlib

    h = hashlib.sha256(data_path.read_bytes())
    entry = data.get(split)
    root = Path(str(data.get("path") or data_path.parent))
    images_sep, labels_sep = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item))
        p = p if p.is_absolute() else root / p
        if p.is_file():  # a list of image paths
            h.update(p.read_bytes())
            continue
        if not p.is_dir():
            continue
        for f in sorted(p.iterdir()):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        # Ultralytics' img2label_paths: the last /images/ of an image path becomes /labels/.
        labels = Path(labels_sep.join(str(p / "_").rsplit(images_sep, 1))).parent
        if labels.is_dir():
            for f in sorted(labels.glob("*.txt")):
                h.update(f"{f.name}\n".encode() + f.read_bytes())
    return h.hexdigest()


def evaluate_matches(
    weights: Path,
    data_yaml: Path,
    split: str,
    imgsz: int,
    yolo_config_dir: Path,
    class_names: list[str],
    batch: int = 16,
    threads: int = 2,
) -> tuple[EvalResult, ImageMatches]:
    """`evaluate`, plus the per-image match statistics of the same evaluation pass.

    The statistics are what Ultralytics' ``DetectionValidator`` accumulates per image (each
    predicted box's true-positive flags at IoU 0.50:0.95, confidence and class; each true box's
    class), keyed by the image file stem (the sha256 in exported dataset versions), in
    evaluation order: `loop.evaluation` bootstraps them without running the model again, and
    `loop.evaluation.box_metrics` of them equals the returned `EvalResult`'s figures.
    """
    data_path, data = _read_data_yaml(data_yaml)
    if not data.get(split):
        raise ModelError(
            f"dataset YAML {data_path} defines no '{split}' split; "
            "choose one of " + ", ".join(k for k in ("train", "val", "test") if data.get(k))
        )
    wpath = _require_weights(weights)
    st = wpath.stat()
    key = (
        str(wpath),
        st.st_size,
        st.st_mtime_ns,
        _split_fingerprint(data_path, data, split),
        split,
        imgsz,
        batch,
        tuple(class_names),
    )
    if key in _EVAL_MEMO:
        _EVAL_MEMO.move_to_end(key)
        return _EVAL_MEMO[key]
    model = load_model(wpath, yolo_config_dir, threads)
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
            self.image_stats: list[tuple[str, Any, Any, Any, Any]] = []
            captured.append(self)

        def update_metrics(self, preds: list[dict[str, Any]], batch: dict[str, Any]) -> None:
            stats = self.metrics.stats
            first = len(stats["tp"])
            super().update_metrics(preds, batch)
            # DetectionValidator appends one entry per image; get_stats() clears them later.
            for si in range(len(preds)):
                j = first + si
                self.image_stats.append(
                    (
                        str(batch["im_file"][si]),
                        stats["tp"][j],
                        stats["conf"][j],
                        stats["pred_cls"][j],
                        stats["target_cls"][j],
                    )
                )

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
    validator = captured[-1]
    result = _eval_result(validator, list(class_names))
    matches = _image_matches(validator.image_stats, len(class_names), data_path, split)
    _EVAL_MEMO[key] = (result, matches)
    while len(_EVAL_MEMO) > _EVAL_MEMO_SIZE:
        _EVAL_MEMO.popitem(last=False)
    return result, matches


def _image_matches(
    stats: list[tuple[str, Any, Any, Any, Any]], nc: int, data_path: Path, split: str
) -> ImageMatches:
    if not stats:
        raise ModelError(f"{data_path}:{split} holds no images to evaluate; label some first")
    stems = [Path(f).stem for f, *_ in stats]
    # Exported versions name images by sha256; elsewhere two folders may share a file name.
    keys = stems if len(set(stems)) == len(stems) else [f for f, *_ in stats]
    try:
        return ImageMatches.from_images(
            (
                (k, np.asarray(tp, dtype=bool), np.asarray(conf), np.asarray(pc), np.asarray(tc))
                for k, (_, tp, conf, pc, tc) in zip(keys, stats, strict=True)
            ),
            nc,
        )
    except EvaluationError as exc:
        raise ModelError(f"unusable match statistics from {data_path}:{split}: {exc}") from exc


def ultralytics_box_metrics(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray
) -> dict[str, Any]:
    """Ultralytics' own ``ap_per_class`` on concatenated match statistics (the reference that
    `loop.evaluation.box_metrics` reproduces): ``map50``, ``map50_95``, ``precision``,
    ``recall`` and ``ap`` ``(classes with true boxes, 10)``. Call after any function of this
    module has configured Ultralytics (or `prepare_ultralytics`)."""
    from ultralytics.utils.metrics import ap_per_class

    out = ap_per_class(tp, conf, pred_cls, target_cls)
    p, r, ap = out[2], out[3], out[5]
    has = len(ap) > 0
    return {
        "map50": float(ap[:, 0].mean()) if has else 0.0,
        "map50_95": float(ap.mean()) if has else 0.0,
        "precision": float(p.mean()) if has else 0.0,
        "recall": float(r.mean()) if has else 0.0,
        "ap": np.asarray(ap),
    }


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


def _check_predict_args(conf: float, iou: float, batch: int, min_candidates: int) -> None:
    """The argument checks `predict` and `predict_onnx` share; raises `ModelError`."""
    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ModelError(f"conf and iou must be within [0, 1], got conf={conf}, iou={iou}")
    if batch < 1:
        raise ModelError(f"batch must be >= 1, got {batch}")
    if min_candidates < 0:
        raise ModelError(f"min_candidates must be >= 0, got {min_candidates}")


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
    _check_predict_args(conf, iou, batch, min_candidates)
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
    for chunk in _batched(images, batch):
        arrays = _read_images(chunk)
        yield from _predict_arrays(
            model, arrays, chunk, imgsz, conf, iou, batch, num_classes, min_candidates
        )


def _predict_arrays(
    model: Any,
    arrays: list[np.ndarray],
    paths: list[Path],
    imgsz: int,
    conf: float,
    iou: float,
    batch: int,
    num_classes: int,
    min_candidates: int = 0,
) -> list[Detections]:
    """One `Detections` per BGR array (see `predict`); ``paths`` only fill ``meta["path"]``."""
    predictor = _probs_predictor_cls(min_candidates)
    # Arrays, not paths: Ultralytics sorts path lists and skips unreadable files silently.
    results = model.predict(
        arrays,
        predictor=predictor,
        imgsz=imgsz,
        conf=conf,
        iou=iou,
        batch=batch,  # constant, so the predictor is built once and reused
        device="cpu",
        save=False,
        verbose=False,
    )
    out: list[Detections] = []
    for path, arr, res in zip(paths, arrays, results, strict=True):
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
        out.append(_candidate_floor(det, conf, min_candidates))
    return out


def _candidate_floor(det: Detections, conf: float, min_candidates: int) -> Detections:
    """Boxes >= ``conf``, or the strongest ``min_candidates`` when fewer pass (by confidence)."""
    if not min_candidates or det.confidence is None:
        return det
    order = np.argsort(-det.confidence, kind="stable")
    n_keep = max(int((det.confidence >= conf).sum()), min_candidates)
    if n_keep >= len(det) and np.array_equal(order, np.arange(len(det))):
        return det  # NMS output is already sorted: nothing to drop or reorder
    return det[order[:n_keep]]


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


# --------------------------------------------------------------------------------------------
# test-time augmentation (localization stability)
# --------------------------------------------------------------------------------------------

TTA_DEFAULT: tuple[str, ...] = ("hflip", "scale:0.75", "scale:1.25")


def _parse_augmentation(aug: str, imgsz: int) -> tuple[str | None, int]:
    """``"hflip"``/``"vflip"``/``"scale:<f>"`` -> (flip axis or None, network input size)."""
    if aug in ("hflip", "vflip"):
        return aug, imgsz
    if aug.startswith("scale:"):
        try:
            factor = float(aug.split(":", 1)[1])
        except ValueError:
            factor = math.nan
        if not 0.25 <= factor <= 4.0:
            raise ModelError(f"augmentation {aug!r}: the scale factor must lie in [0.25, 4]")
        # Letterboxing resizes every input to imgsz, so "scale" means the network input size
        # (a multiple of the stride 32, rounded away from imgsz), not a resized image that
        # would be resized back.
        steps = imgsz * factor / 32
        size = max(32, 32 * (math.floor(steps) if factor < 1 else math.ceil(steps)))
        if size == imgsz:
            raise ModelError(
                f"augmentation {aug!r} gives the same input size {imgsz} as the reference view; "
                "use a factor further from 1"
            )
        return None, size
    raise ModelError(f"unknown augmentation {aug!r}; use 'hflip', 'vflip' or 'scale:<factor>'")


def _unflip(det: Detections, axis: str) -> Detections:
    """Boxes predicted on a flipped image, mapped back to the original image's pixels."""
    w, h = det.image_wh
    xyxy = det.xyxy.copy()
    if axis == "hflip":
        xyxy[:, [0, 2]] = w - det.xyxy[:, [2, 0]]
    else:
        xyxy[:, [1, 3]] = h - det.xyxy[:, [3, 1]]
    return Detections(
        xyxy, det.class_id, det.image_wh, det.confidence, det.class_probs, dict(det.meta)
    )


def predict_tta(
    weights: Path,
    images: Iterable[Path],
    imgsz: int,
    conf: float,
    yolo_config_dir: Path,
    num_classes: int,
    augmentations: Iterable[str] = TTA_DEFAULT,
    batch: int = 16,
    iou: float = 0.7,
    threads: int = 2,
    min_candidates: int = 0,
) -> Iterator[list[Detections]]:
    """Stream, per image, one `Detections` per augmentation, in ORIGINAL pixel coordinates.

    ``augmentations``: ``hflip``/``vflip`` (the image is flipped, the boxes flipped back) and
    ``scale:<f>`` (the network input size becomes ``imgsz * f`` rounded to a multiple of 32;
    Ultralytics maps boxes back to the image). The reference view (no augmentation) is not
    included: take it from `predict`. Boxes, ``class_probs`` and ``min_candidates`` as in
    `predict`; ``meta`` holds ``path`` and ``augmentation``. Images are read once per batch.
    """
    augs = list(augmentations)
    if not augs:
        raise ModelError("predict_tta needs at least one augmentation")
    parsed = [_parse_augmentation(a, imgsz) for a in augs]
    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ModelError(f"conf and iou must be within [0, 1], got conf={conf}, iou={iou}")
    if batch < 1 or min_candidates < 0:
        raise ModelError(f"need batch >= 1 and min_candidates >= 0, got {batch}, {min_candidates}")
    model = load_model(weights, yolo_config_dir, threads)
    if len(model.names) != num_classes:
        raise ModelError(
            f"model {weights} predicts {len(model.names)} classes but the project has "
            f"{num_classes}; retrain on the current class list"
        )

    def stream() -> Iterator[list[Detections]]:
        for chunk in _batched(images, batch):
            arrays = _read_images(chunk)
            per_aug: list[list[Detections]] = []
            for aug, (flip, size) in zip(augs, parsed, strict=True):
                if flip == "hflip":
                    view = [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
                elif flip == "vflip":
                    view = [np.ascontiguousarray(a[::-1]) for a in arrays]
                else:
                    view = arrays
                dets = _predict_arrays(
                    model, view, chunk, size, conf, iou, batch, num_classes, min_candidates
                )
                if flip is not None:
                    dets = [_unflip(d, flip) for d in dets]
                for d in dets:
                    d.meta["augmentation"] = aug
                per_aug.append(dets)
            for i in range(len(chunk)):
                yield [dets[i] for dets in per_aug]

    return stream()


# --------------------------------------------------------------------------------------------
# ONNX Runtime scoring path
# --------------------------------------------------------------------------------------------


def export_onnx(
    weights: Path,
    imgsz: int,
    yolo_config_dir: Path,
    out_path: Path | None = None,
    threads: int = 2,
) -> Path:
    """Export ``weights`` to ONNX (dynamic batch and size, simplified) and return its path.

    Default path: beside the weights with suffix ``.onnx``. Needs the ``onnx``, ``onnxslim`` and
    ``onnxruntime`` packages installed (Ultralytics' auto-install is off). The graph outputs
    ``(B, 4 + nc, anchors)``: centre-xywh boxes in input pixels and sigmoid class scores; NMS is
    done by `predict_onnx`.
    """
    for pkg in ("onnx", "onnxslim", "onnxruntime"):
        if importlib.util.find_spec(pkg) is None:
            raise ModelError(f"ONNX export needs the '{pkg}' package: pip install {pkg}")
    model = load_model(weights, yolo_config_dir, threads)
    try:
        exported = Path(
            model.export(
                format="onnx", imgsz=imgsz, dynamic=True, simplify=True, device="cpu", verbose=False
            )
        )
    except Exception as exc:
        raise ModelError(f"ONNX export of {weights} failed: {type(exc).__name__}: {exc}") from exc
    if out_path is not None and exported.resolve() != Path(out_path).resolve():
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(exported, out_path)
        return Path(out_path).resolve()
    return exported.resolve()


def _letterbox_into(x: np.ndarray, arrays: list[np.ndarray], imgsz: int) -> None:
    """Fill ``x`` ``(B, 3, imgsz, imgsz)`` float32 with the BGR ``arrays`` as the model's input:
    Ultralytics' square letterbox, RGB, scaled to [0, 1]; rows past ``len(arrays)`` are zeroed."""
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=32)
    x[len(arrays) :] = 0.0
    for i, arr in enumerate(arrays):
        boxed: np.ndarray = np.asarray(letterbox(image=arr))  # BGR HWC uint8, imgsz x imgsz
        x[i] = boxed[..., ::-1].transpose(2, 0, 1) * np.float32(1 / 255)


def quantize_onnx(
    onnx_path: Path,
    calibration_images: Iterable[Path],
    imgsz: int,
    yolo_config_dir: Path,
    out_path: Path | None = None,
    max_images: int = 64,
    batch: int = 16,
    threads: int = 2,
) -> Path:
    """Static int8 quantization of an `export_onnx` model for the CPU; returns its path.

    QDQ format: per-channel int8 weights and uint8 activations whose ranges are calibrated
    (min-max) on up to ``max_images`` of ``calibration_images`` (labeled images of the project
    are a good choice), letterboxed to ``imgsz`` as `predict_onnx` does. The detection head's
    decoding (box distribution, sigmoid, concatenation) stays float32, so class scores keep
    their resolution down to the low candidate threshold. Scores move slightly: measure the
    ranking agreement with ``bench/scoring_throughput.py`` before relying on it. Default path:
    beside ``onnx_path`` with suffix ``.int8.onnx``. Deterministic for the same images.
    """
    src = _require_file(Path(onnx_path), "ONNX model", "export one with loop.model.export_onnx")
    if imgsz % 32:
        raise ModelError(f"imgsz must be a multiple of 32 for the ONNX path, got {imgsz}")
    if max_images < 1 or batch < 1:
        raise ModelError(f"max_images and batch must be >= 1, got {max_images}, {batch}")
    for pkg in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(pkg) is None:
            raise ModelError(f"int8 quantization needs the '{pkg}' package: pip install {pkg}")
    _setup(yolo_config_dir, threads)
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths = list(islice(calibration_images, max_images))
    if not paths:
        raise ModelError(
            "int8 quantization needs calibration images; label some images first or pass them"
        )
    batches = []
    for chunk in _batched(paths, batch):
        x = np.zeros((len(chunk), 3, imgsz, imgsz), dtype=np.float32)
        _letterbox_into(x, _read_images(chunk), imgsz)
        batches.append(x)
    out = Path(out_path) if out_path is not None else src.with_suffix(".int8.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_pre = out.with_name(f".{out.name}.{os.getpid()}.pre.onnx")
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    try:
        # Symbolic shape inference cannot follow the dynamic batch and size; ONNX's own can.
        quant_pre_process(str(src), str(tmp_pre), skip_symbolic_shape=True)
        graph = onnx.load(str(tmp_pre)).graph
        input_name = graph.input[0].name
        output = graph.output[0].name
        head = next(n.name for n in graph.node if output in n.output).rsplit("/", 1)[0] + "/"
        # The head's decoding: every node of the last module outside its conv branches.
        decode = [
            n.name
            for n in graph.node
            if n.name.startswith(head) and "/cv2" not in n.name and "/cv3" not in n.name
        ]

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                x = next(self._it, None)
                return None if x is None else {input_name: x}

        quantize_static(
            str(tmp_pre),
            str(tmp_out),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=decode,
        )
        os.replace(tmp_out, out)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"int8 quantization of {src} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for tmp in (tmp_pre, tmp_out):
            tmp.unlink(missing_ok=True)
    return out.resolve()


def predict_onnx(
    onnx_path: Path,
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
    """`predict` through ONNX Runtime: the same `Detections` (boxes, confidences, class_probs,
    candidate floor) from a model exported by `export_onnx`.

    Preprocessing is Ultralytics' own square letterbox to ``imgsz``; NMS is Ultralytics' (with
    the kept indices, to gather ``class_probs``). Every batch is padded to ``batch`` images so
    ONNX Runtime sees one input shape (each new shape costs a slow first call).
    """
    path = _require_file(Path(onnx_path), "ONNX model", "export one with loop.model.export_onnx")
    _check_predict_args(conf, iou, batch, min_candidates)
    if imgsz % 32:
        raise ModelError(f"imgsz must be a multiple of 32 for the ONNX path, got {imgsz}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("the ONNX path needs onnxruntime: pip install onnxruntime") from exc
    _setup(yolo_config_dir, threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spin-waiting worker threads collapse when another process wants a core (as OpenMP's do,
    # see loop.offline); sleeping ones cost little when the CPU is ours alone.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    input_name = session.get_inputs()[0].name
    return _onnx_stream(
        session, input_name, images, imgsz, conf, iou, batch, num_classes, min_candidates
    )


def _prefetched(
    images: Iterable[Path], batch: int, imgsz: int
) -> Iterator[tuple[list[Path], list[tuple[int, int]], np.ndarray]]:
    """``(paths, (h, w) of each image, input batch (batch, 3, imgsz, imgsz))`` per chunk of
    ``images``; the next chunk is read and letterboxed in a background thread while the caller
    runs the current one (OpenCV and ONNX Runtime release the GIL). At most two batches are in
    memory; an unreadable image raises `ImageError` when its batch is reached."""
    from concurrent.futures import ThreadPoolExecutor

    def prepare(chunk: list[Path]) -> tuple[list[Path], list[tuple[int, int]], np.ndarray]:
        arrays = _read_images(chunk)
        x = np.empty((batch, 3, imgsz, imgsz), dtype=np.float32)
        # Padded to ``batch`` rows: ONNX Runtime sees one input shape.
        _letterbox_into(x, arrays, imgsz)
        return chunk, [(a.shape[0], a.shape[1]) for a in arrays], x

    chunks = _batched(images, batch)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defect-loop-prefetch")
    try:
        first = next(chunks, None)
        pending = pool.submit(prepare, first) if first else None
        while pending is not None:
            nxt = next(chunks, None)
            ready = pending.result()
            pending = pool.submit(prepare, nxt) if nxt else None
            yield ready
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _onnx_stream(
    session: Any,
    input_name: str,
    images: Iterable[Path],
    imgsz: int,
    conf: float,
    iou: float,
    batch: int,
    num_classes: int,
    min_candidates: int,
) -> Iterator[Detections]:
    import torch
    from ultralytics.utils import ops

    for chunk, sizes, x in _prefetched(images, batch, imgsz):
        out = session.run(None, {input_name: x})[0]
        if out.ndim != 3 or out.shape[1] != 4 + num_classes:
            raise ModelError(
                f"ONNX output of shape {out.shape} is not (B, 4 + {num_classes}, anchors): "
                "export a detection model trained on the project's classes"
            )
        raw = torch.from_numpy(out[: len(chunk)])
        dets, keep = _nms_with_floor(raw, conf, iou, 300, min_candidates)
        for b, (p, (h, w)) in enumerate(zip(chunk, sizes, strict=True)):
            d = dets[b]
            boxes: Any = ops.scale_boxes((imgsz, imgsz), d[:, :4].clone(), (h, w))
            probs = raw[b, 4 : 4 + num_classes][:, keep[b]].T
            det = Detections(
                xyxy=boxes.numpy().astype(np.float64),
                class_id=d[:, 5].numpy().astype(np.int64),
                image_wh=(w, h),
                confidence=d[:, 4].numpy().astype(np.float64),
                class_probs=probs.numpy().astype(np.float64).reshape(-1, num_classes),
                meta={"path": str(p)},
            )
            yield _candidate_floor(det, conf, min_candidates)


def prepare_ultralytics(yolo_config_dir: Path, threads: int = 2) -> None:
    """Configure offline mode and import Ultralytics now.

    Ultralytics binds its settings folder at first import for the life of the process; a process
    that trains in many short-lived workspaces (the oracle replay) calls this first with a folder
    that outlives them.
    """
    _setup(yolo_config_dir, threads)


# --------------------------------------------------------------------------------------------
# ONNX with an embedding output (deployment bundles and production monitoring)
# --------------------------------------------------------------------------------------------

EMBEDDING_OUTPUT = "embedding"


@dataclass(frozen=True)
class EmbeddingPart:
    """One piece of an ONNX ``embedding`` output: layer ``layer``'s feature map pooled over
    space by ``pool`` (``avg`` or ``max``) into ``channels`` values."""

    layer: int
    pool: str
    channels: int


def add_embedding_output(
    onnx_path: Path, out_path: Path, parts: Sequence[tuple[int, str]] | None = None
) -> list[EmbeddingPart]:
    """Write a copy of an `export_onnx` model with a second output ``embedding`` ``(B, d)``
    float32: the concatenation of ``parts``, each ``(layer, "avg" | "max")`` a layer's feature
    map pooled over space. Output 0 (the detection head, ``(B, 4 + nc, anchors)``) is left
    exactly as it was, so `predict_onnx` on the copy gives the same `Detections`. Returns the
    parts in output order, with their widths.

    Default parts: the averages of the Detect head's highest-resolution input (stride 8: small,
    local defects still weigh in it) and of its lowest-resolution input (the layer `embed`
    pools). For yolov8n: layers 15 (64 values) and 21 (256).
    A layer's output is found by Ultralytics' ONNX node names (``/model.<i>/...``): the last
    node of module ``i`` in the graph's topological order produces it.
    """
    import re

    src = _require_file(Path(onnx_path), "ONNX model", "export one with loop.model.export_onnx")
    if importlib.util.find_spec("onnx") is None:
        raise ModelError("adding an embedding output needs the 'onnx' package: pip install onnx")
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(src))
    graph = proto.graph
    if any(o.name == EMBEDDING_OUTPUT for o in graph.output):
        raise ModelError(f"{src} already has an '{EMBEDDING_OUTPUT}' output")
    module_of: dict[int, list[Any]] = {}
    for node in graph.node:
        m = re.match(r"/model\.(\d+)/", node.name)
        if m:
            module_of.setdefault(int(m.group(1)), []).append(node)
    if not module_of:
        raise ModelError(
            f"{src} has no Ultralytics module names (/model.<i>/...); export it with "
            "loop.model.export_onnx"
        )
    head = max(module_of)
    output_of = {nodes[-1].output[0]: i for i, nodes in module_of.items() if i < head}
    head_inputs = sorted({output_of[t] for n in module_of[head] for t in n.input if t in output_of})
    if parts is None:
        if not head_inputs:
            raise ModelError(f"cannot find the inputs of the Detect head in {src}")
        parts = [(head_inputs[0], "avg"), (head_inputs[-1], "avg")]
    if not parts:
        raise ModelError("add_embedding_output needs at least one part")
    try:
        shapes = {
            vi.name: vi.type.tensor_type.shape
            for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info
        }
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed on {src}: {exc}") from exc
    made: list[EmbeddingPart] = []
    pooled_names = []
    for k, (layer, pool) in enumerate(parts):
        if layer not in module_of or not 0 <= layer < head:
            raise ModelError(f"layer must be within [0, {head - 1}] for this model, got {layer}")
        if pool not in ("avg", "max"):
            raise ModelError(f"pool must be 'avg' or 'max', got {pool!r}")
        feature = module_of[layer][-1].output[0]
        shape = shapes.get(feature)
        if shape is None or len(shape.dim) != 4 or not shape.dim[1].HasField("dim_value"):
            raise ModelError(f"layer {layer} of {src} is not a (B, C, H, W) feature map")
        op = "GlobalAveragePool" if pool == "avg" else "GlobalMaxPool"
        pooled, flat = f"/{EMBEDDING_OUTPUT}/{k}/pooled", f"/{EMBEDDING_OUTPUT}/{k}/flat"
        graph.node.extend(
            [
                helper.make_node(op, [feature], [pooled], name=f"/{EMBEDDING_OUTPUT}/{k}/pool"),
                helper.make_node(
                    "Flatten", [pooled], [flat], name=f"/{EMBEDDING_OUTPUT}/{k}/flatten", axis=1
                ),
            ]
        )
        pooled_names.append(flat)
        made.append(EmbeddingPart(layer, pool, int(shape.dim[1].dim_value)))
    graph.node.append(
        helper.make_node(
            "Concat", pooled_names, [EMBEDDING_OUTPUT], name=f"/{EMBEDDING_OUTPUT}/concat", axis=1
        )
    )
    width = sum(p.channels for p in made)
    graph.output.append(
        helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["batch", width])
    )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"the embedding output of {src} gives an invalid graph: {exc}") from exc
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return made


def _ort_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session for ``path`` with the thread settings `predict_onnx` uses."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("the ONNX path needs onnxruntime: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def predict_onnx_embedded(
    onnx_path: Path,
    images: Iterable[Path],
    imgsz: int,
    conf: float,
    yolo_config_dir: Path,
    num_classes: int,
    batch: int = 16,
    iou: float = 0.7,
    threads: int = 2,
    min_candidates: int = 0,
) -> Iterator[tuple[Detections, np.ndarray]]:
    """`predict_onnx` on a model made by `add_embedding_output`: per image, in input order, its
    `Detections` (exactly as `predict_onnx` gives them) and its ``(d,)`` float32 embedding, from
    ONE forward pass. Preprocessing: Ultralytics' square letterbox to ``imgsz``."""
    path = _require_file(Path(onnx_path), "ONNX model", "export one with loop.model.export_onnx")
    _check_predict_args(conf, iou, batch, min_candidates)
    if imgsz % 32:
        raise ModelError(f"imgsz must be a multiple of 32 for the ONNX path, got {imgsz}")
    _setup(yolo_config_dir, threads)
    session = _ort_session(path, threads)
    outputs = [o.name for o in session.get_outputs()]
    if EMBEDDING_OUTPUT not in outputs:
        raise ModelError(
            f"{path} has no '{EMBEDDING_OUTPUT}' output; make one with "
            "loop.model.add_embedding_output"
        )
    input_name = session.get_inputs()[0].name

    def stream() -> Iterator[tuple[Detections, np.ndarray]]:
        import torch
        from ultralytics.utils import ops

        for chunk, sizes, x in _prefetched(images, batch, imgsz):
            out, emb = session.run([outputs[0], EMBEDDING_OUTPUT], {input_name: x})
            if out.ndim != 3 or out.shape[1] != 4 + num_classes:
                raise ModelError(
                    f"ONNX output of shape {out.shape} is not (B, 4 + {num_classes}, anchors): "
                    "export a detection model trained on the project's classes"
                )
            raw = torch.from_numpy(out[: len(chunk)])
            dets, keep = _nms_with_floor(raw, conf, iou, 300, min_candidates)
            for b, (p, (h, w)) in enumerate(zip(chunk, sizes, strict=True)):
                d = dets[b]
                boxes: Any = ops.scale_boxes((imgsz, imgsz), d[:, :4].clone(), (h, w))
                probs = raw[b, 4 : 4 + num_classes][:, keep[b]].T
                det = Detections(
                    xyxy=boxes.numpy().astype(np.float64),
                    class_id=d[:, 5].numpy().astype(np.int64),
                    image_wh=(w, h),
                    confidence=d[:, 4].numpy().astype(np.float64),
                    class_probs=probs.numpy().astype(np.float64).reshape(-1, num_classes),
                    meta={"path": str(p)},
                )
                yield (
                    _candidate_floor(det, conf, min_candidates),
                    np.asarray(emb[b], dtype=np.float32).reshape(-1),
                )

    return stream()
