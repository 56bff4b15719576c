"""Train / evaluate / predict / embed on a tiny synthetic dataset, fully offline, on the CPU.

One module-scoped training run (from yolov8n.yaml) feeds the other tests. mAP is never asserted:
after a couple of epochs from scratch it is ~0.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from loop.config import TrainConfig
from loop.detections import Detections
from loop.errors import ImageError, ModelError
from loop.model import EvalResult, TrainResult, embed, evaluate, predict, train
from loop.offline import deny_network

pytestmark = pytest.mark.integration

CLASSES = ["scratch", "dent"]
IMGSZ = 64
CFG = TrainConfig(model="yolov8n.yaml", imgsz=IMGSZ, epochs=2, batch=4, seed=0, threads=2)


def _make_dataset(root: Path, seed: int = 0) -> Path:
    """12 train / 4 val / 4 test images of 64-128 px with 1-3 filled rectangles each.

    Class 0 rectangles are dark, class 1 bright; YOLO labels; data.yaml with absolute paths.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            w, h = (int(v) for v in rng.integers(64, 129, size=2))
            img = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(0, len(CLASSES)))
                bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
                x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                img[y1 : y1 + bh, x1 : x1 + bw] = 20 if cls == 0 else 235
                cx, cy = (x1 + bw / 2) / w, (y1 + bh / 2) / h
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {bw / w:.6f} {bh / h:.6f}")
            Image.fromarray(img).save(root / "images" / split / f"{split}_{i:02d}.png")
            (root / "labels" / split / f"{split}_{i:02d}.txt").write_text("\n".join(lines) + "\n")
    data = {
        "path": str(root),
        "train": str(root / "images" / "train"),
        "val": str(root / "images" / "val"),
        "test": str(root / "images" / "test"),
        "names": dict(enumerate(CLASSES)),
    }
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model")


@pytest.fixture(scope="module")
def data_yaml(workdir: Path) -> Path:
    return _make_dataset(workdir / "data")


@pytest.fixture(scope="module")
def yolo_dir(workdir: Path) -> Path:
    return workdir / "ultralytics"


@pytest.fixture(scope="module")
def trained(workdir: Path, data_yaml: Path, yolo_dir: Path) -> TrainResult:
    t0 = time.perf_counter()
    with deny_network() as attempts:
        result = train(data_yaml, workdir / "runs", CFG, yolo_dir, name="scratch")
    print(f"\ntrain 2 epochs from yaml: {time.perf_counter() - t0:.1f}s")
    assert attempts == [], f"network attempts during training: {attempts}"
    return result


def _assert_finite_eval(ev: EvalResult, n_images: int) -> None:
    for v in (ev.map50, ev.map50_95, ev.precision, ev.recall):
        assert math.isfinite(v) and 0.0 <= v <= 1.0
    assert set(ev.per_class_ap50) == set(CLASSES) == set(ev.per_class_ap50_95)
    assert all(
        math.isfinite(v) for v in [*ev.per_class_ap50.values(), *ev.per_class_ap50_95.values()]
    )
    assert ev.n_images == n_images
    nc = len(CLASSES)
    assert len(ev.confusion_matrix) == nc + 1 and all(len(r) == nc + 1 for r in ev.confusion_matrix)
    # Every true box lands in exactly one column cell of the first nc columns.
    cm = np.array(ev.confusion_matrix)
    assert cm[:, :nc].sum(axis=0).tolist() == [ev.n_instances[c] for c in CLASSES]


def test_train_from_yaml(trained: TrainResult, workdir: Path) -> None:
    assert trained.weights.is_file() and trained.weights.name in {"best.pt", "last.pt"}
    assert trained.run_dir == (workdir / "runs" / "scratch").resolve()
    assert trained.run_dir.is_dir() and trained.weights.is_relative_to(trained.run_dir)
    assert [int(e["epoch"]) for e in trained.epochs] == [1, 2]
    assert all(math.isfinite(v) for v in trained.epochs[-1].values())
    assert "metrics/mAP50(B)" in trained.epochs[-1]
    _assert_finite_eval(trained.val, n_images=4)


