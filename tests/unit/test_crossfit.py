"""`loop.crossfit`: every labeled image is predicted by a model that did not see it.

With fakes for training and prediction: the procedure (`cross_fit`) with a fake "model" that
memorises its training images, and the project binding (`project_cross_fit`) with
`loop.model.train` / `loop.model.predict` replaced, reading what each fold really exported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from loop import model
from loop.config import load_config
from loop.crossfit import (
    FoldCache,
    assign_folds,
    cross_fit,
    crossfit_key,
    fold_version,
    project_cross_fit,
)
from loop.detections import Detections
from loop.errors import DatasetError, LabelQualityError, ModelError
from loop.project import Project
from loop.synth import write_dataset


def _shas(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize(("n", "k"), [(2, 2), (10, 3), (11, 5), (40, 4)])
def test_folds_are_balanced_and_cover_every_image(n: int, k: int) -> None:
    shas = _shas(n)
    folds = assign_folds(shas, k, seed=1)
    assert set(folds) == set(shas)
    sizes = np.bincount(list(folds.values()), minlength=k)
    assert len(sizes) == k and sizes.max() - sizes.min() <= 1 and sizes.min() >= 1


def test_folds_ignore_input_order_and_follow_the_seed() -> None:
    shas = _shas(30)
    assert assign_folds(shas, 3, seed=5) == assign_folds(shas[::-1], 3, seed=5)
    assert assign_folds(shas, 3, seed=5) != assign_folds(shas, 3, seed=6)


@pytest.mark.parametrize(
    ("shas", "k", "match"),
    [
        (_shas(5), 1, "at least 2 folds"),
        (_shas(2), 3, "cannot fill 3 folds"),
        ([*_shas(3), _shas(1)[0]], 2, "listed twice"),
    ],
)
def test_bad_fold_requests(shas: list[str], k: int, match: str) -> None:
    with pytest.raises(LabelQualityError, match=match):
        assign_folds(shas, k)


class MemorisingModels:
    """Fake training: a "model" is the set of images it trained on; fake prediction returns one
    confident box on an image the model memorised and nothing on an image it never saw."""

    def __init__(self) -> None:
        self.trained: dict[Path, frozenset[str]] = {}
        self.calls: list[tuple[Path, list[str]]] = []

    def train(self, fold: int, training: Sequence[str]) -> Path:
        weights = Path(f"fold{fold}.pt")
        self.trained[weights] = frozenset(training)
        return weights

    def predict(self, weights: Path, shas: Sequence[str]) -> Iterable[Detections]:
        self.calls.append((weights, list(shas)))
        seen = self.trained[weights]
        for sha in shas:
            if sha in seen:
                yield Detections(
                    np.array([[1.0, 1, 5, 5]]), np.array([0]), (8, 8), confidence=np.array([0.9])
                )
            else:
                yield Detections.empty((8, 8), num_classes=2)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_image_is_predicted_by_a_model_that_did_not_see_it(k: int) -> None:
    shas = _shas(23)
    fake = MemorisingModels()
    steps: list[str] = []
    out = cross_fit(shas, k, fake.train, fake.predict, seed=2, progress=steps.append)
    assert set(out) == set(shas)
    assert len(fake.trained) == k
    predicted = [s for _, batch in fake.calls for s in batch]
    assert sorted(predicted) == sorted(shas)  # each image exactly once
    for weights, batch in fake.calls:
        training = fake.trained[weights]
        assert not training & set(batch)
        assert training | set(batch) == set(shas)  # the fold model saw all the other images
    for sha, oos in out.items():
        assert oos.sha256 == sha
        assert sha not in fake.trained[Path(f"fold{oos.fold}.pt")]
        assert len(oos.predictions) == 0  # a memorised (in-sample) image would have a box
    assert len(steps) == 2 * k and steps[0].startswith(f"fold 1/{k}")


def test_a_predictor_that_drops_images_is_an_error() -> None:
    fake = MemorisingModels()

    def short(weights: Path, shas: Sequence[str]) -> Iterable[Detections]:
        return list(fake.predict(weights, shas))[:-1]

    with pytest.raises(ModelError, match="one per image"):
        cross_fit(_shas(6), 2, fake.train, short)


# ---------------------------------------------------------------- the cache


class CountingModels:
    """Fake training that counts its calls; fake prediction of seeded random boxes with
    confidences and class probabilities (what a real fold model returns), or a failure on the
    fold named by ``fail_on``."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.trainings: list[int] = []
        self.fail_on = fail_on

    def train(self, fold: int, training: Sequence[str]) -> Path:
        self.trainings.append(fold)
        return Path(f"fold{fold}.pt")

    def predict(self, weights: Path, shas: Sequence[str]) -> Iterable[Detections]:
        if self.fail_on is not None and weights == Path(f"fold{self.fail_on}.pt"):
            raise RuntimeError("the machine went down")
        out = []
        for sha in shas:
            rng = np.random.default_rng(int(sha[:8], 16))
            n = int(rng.integers(0, 4))
            xy = rng.uniform(0, 30, (n, 2))
            probs = rng.dirichlet(np.ones(3), n)
            out.append(
                Detections(
                    np.hstack([xy, xy + rng.uniform(1, 10, (n, 2))]),
                    probs.argmax(axis=1),
                    (40, 32),
                    confidence=probs.max(axis=1),
                    class_probs=probs,
                )
            )
        return out


