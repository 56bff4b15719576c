"""Evaluating a model on a split: Ultralytics' box metrics and, from the same pass, the
per-image match statistics that `loop.evaluation` bootstraps."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from loop.errors import DefectLoopError, EvaluationError, ModelError
from loop.matches import ImageMatches
from loop.model.loading import _model_names, _read_data_yaml, _require_weights, load_model
from loop.model.training import EvalResult, _eval_result, _validator_cls


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
    """Box metrics of ``weights`` on ``split`` (``train``/``val``/``test``) of ``data_yaml``;
    for a segmentation model also its mask metrics (`EvalResult.mask_map50` ...; the split must
    then be an Ultralytics segmentation export).

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
# re-exporting a version rewrites identical labels), size, batch and classes. Values: the
# result, the box matches and (segmentation models) the mask matches.
_EVAL_MEMO: OrderedDict[tuple[Any, ...], tuple[EvalResult, ImageMatches, ImageMatches | None]] = (
    OrderedDict()
)


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
    matches: str = "box",
) -> tuple[EvalResult, ImageMatches]:
    """`evaluate`, plus the per-image match statistics of the same evaluation pass.

    ``matches``: ``box`` (predictions matched to true boxes by box IoU) or ``mask`` (by mask
    IoU: Ultralytics' ``tp_m``; a segmentation model only, else `ModelError`). The mask matches
    reproduce `EvalResult.mask_map50` / ``mask_map50_95`` as the box matches reproduce
    ``map50`` / ``map50_95``.

    The statistics are what Ultralytics' ``DetectionValidator`` accumulates per image (each
    predicted box's true-positive flags at IoU 0.50:0.95, confidence and class; each true box's
    class), keyed by the image file stem (the sha256 in exported dataset versions), in
    evaluation order: `loop.evaluation` bootstraps them without running the model again, and
    `loop.matches.box_metrics` of them equals the returned `EvalResult`'s figures.
    """
    if matches not in ("box", "mask"):
        raise ModelError(f"matches must be 'box' or 'mask', got {matches!r}")
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
        return _pick(*_EVAL_MEMO[key], matches, wpath)
    model = load_model(wpath, yolo_config_dir, threads, task=None)
    names = _model_names(model)
    if names != list(class_names):
        raise ModelError(
            f"model {weights} was trained for classes {names}, not {list(class_names)}; "
            "evaluate with the project's class list or retrain"
        )
    validator_cls = _validator_cls(str(model.task))
    captured: list[Any] = []

    class _Capturing(validator_cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.image_stats: list[tuple[str, Any, Any, Any, Any]] = []
            self.mask_stats: list[tuple[str, Any, Any, Any, Any]] = []
            captured.append(self)

        def update_metrics(self, preds: list[dict[str, Any]], batch: dict[str, Any]) -> None:
            stats = self.metrics.stats
            first = len(stats["tp"])
            super().update_metrics(preds, batch)
            # DetectionValidator appends one entry per image; get_stats() clears them later.
            # SegmentationValidator adds "tp_m": the same predictions matched by mask IoU.
            for si in range(len(preds)):
                j = first + si
                rest = (stats["conf"][j], stats["pred_cls"][j], stats["target_cls"][j])
                name = str(batch["im_file"][si])
                self.image_stats.append((name, stats["tp"][j], *rest))
                if "tp_m" in stats:
                    self.mask_stats.append((name, stats["tp_m"][j], *rest))

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
    box = _image_matches(validator.image_stats, len(class_names), data_path, split)
    mask = (
        _image_matches(validator.mask_stats, len(class_names), data_path, split)
        if validator.mask_stats
        else None
    )
    _EVAL_MEMO[key] = (result, box, mask)
    while len(_EVAL_MEMO) > _EVAL_MEMO_SIZE:
        _EVAL_MEMO.popitem(last=False)
    return _pick(result, box, mask, matches, wpath)


def _pick(
    result: EvalResult,
    box: ImageMatches,
    mask: ImageMatches | None,
    matches: str,
    weights: Path,
) -> tuple[EvalResult, ImageMatches]:
    if matches == "box":
        return result, box
    if mask is None:
        raise ModelError(
            f"model {weights} predicts no masks (a detection model): mask matches need a "
            "segmentation model evaluated on a segmentation export"
        )
    return result, mask


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
    `loop.matches.box_metrics` reproduces): ``map50``, ``map50_95``, ``precision``,
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
