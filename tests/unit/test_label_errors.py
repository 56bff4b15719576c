"""`loop.label_errors`: cleanlab ranks deliberately corrupted labels above clean ones.

The labels are the seeded synthetic generator's ground truth (`loop.synth`); the "model" is a
simulated out-of-sample detector that finds the TRUE boxes (small seeded jitter, high
confidence) plus a few faint false positives. Three images get one corruption each: a box
removed, a class swapped, a box shifted. Known answer: those three are the top three suspects,
each with the matching issue type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from loop.datasets import DatasetVersion, LabeledImage
from loop.detections import Detections, box_iou
from loop.errors import ConversionError, LabelQualityError, UnknownLabelError
from loop.label_errors import (
    LabelCheck,
    LabelSuspect,
    disagreeing_boxes,
    find_label_errors,
    label_checks,
    suspects_to_json,
)
from loop.synth import SYNTH_CLASSES, generate

C = len(SYNTH_CLASSES)


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _model_predictions(truth: Detections, rng: np.random.Generator) -> Detections:
    """A good detector's view of ``truth``: every true box, jittered by <= 1 px, confidence
    0.96..0.995, plus 0..2 faint (conf < 0.2) false positives."""
    n = len(truth)
    boxes = truth.xyxy + rng.uniform(-1.0, 1.0, (n, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
    conf = rng.uniform(0.96, 0.995, n)
    ids = truth.class_id.copy()
    k = int(rng.integers(0, 3))
    w, h = truth.image_wh
    xy = rng.uniform(0, [w - 20, h - 20], (k, 2))
    faint = np.concatenate([xy, xy + rng.uniform(5, 20, (k, 2))], axis=1)
    return Detections(
        np.concatenate([boxes, faint]),
        np.concatenate([ids, rng.integers(0, C, k)]),
        truth.image_wh,
        confidence=np.concatenate([conf, rng.uniform(0.01, 0.2, k)]),
    )


def _isolated(d: Detections) -> np.ndarray:
    """Indices of boxes that touch no other box (cleanlab only calls a confident prediction
    overlooked where it overlaps no labeled box)."""
    iou = box_iou(d.xyxy, d.xyxy)
    np.fill_diagonal(iou, 0.0)
    return np.flatnonzero(iou.max(axis=1, initial=0.0) == 0.0)


def _remove_box(d: Detections) -> Detections:
    """Drop the first box that touches no other box."""
    drop = int(_isolated(d)[0])
    return d[np.arange(len(d)) != drop]


def _swap_class(d: Detections) -> Detections:
    ids = d.class_id.copy()
    ids[0] = (ids[0] + 1) % C
    return replace(d, class_id=ids)


def _shift_box(d: Detections) -> Detections:
    """Move the largest box right by 45 % of its width (it still overlaps its true place)."""
    i = int(np.argmax(d.area))
    xyxy = d.xyxy.copy()
    dx = 0.45 * (xyxy[i, 2] - xyxy[i, 0])
    xyxy[i, [0, 2]] += dx
    return replace(d, xyxy=xyxy)


# issue type -> (corruption, which images it applies to)
CORRUPTIONS: dict[str, tuple[Callable[[Detections], Detections], Callable[[Detections], bool]]] = {
    "overlooked": (_remove_box, lambda d: len(_isolated(d)) > 0),
    "swap": (_swap_class, lambda d: len(d) > 0),
    "badloc": (_shift_box, lambda d: len(d) > 0 and float(d.area.max()) >= 100),
}


@pytest.fixture(scope="module")
def dataset() -> tuple[list[LabelCheck], dict[str, str]]:
    """40 synthetic images (seed 3); three corrupted. Returns the checks and sha -> issue."""
    rng = np.random.default_rng(0)
    samples = list(generate(40, seed=3, size=128))
    corrupted: dict[int, str] = {}
    for issue, (_, applies) in CORRUPTIONS.items():
        corrupted[
            next(i for i, s in enumerate(samples) if i not in corrupted and applies(s.labels))
        ] = issue
    checks: list[LabelCheck] = []
    truth_of: dict[str, str] = {}
    for i, s in enumerate(samples):
        sha = _sha(s.name)
        labels = s.labels
        if i in corrupted:
            labels = CORRUPTIONS[corrupted[i]][0](labels)
            truth_of[sha] = corrupted[i]
        checks.append(LabelCheck(sha, labels, _model_predictions(s.labels, rng)))
    return checks, truth_of


def test_corrupted_images_rank_above_clean(dataset) -> None:
    checks, truth_of = dataset
    suspects = find_label_errors(checks, C)
    assert [s.rank for s in suspects] == list(range(1, len(checks) + 1))
    assert {s.sha256 for s in suspects} == {c.sha256 for c in checks}
    top = suspects[: len(truth_of)]
    assert {s.sha256 for s in top} == set(truth_of)
    worst_clean = min(s.quality for s in suspects if s.sha256 not in truth_of)
    assert max(s.quality for s in top) < worst_clean
    for s in top:
        assert s.issue == truth_of[s.sha256], s
    # cleanlab's own issue filter flags no clean image, and the missing box and the swapped class
    # (its threshold for a 45 % shift depends on the class's AP; ranking does not use it).
    flagged = {s.sha256 for s in suspects if s.flagged}
    assert flagged <= set(truth_of)
    assert {truth_of[sha] for sha in flagged} >= {"overlooked", "swap"}
    # Sorted by quality, lowest first.
    qualities = [s.quality for s in suspects]
    assert qualities == sorted(qualities)
    assert all(0.0 <= q <= 1.0 for q in qualities)


def test_in_sample_predictions_hide_the_errors(dataset) -> None:
    """Predictions that copy the (noisy) labels, as a model that trained on them would, find
    nothing: why the predictions must be out-of-sample."""
    checks, truth_of = dataset
    rng = np.random.default_rng(1)
    in_sample = [replace(c, predictions=_model_predictions(c.labels, rng)) for c in checks]
    suspects = find_label_errors(in_sample, C)
    top = {s.sha256 for s in suspects[: len(truth_of)]}
    assert not top & set(truth_of)


def test_keyed_by_sha_not_position(dataset) -> None:
    checks, _ = dataset
    forward = {s.sha256: s for s in find_label_errors(checks, C)}
    backward = {s.sha256: s for s in find_label_errors(checks[::-1], C)}
    assert forward.keys() == backward.keys()
    for sha, s in forward.items():
        assert s.quality == pytest.approx(backward[sha].quality)
        assert s.rank == backward[sha].rank


def test_empty_input_gives_no_suspects() -> None:
    assert find_label_errors([], C) == []


def _one(sha: str, labels: Detections, preds: Detections) -> LabelCheck:
    return LabelCheck(sha, labels, preds)


def test_images_without_boxes_are_scored() -> None:
    empty_gt = Detections.empty((64, 64))
    no_preds = Detections.empty((64, 64), num_classes=C)
    sure = Detections(
        np.array([[5.0, 5, 30, 30]]), np.array([1]), (64, 64), confidence=np.array([0.99])
    )
    suspects = find_label_errors(
        [_one("a" * 64, empty_gt, no_preds), _one("b" * 64, empty_gt, sure)], C
    )
    # A confident box with no label is a missing label; an empty image with no box is clean.
    assert [s.sha256 for s in suspects] == ["b" * 64, "a" * 64]
    assert suspects[0].issue == "overlooked"
    assert suspects[1].quality == pytest.approx(1.0)


def test_duplicate_sha_is_refused(dataset) -> None:
    checks, _ = dataset
    with pytest.raises(LabelQualityError, match="listed twice"):
        find_label_errors([checks[0], checks[0]], C)


def test_size_mismatch_is_refused(dataset) -> None:
    checks, _ = dataset
    bad = replace(checks[0], predictions=Detections.empty((10, 10), num_classes=C))
    with pytest.raises(LabelQualityError, match="predict on the labeled image"):
        find_label_errors([bad], C)


def test_ground_truth_as_predictions_is_refused(dataset) -> None:
    checks, _ = dataset
    c = checks[0]
    with pytest.raises(ConversionError, match="confidences"):
        find_label_errors([replace(c, predictions=c.labels)], C)


def test_unknown_class_is_refused() -> None:
    gt = Detections(np.array([[0.0, 0, 9, 9]]), np.array([3]), (64, 64))
    preds = Detections.empty((64, 64), num_classes=3)
    with pytest.raises(UnknownLabelError, match="3 classes"):
        find_label_errors([_one("a" * 64, gt, preds)], 3)


def test_issue_names_the_lowest_subtype() -> None:
    s = LabelSuspect("x", 1, 0.2, overlooked=0.9, swap=0.1, badloc=0.5, flagged=True)
    assert s.issue == "swap"


def _version() -> DatasetVersion:
    gt = Detections(np.array([[1.0, 1, 9, 9]]), np.array([0]), (32, 32))
    rows = [
        LabeledImage(sha, f"{split}.png", 32, 32, split, gt)
        for sha, split in (("a" * 64, "train"), ("b" * 64, "val"), ("c" * 64, "test"))
    ]
    return DatasetVersion.create(list(SYNTH_CLASSES), rows)


def _pred() -> Detections:
    return Detections(np.array([[1.0, 1, 9, 9]]), np.array([0]), (32, 32), confidence=[0.9])


def test_label_checks_pair_train_and_val_labels_with_predictions() -> None:
    version = _version()
    checks = label_checks(version, {"a" * 64: _pred(), "b" * 64: _pred()})
    assert [c.sha256 for c in checks] == ["a" * 64, "b" * 64]  # the test image stays out
    assert checks[0].labels.same_boxes(version.by_sha()["a" * 64].boxes)
    assert checks[1].predictions.confidence is not None


@pytest.mark.parametrize(
    ("shas", "match"),
    [(["a" * 64], "have no out-of-sample prediction"), (["a", "b", "c"], "not train or val")],
)
def test_label_checks_refuse_missing_or_stale_predictions(shas: list[str], match: str) -> None:
    shas = [s * 64 if len(s) == 1 else s for s in shas]
    with pytest.raises(LabelQualityError, match=match):
        label_checks(_version(), dict.fromkeys(shas, _pred()))


def test_suspects_to_json_adds_path_split_and_issue() -> None:
    version = _version()
    suspects = find_label_errors(label_checks(version, {"a" * 64: _pred(), "b" * 64: _pred()}), C)
    rows = suspects_to_json(suspects, version)
    assert [r["rank"] for r in rows] == [1, 2]
    by = {r["sha256"]: r for r in rows}
    assert by["a" * 64]["path"] == "train.png" and by["a" * 64]["split"] == "train"
    assert by["b" * 64]["split"] == "val"
    assert set(rows[0]) >= {"quality", "overlooked", "swap", "badloc", "flagged", "issue"}
    with pytest.raises(LabelQualityError, match="not an image of version"):
        suspects_to_json([replace(suspects[0], sha256="d" * 64)], version)


# --- what a reviewer is shown beside the label ---------------------------------------------
_LABELS = Detections(np.array([[0.0, 0, 10, 10], [20, 20, 40, 40]]), [0, 1], (64, 64))


@pytest.mark.parametrize(
    ("xyxy", "cls", "conf", "shown"),
    [
        ([[0.0, 0, 10, 10], [20, 20, 40, 40]], [0, 1], [0.9, 0.9], []),  # agrees
        ([[0.0, 0, 10, 10], [50, 50, 60, 60]], [0, 2], [0.9, 0.9], [1]),  # a box the label lacks
        ([[0.0, 0, 10, 10], [50, 50, 60, 60]], [0, 2], [0.9, 0.2], []),  # too faint to show
        ([[0.0, 0, 10, 10], [20, 20, 40, 40]], [0, 2], [0.9, 0.8], [1]),  # another class: swap
        ([[0.0, 0, 10, 10], [30, 20, 50, 40]], [0, 1], [0.9, 0.8], [1]),  # IoU 1/3: misplaced
        ([[0.0, 0, 10, 10], [22, 20, 42, 40]], [0, 1], [0.9, 0.8], []),  # IoU 0.82: confirmed
    ],
    ids=["agrees", "missing", "faint", "swap", "badloc", "close"],
)
def test_disagreeing_boxes(xyxy, cls, conf, shown) -> None:
    pred = Detections(np.array(xyxy), cls, (64, 64), confidence=conf)
    got = disagreeing_boxes(_LABELS, pred, min_confidence=0.25)
    assert got.same_boxes(pred[np.array(shown, dtype=int)])
    assert got.confidence is not None and list(got.confidence) == [conf[i] for i in shown]


def test_disagreeing_boxes_of_a_defect_free_label_are_all_confident_boxes() -> None:
    pred = Detections(np.array([[1.0, 1, 5, 5], [8, 8, 20, 20]]), [0, 1], (64, 64),
                      confidence=[0.9, 0.1])  # fmt: skip
    got = disagreeing_boxes(Detections.empty((64, 64)), pred, min_confidence=0.25)
    assert got.same_boxes(pred[[0]])