def _test_images(data_yaml: Path) -> list[Path]:
    return sorted((data_yaml.parent / "images" / "test").glob("*.png"))


def test_predict_probabilities(trained: TrainResult, data_yaml: Path, yolo_dir: Path) -> None:
    # Reverse-sorted on purpose: output order must follow input order.
    paths = sorted(
        _test_images(data_yaml) + sorted((data_yaml.parent / "images" / "val").glob("*"))
    )
    paths = paths[::-1]
    with deny_network() as attempts:
        stream = predict(
            trained.weights, iter(paths), IMGSZ, 0.001, yolo_dir, len(CLASSES), batch=3
        )
        dets = list(stream)
    assert attempts == []
    assert [d.meta["path"] for d in dets] == [str(p) for p in paths]
    n_boxes = 0
    for d, p in zip(dets, paths, strict=True):
        assert isinstance(d, Detections)
        with Image.open(p) as im:
            assert d.image_wh == im.size
        assert d.confidence is not None and d.class_probs is not None
        assert d.class_probs.shape == (len(d), len(CLASSES))
        rows = np.arange(len(d))
        np.testing.assert_allclose(d.class_probs[rows, d.class_id], d.confidence, atol=1e-4)
        # The box's class is its best-scoring class.
        np.testing.assert_array_equal(d.class_probs.argmax(axis=1), d.class_id)
        w, h = d.image_wh
        assert (
            np.all(d.xyxy >= 0)
            and np.all(d.xyxy[:, [0, 2]] <= w)
            and np.all(d.xyxy[:, [1, 3]] <= h)
        )
        n_boxes += len(d)
    # At conf 0.001 an untrained model still emits boxes, so the gather is really exercised.
    assert n_boxes > 0


def test_predict_min_candidates_keeps_strongest_below_threshold(
    trained: TrainResult, data_yaml: Path, yolo_dir: Path
) -> None:
    paths = _test_images(data_yaml)
    # conf 0.99: an untrained model has nothing that sure, so only the candidate floor speaks.
    plain = list(predict(trained.weights, paths, IMGSZ, 0.99, yolo_dir, len(CLASSES)))
    floored = list(
        predict(trained.weights, paths, IMGSZ, 0.99, yolo_dir, len(CLASSES), min_candidates=3)
    )
    low = list(predict(trained.weights, paths, IMGSZ, 0.0, yolo_dir, len(CLASSES)))
    assert all(len(d) == 0 for d in plain)
    for f, ref in zip(floored, low, strict=True):
        assert len(f) == min(3, len(ref))
        # The kept candidates are the strongest ones, in descending confidence.
        np.testing.assert_allclose(f.confidence, np.sort(ref.confidence)[::-1][: len(f)], atol=1e-6)
        assert f.class_probs is not None and f.class_probs.shape == (len(f), len(CLASSES))
    with pytest.raises(ModelError, match="min_candidates"):
        predict(trained.weights, paths, IMGSZ, 0.5, yolo_dir, len(CLASSES), min_candidates=-1)


def test_predict_errors(
    trained: TrainResult, data_yaml: Path, yolo_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="train a model first"):
        predict(tmp_path / "missing.pt", [], IMGSZ, 0.25, yolo_dir, len(CLASSES))
    with pytest.raises(ModelError, match="classes"):
        predict(trained.weights, [], IMGSZ, 0.25, yolo_dir, num_classes=5)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    stream = predict(trained.weights, [bad], IMGSZ, 0.25, yolo_dir, len(CLASSES))
    with pytest.raises(ImageError, match=r"broken\.png"):
        next(stream)
    assert list(predict(trained.weights, [], IMGSZ, 0.25, yolo_dir, len(CLASSES))) == []


def test_evaluate_test_split(trained: TrainResult, data_yaml: Path, yolo_dir: Path) -> None:
    with deny_network() as attempts:
        ev = evaluate(trained.weights, data_yaml, "test", IMGSZ, yolo_dir, CLASSES)
    assert attempts == []
    _assert_finite_eval(ev, n_images=4)


