"""Loading YOLO on the CPU, offline: configuration, checkpoints, dataset YAMLs, images."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from loop.errors import ImageError, ModelError
from loop.offline import configure_ultralytics

if TYPE_CHECKING:
    from ultralytics import YOLO


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


# The model kinds defect-loop trains and scores with (config ``task``).
MODEL_TASKS = ("detect", "segment")


def load_model(
    weights: Path, yolo_config_dir: Path, threads: int = 2, task: str | None = "detect"
) -> YOLO:
    """Load a checkpoint (absolute or relative ``.pt`` path) on the CPU.

    ``task``: the kind it must be (``detect`` or ``segment``), or None for either; another kind
    raises `ModelError`.
    """
    path = _require_weights(weights)
    _setup(yolo_config_dir, threads)
    from ultralytics import YOLO

    try:
        # A str(path) of an existing file never triggers Ultralytics' download-by-name logic.
        model = YOLO(str(path))
    except Exception as exc:
        raise ModelError(f"could not load model weights {path}: {exc}") from exc
    wanted = MODEL_TASKS if task is None else (task,)
    if model.task not in wanted:
        need = " or ".join(f"a {t} model" for t in wanted)
        raise ModelError(
            f"{path} is a '{model.task}' model; this needs {need} "
            "(task: detect trains detectors, task: segment segmentation models)"
        )
    return model


def model_task(weights: Path, yolo_config_dir: Path, threads: int = 2) -> str:
    """``detect`` or ``segment``: the kind of checkpoint ``weights`` holds."""
    return str(load_model(weights, yolo_config_dir, threads, task=None).task)


def _model_names(model: YOLO) -> list[str]:
    return _names_list(model.names)


def model_class_names(weights: Path, yolo_config_dir: Path, threads: int = 2) -> list[str]:
    """The class names a detection or segmentation checkpoint predicts, in id order."""
    return _model_names(load_model(weights, yolo_config_dir, threads, task=None))


def prepare_ultralytics(yolo_config_dir: Path, threads: int = 2) -> None:
    """Configure offline mode and import Ultralytics now.

    Ultralytics binds its settings folder at first import for the life of the process; a process
    that trains in many short-lived workspaces (the oracle replay) calls this first with a folder
    that outlives them.
    """
    _setup(yolo_config_dir, threads)


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