def _same(a: Detections, b: Detections) -> bool:
    return (
        a.image_wh == b.image_wh
        and np.array_equal(a.xyxy, b.xyxy)
        and np.array_equal(a.class_id, b.class_id)
        and np.array_equal(a.confidence, b.confidence)
        and np.array_equal(a.class_probs, b.class_probs)
    )


def test_a_second_run_reads_the_cache_and_trains_nothing(tmp_path: Path) -> None:
    shas = _shas(17)
    first, second = CountingModels(), CountingModels()
    cache = FoldCache(tmp_path, "k1")
    a = cross_fit(shas, 4, first.train, first.predict, seed=1, cache=cache)
    steps: list[str] = []
    b = cross_fit(shas, 4, second.train, second.predict, seed=1, progress=steps.append, cache=cache)
    assert first.trainings == [0, 1, 2, 3] and second.trainings == []
    assert set(a) == set(b) == set(shas)
    for sha in shas:
        assert a[sha].fold == b[sha].fold and _same(a[sha].predictions, b[sha].predictions)
    assert len(steps) == 4 and all("cached" in m for m in steps)
    # Without the cache (or with another key) every fold trains again.
    third = CountingModels()
    cross_fit(shas, 4, third.train, third.predict, seed=1, cache=FoldCache(tmp_path, "k2"))
    assert third.trainings == [0, 1, 2, 3]


def test_an_interrupted_run_resumes_at_the_first_unfinished_fold(tmp_path: Path) -> None:
    shas = _shas(12)
    cache = FoldCache(tmp_path, "key")
    broken = CountingModels(fail_on=2)
    with pytest.raises(RuntimeError, match="went down"):
        cross_fit(shas, 3, broken.train, broken.predict, cache=cache)
    assert broken.trainings == [0, 1, 2]
    resumed = CountingModels()
    out = cross_fit(shas, 3, resumed.train, resumed.predict, cache=cache)
    assert resumed.trainings == [2] and set(out) == set(shas)


def test_a_fold_cached_for_other_images_is_not_used(tmp_path: Path) -> None:
    cache = FoldCache(tmp_path, "key")
    fake = CountingModels()
    preds = list(fake.predict(Path("x.pt"), _shas(3)))
    cache.save(0, _shas(3), preds)
    assert cache.load(0, _shas(4)[1:]) is None
    loaded = cache.load(0, _shas(3)[::-1])  # any order of the same images: in that order
    assert loaded is not None and _same(loaded[0], preds[2])


_KEY = {
    "version_digest": "a" * 64,
    "k": 5,
    "seed": 0,
    "classes": ["scratch", "pit"],
    "train": {"epochs": 30, "imgsz": 256, "model": "yolov8n.yaml"},
    "start_sha256": "b" * 64,
    "predict": {"candidate_conf": 0.01},
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version_digest", "c" * 64),
        ("k", 4),
        ("seed", 1),
        ("classes", ["scratch", "pit", "crack"]),
        ("train", {"epochs": 31, "imgsz": 256, "model": "yolov8n.yaml"}),
        ("start_sha256", None),
        ("predict", {"candidate_conf": 0.05}),
    ],
)
def test_the_cache_key_changes_with_what_determines_the_predictions(field: str, value: Any) -> None:
    assert crossfit_key(**_KEY) == crossfit_key(**dict(_KEY))
    assert crossfit_key(**{**_KEY, field: value}) != crossfit_key(**_KEY)


# ---------------------------------------------------------------- the project binding