def test_evaluate_errors(
    trained: TrainResult, data_yaml: Path, yolo_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="export a dataset version"):
        evaluate(trained.weights, tmp_path / "nope.yaml", "test", IMGSZ, yolo_dir, CLASSES)
    with pytest.raises(ModelError, match="no 'holdout' split"):
        evaluate(trained.weights, data_yaml, "holdout", IMGSZ, yolo_dir, CLASSES)
    with pytest.raises(ModelError, match="trained for classes"):
        evaluate(trained.weights, data_yaml, "test", IMGSZ, yolo_dir, ["a", "b"])


def test_fine_tune(trained: TrainResult, workdir: Path, data_yaml: Path, yolo_dir: Path) -> None:
    cfg = CFG.model_copy(update={"epochs": 1})
    t0 = time.perf_counter()
    calls: list[tuple[int, int]] = []
    with deny_network() as attempts:
        tuned = train(
            data_yaml,
            workdir / "runs",
            cfg,
            yolo_dir,
            init_weights=trained.weights,
            name="ft",
            on_epoch=lambda e, n, _m: calls.append((e, n)),
        )
    print(f"\nfine-tune 1 epoch: {time.perf_counter() - t0:.1f}s")
    assert attempts == []
    assert tuned.weights.is_file() and tuned.weights != trained.weights
    assert len(tuned.epochs) == 1
    # Ultralytics' final validation re-fires the epoch callback as epoch n + 1: never "2/1".
    assert calls == [(1, 1)]
    _assert_finite_eval(tuned.val, n_images=4)


def test_train_errors(workdir: Path, data_yaml: Path, yolo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="export a dataset version"):
        train(tmp_path / "missing.yaml", tmp_path, CFG, yolo_dir)
    with pytest.raises(ModelError, match="train a model first"):
        train(data_yaml, tmp_path, CFG, yolo_dir, init_weights=tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="architecture YAML"):
        train(data_yaml, tmp_path, CFG.model_copy(update={"model": "yolov8n.pt"}), yolo_dir)


def test_embed(trained: TrainResult, data_yaml: Path, yolo_dir: Path) -> None:
    paths = _test_images(data_yaml)
    with deny_network() as attempts:
        vecs = embed(trained.weights, paths, IMGSZ, yolo_dir, batch=3)
    assert attempts == []
    assert vecs.shape[0] == len(paths) and vecs.ndim == 2 and vecs.shape[1] > 0
    assert vecs.dtype == np.float32 and np.all(np.isfinite(vecs))
    # Same image twice -> same vector, regardless of batch composition.
    again = embed(trained.weights, [paths[1]], IMGSZ, yolo_dir)
    np.testing.assert_allclose(again[0], vecs[1], rtol=1e-4, atol=1e-5)


def test_predict_matches_stock_ultralytics(
    trained: TrainResult, data_yaml: Path, yolo_dir: Path
) -> None:
    """Our predictor only adds class_probs: boxes, scores and classes equal Ultralytics' own."""
    from ultralytics import YOLO  # configured by the `trained` fixture already

    paths = _test_images(data_yaml)
    ours = list(predict(trained.weights, paths, IMGSZ, 0.001, yolo_dir, len(CLASSES)))
    stock = YOLO(str(trained.weights)).predict(
        [str(p) for p in paths], imgsz=IMGSZ, conf=0.001, iou=0.7, device="cpu", verbose=False
    )
    by_path = {r.path: r for r in stock}  # Ultralytics sorts path lists; ours keep input order
    for d in ours:
        ref = by_path[d.meta["path"]].boxes
        np.testing.assert_allclose(d.xyxy, ref.xyxy.numpy(), atol=1e-3)
        np.testing.assert_allclose(d.confidence, ref.conf.numpy(), atol=1e-5)
        np.testing.assert_array_equal(d.class_id, ref.cls.numpy().astype(np.int64))
