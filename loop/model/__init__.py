"""YOLO training, evaluation, prediction, embeddings and ONNX: the only package that imports
Ultralytics.

Every public function first calls `loop.offline.configure_ultralytics` with the given
``yolo_config_dir`` and only then imports Ultralytics, so nothing it does can reach the network
(no font/weight downloads, no telemetry, no auto-install) and its MLflow callback stays off.
Everything runs on the CPU.

Coordinates: `Detections` from `predict` hold pixel ``xyxy`` in the original image (top-left
origin); ``class_probs`` are YOLO's independent per-class sigmoid scores at each kept box.

One module per concern: `loading` (offline set-up, checkpoints, image reading), `training`
(`train`, `EvalResult`), `validation` (`evaluate`, per-image match statistics), `prediction`
(`predict`, `predict_tta`, `embed`) and `onnx_runtime` (export, int8 quantization and the ONNX
Runtime scoring path, with an embedding output for deployment bundles).
"""

from loop.model.loading import load_model, model_class_names, prepare_ultralytics
from loop.model.onnx_runtime import (
    EMBEDDING_OUTPUT,
    EmbeddingPart,
    add_embedding_output,
    export_onnx,
    predict_onnx,
    predict_onnx_embedded,
    quantize_onnx,
)
from loop.model.prediction import TTA_DEFAULT, embed, predict, predict_tta
from loop.model.training import CONFUSION_CONF, EvalResult, TrainResult, train
from loop.model.validation import evaluate, evaluate_matches, ultralytics_box_metrics

__all__ = [
    "CONFUSION_CONF",
    "EMBEDDING_OUTPUT",
    "TTA_DEFAULT",
    "EmbeddingPart",
    "EvalResult",
    "TrainResult",
    "add_embedding_output",
    "embed",
    "evaluate",
    "evaluate_matches",
    "export_onnx",
    "load_model",
    "model_class_names",
    "predict",
    "predict_onnx",
    "predict_onnx_embedded",
    "predict_tta",
    "prepare_ultralytics",
    "quantize_onnx",
    "train",
    "ultralytics_box_metrics",
]