@pytest.fixture
def project(tmp_path: Path) -> Project:
    write_dataset(tmp_path / "d", 30, seed=4, size=48)
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "classes": ["scratch", "pit", "crack", "patch"],
                "split": {"val": 0.3, "test": 0.15},
                "train": {"model": "yolov8n.yaml", "epochs": 1, "imgsz": 64, "seed": 3},
            }
        )
    )
    p = Project(load_config(cfg))
    p.ingest(tmp_path / "d" / "images", tmp_path / "d" / "labels")
    return p


def _exported(data_yaml: Path) -> set[str]:
    """sha256s of the images in an export's train and val folders."""
    root = data_yaml.parent
    return {f.stem for split in ("train", "val") for f in (root / split / "images").iterdir()}


def test_project_cross_fit_holds_each_fold_out_of_its_model(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: dict[str, set[str]] = {}  # run name -> exported train+val images
    predicted: dict[str, list[str]] = {}  # run name -> predicted images

    def fake_train(data_yaml: Path, out_dir: Path, cfg: Any, ycd: Path, **kw: Any) -> Any:
        assert kw["init_weights"] is None  # no train.weights: from the YAML
        trained[kw["name"]] = _exported(data_yaml)
        return type("R", (), {"weights": out_dir / kw["name"] / "best.pt"})()

    def fake_predict(weights: Path, images: Iterable[Path], *a: Any, **kw: Any) -> Any:
        paths = list(images)
        predicted[weights.parent.name] = [p for p in map(str, paths)]
        return [Detections.empty((48, 48), num_classes=4) for _ in paths]

    monkeypatch.setattr(model, "train", fake_train)
    monkeypatch.setattr(model, "predict", fake_predict)
    version, out = project_cross_fit(project, k=3)
    by_sha = version.by_sha()
    labeled = {s for s, r in by_sha.items() if r.split != "test"}
    test = {s for s, r in by_sha.items() if r.split == "test"}
    assert test, "the fixture should have test images that must stay out"
    assert set(out) == labeled
    assert sorted(trained) == [f"crossfit-{version.short}-k3-fold{f}" for f in range(3)]
    path_to_sha = {str(project.pool.abs_path(s)): s for s in by_sha}
    seen_by_prediction: list[str] = []
    for name, paths in predicted.items():
        shas = {path_to_sha[p] for p in paths}
        seen_by_prediction += list(shas)
        assert not shas & trained[name]  # never predicts what it trained or validated on
        assert shas | trained[name] == labeled
        assert not trained[name] & test
    assert sorted(seen_by_prediction) == sorted(labeled)
    for sha, oos in out.items():
        assert sha not in trained[f"crossfit-{version.short}-k3-fold{oos.fold}"]


def test_fold_without_val_images_is_refused(project: Project) -> None:
    version = project.current_version()
    assert version is not None
    only_train = [r.sha256 for r in version.rows if r.split == "train"]
    with pytest.raises(DatasetError, match="fewer folds"):
        fold_version(version, only_train)


def test_cross_fit_without_labels_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["a"]}))
    with pytest.raises(DatasetError, match="no labeled dataset version"):
        project_cross_fit(Project(load_config(cfg)), k=2)


def test_project_cross_fit_is_cached_per_version_and_settings(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[str] = []

    def fake_train(data_yaml: Path, out_dir: Path, cfg: Any, ycd: Path, **kw: Any) -> Any:
        runs.append(kw["name"])
        return type("R", (), {"weights": out_dir / kw["name"] / "best.pt"})()

    def fake_predict(weights: Path, images: Iterable[Path], *a: Any, **kw: Any) -> Any:
        return [Detections.empty((48, 48), num_classes=4) for _ in images]

    monkeypatch.setattr(model, "train", fake_train)
    monkeypatch.setattr(model, "predict", fake_predict)
    _, first = project_cross_fit(project, k=3)
    assert len(runs) == 3
    _, again = project_cross_fit(project, k=3)
    assert len(runs) == 3  # the same version and settings: nothing trains
    assert {s: o.fold for s, o in again.items()} == {s: o.fold for s, o in first.items()}
    assert len(list(project.cfg.paths.crossfit.iterdir())) == 1
    project_cross_fit(project, k=3, use_cache=False)
    assert len(runs) == 6
    project.cfg.train.epochs = 2  # another training recipe: other predictions
    project_cross_fit(project, k=3)
    assert len(runs) == 9
    project_cross_fit(project, k=3, seed=7)  # other folds
    assert len(runs) == 12
