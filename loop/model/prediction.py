"""Prediction with class probabilities (`predict`), test-time augmentation (`predict_tta`) and
image embeddings (`embed`), through Ultralytics on the CPU."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from loop.detections import Detections
from loop.errors import ModelError
from loop.formats.masks import SIMPLIFY_TOLERANCE_PX, mask_to_instance_rings
from loop.model.loading import _batched, _read_images, load_model


def _nms_with_floor(
    raw: Any,
    conf: float,
    iou: float,
    max_det: int,
    min_candidates: int,
    classes: Any = None,
    agnostic: bool = False,
    nc: int | None = None,
) -> tuple[list[Any], list[Any]]:
    """Class-aware NMS over raw head output ``(B, 4 + nc [+ nm], anchors)`` (centre-xywh in input
    pixels, sigmoid class scores, a segmentation head's ``nm`` mask coefficients): per image the
    kept boxes ``(n, 6 [+ nm])`` (xyxy input pixels, conf, class, coefficients) and the anchor
    index of each, so that ``raw[b, 4:4 + nc, idx]`` are their class scores.

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

    nc = raw.shape[1] - 4 if nc is None else nc
    dets, keep = nms.non_max_suppression(
        raw, conf, iou, classes, agnostic, max_det=max_det, nc=nc, return_idxs=True
    )
    keep = [k.view(-1).long() for k in keep]
    short = [i for i, d in enumerate(dets) if len(d) < min_candidates]
    if not short:
        return dets, keep
    sub_raw = raw[short]  # (S, 4 + nc [+ mask coefficients], anchors)
    scores = sub_raw[:, 4 : 4 + nc].amax(1)  # (S, anchors)
    anchors = raw.shape[2]
    m = min(64, anchors)
    while True:
        top = scores.topk(m, dim=1).indices  # (S, m), descending score
        sub = torch.gather(sub_raw, 2, top[:, None, :].expand(-1, raw.shape[1], -1))
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
def _probs_predictor_cls(min_candidates: int = 0, segment: bool = False) -> type:
    """DetectionPredictor (``segment``: SegmentationPredictor) whose Results carry
    ``class_probs``: (n, nc) sigmoid scores per kept box, with the candidate floor of
    `_nms_with_floor`. Segmentation Results keep every kept box, each with its mask at the
    original image's resolution (`ops.process_mask_native`; an empty mask stays, so masks and
    class scores stay parallel to the boxes)."""
    from ultralytics.engine.results import Results
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.models.yolo.segment import SegmentationPredictor
    from ultralytics.utils import ops

    base = SegmentationPredictor if segment else DetectionPredictor

    class _ProbsPredictor(base):  # type: ignore[misc,valid-type]
        def postprocess(self, preds: Any, img: Any, orig_imgs: Any, **kwargs: Any) -> list[Any]:
            protos = None
            if segment:
                protos = preds[0][1] if isinstance(preds[0], tuple) else preds[1]
                preds = preds[0]
            raw = preds[0] if isinstance(preds, (list, tuple)) else preds
            backend: Any = self.model  # set up before any batch is processed
            nc = len(backend.names)
            width_ok = raw.shape[1] > 4 + nc if segment else raw.shape[1] == 4 + nc
            if getattr(backend, "end2end", False) or raw.ndim != 3 or not width_ok:
                raise ModelError(
                    f"model output of shape {tuple(raw.shape)} is not (B, 4 + {nc}"
                    f"{' + mask coefficients' if segment else ''}, anchors): class probabilities "
                    "need a YOLO head with NMS (e.g. yolov8/yolo11; for yolo26 keep nms enabled)"
                )
            dets, keep = _nms_with_floor(
                raw,
                self.args.conf,
                kwargs.pop("iou", self.args.iou),
                self.args.max_det,
                min_candidates,
                self.args.classes,
                self.args.agnostic_nms,
                nc=nc,
            )
            if not isinstance(orig_imgs, list):
                orig_imgs = ops.convert_torch2numpy_batch(orig_imgs)[..., ::-1]
            if protos is None:
                results = self.construct_results(dets, img, orig_imgs, **kwargs)
            else:
                results = []
                for pred, orig, path, proto in zip(
                    dets, orig_imgs, self.batch[0], protos, strict=False
                ):
                    pred[:, :4] = ops.scale_boxes(img.shape[2:], pred[:, :4], orig.shape)
                    masks = (
                        ops.process_mask_native(proto, pred[:, 6:], pred[:, :4], orig.shape[:2])
                        if len(pred)
                        else None
                    )
                    results.append(
                        Results(
                            orig, path=path, names=backend.names, boxes=pred[:, :6], masks=masks
                        )
                    )
            for b, (res, idx) in enumerate(zip(results, keep, strict=True)):
                # raw[b, 4:, a] are the class scores of anchor a; the kept box's conf is their max.
                res.class_probs = raw[b, 4 : 4 + nc][:, idx].T.float().cpu()
            return results

    return _ProbsPredictor


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
    simplify_px: float = SIMPLIFY_TOLERANCE_PX,
) -> Iterator[Detections]:
    """Stream one `Detections` per image, in input order, with ``confidence`` and ``class_probs``.

    A segmentation checkpoint's `Detections` also carry ``polygons``: per box the outline of its
    predicted mask (thresholded at the model's 0.5 sigmoid, at the original image's resolution),
    as pixel-edge rings simplified by Douglas-Peucker with ``simplify_px`` pixels of tolerance
    (`loop.formats.masks.mask_to_instance_rings`; parts under 4 pixels or under 10 % of the
    largest part dropped, ``()`` for an empty mask); the box keeps the model's own box.

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
    model = load_model(weights, yolo_config_dir, threads, task=None)
    if len(model.names) != num_classes:
        raise ModelError(
            f"model {weights} predicts {len(model.names)} classes but the project has "
            f"{num_classes}; retrain on the current class list"
        )
    return _predict_stream(
        model, images, imgsz, conf, iou, batch, num_classes, min_candidates, simplify_px
    )


def _predict_stream(
    model: Any,
    images: Iterable[Path],
    imgsz: int,
    conf: float,
    iou: float,
    batch: int,
    num_classes: int,
    min_candidates: int = 0,
    simplify_px: float = SIMPLIFY_TOLERANCE_PX,
) -> Iterator[Detections]:
    for chunk in _batched(images, batch):
        arrays = _read_images(chunk)
        yield from _predict_arrays(
            model, arrays, chunk, imgsz, conf, iou, batch, num_classes, min_candidates, simplify_px
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
    simplify_px: float = SIMPLIFY_TOLERANCE_PX,
) -> list[Detections]:
    """One `Detections` per BGR array (see `predict`); ``paths`` only fill ``meta["path"]``."""
    segment = model.task == "segment"
    predictor = _probs_predictor_cls(min_candidates, segment)
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
            polygons=_mask_rings(res, len(boxes), simplify_px) if segment else None,
        )
        out.append(_candidate_floor(det, conf, min_candidates))
    return out


def _mask_rings(res: Any, n: int, simplify_px: float) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per box the simplified outline of its mask (see `predict`)."""
    if n == 0 or res.masks is None:
        return tuple(() for _ in range(n))
    masks = res.masks.data.cpu().numpy()
    return tuple(mask_to_instance_rings(m, simplify_px) for m in masks)


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
    model = load_model(weights, yolo_config_dir, threads, task=None)
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
    polygons = None
    if det.polygons is not None:
        col, size = (0, w) if axis == "hflip" else (1, h)

        def flip(ring: np.ndarray) -> np.ndarray:
            out = np.array(ring, dtype=np.float64)
            out[:, col] = size - out[:, col]
            return out

        polygons = tuple(tuple(flip(r) for r in rings) for rings in det.polygons)
    return Detections(
        xyxy,
        det.class_id,
        det.image_wh,
        det.confidence,
        det.class_probs,
        dict(det.meta),
        polygons=polygons,
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
    model = load_model(weights, yolo_config_dir, threads, task=None)
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
                dets = [replace(d, meta={**d.meta, "augmentation": aug}) for d in dets]
                per_aug.append(dets)
            for i in range(len(chunk)):
                yield [dets[i] for dets in per_aug]

    return stream()
