"""The ONNX Runtime scoring path: export (`export_onnx`), static int8 quantization
(`quantize_onnx`), prediction (`predict_onnx`, the same `Detections` as `loop.model.predict`),
and a second ``embedding`` output for deployment bundles and production monitoring
(`add_embedding_output`, `predict_onnx_embedded`)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from loop.detections import Detections
from loop.errors import ModelError
from loop.model.loading import _batched, _read_images, _require_file, _setup, load_model
from loop.model.prediction import _candidate_floor, _check_predict_args, _nms_with_floor


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
    _, session = _open_session(
        onnx_path, imgsz, conf, iou, batch, min_candidates, yolo_config_dir, threads
    )
    input_name = session.get_inputs()[0].name

    def stream() -> Iterator[Detections]:
        for chunk, sizes, x in _prefetched(images, batch, imgsz):
            out = session.run(None, {input_name: x})[0]
            yield from _detections(out, chunk, sizes, imgsz, conf, iou, num_classes, min_candidates)

    return stream()


def _open_session(
    onnx_path: Path,
    imgsz: int,
    conf: float,
    iou: float,
    batch: int,
    min_candidates: int,
    yolo_config_dir: Path,
    threads: int,
) -> tuple[Path, Any]:
    """The checks `predict_onnx` and `predict_onnx_embedded` share (raising `ModelError`), then
    Ultralytics' offline set-up and an ONNX Runtime session: ``(model path, session)``."""
    path = _require_file(Path(onnx_path), "ONNX model", "export one with loop.model.export_onnx")
    _check_predict_args(conf, iou, batch, min_candidates)
    if imgsz % 32:
        raise ModelError(f"imgsz must be a multiple of 32 for the ONNX path, got {imgsz}")
    _setup(yolo_config_dir, threads)
    return path, _ort_session(path, threads)


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


def _detections(
    out: np.ndarray,
    chunk: list[Path],
    sizes: list[tuple[int, int]],
    imgsz: int,
    conf: float,
    iou: float,
    num_classes: int,
    min_candidates: int,
) -> Iterator[Detections]:
    """One `Detections` per image of ``chunk`` (original ``(h, w)`` in ``sizes``) from the
    detection output ``out`` ``(batch, 4 + nc, anchors)`` of a letterboxed batch: the NMS,
    class probabilities and candidate floor of `loop.model.predict`."""
    import torch
    from ultralytics.utils import ops

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
    path, session = _open_session(
        onnx_path, imgsz, conf, iou, batch, min_candidates, yolo_config_dir, threads
    )
    outputs = [o.name for o in session.get_outputs()]
    if EMBEDDING_OUTPUT not in outputs:
        raise ModelError(
            f"{path} has no '{EMBEDDING_OUTPUT}' output; make one with "
            "loop.model.add_embedding_output"
        )
    input_name = session.get_inputs()[0].name

    def stream() -> Iterator[tuple[Detections, np.ndarray]]:
        for chunk, sizes, x in _prefetched(images, batch, imgsz):
            out, emb = session.run([outputs[0], EMBEDDING_OUTPUT], {input_name: x})
            dets = _detections(out, chunk, sizes, imgsz, conf, iou, num_classes, min_candidates)
            for b, det in enumerate(dets):
                yield det, np.asarray(emb[b], dtype=np.float32).reshape(-1)

    return stream()
