"""The one scoring path (`loop.scoring`) with the model replaced by seeded fakes: rankings that do
not depend on batching for every strategy, the shown boxes, waiting images, and named errors.

The real models run the same functions in tests/integration/test_strategies.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loop.config import ProjectConfig
from loop.datasets import DatasetVersion, LabeledImage
from loop.detections import Detections
from loop.errors import DatasetError, StrategyError
from loop.scheduling import batches
from loop.scoring import (
    ScoringModels,
    labeled_set,
    merge_scores,
    plan_scoring,
    rank_candidates,
    score_batch,
)
from loop.selection import available_strategies, rank
from loop.uncertainty import MASK_STRATEGIES

CLASSES = ["scratch", "pit"]
MODELS = ScoringModels(
    weights=Path("w.pt"),
    committee=(Path("old.pt"),),
    val_ap50={"scratch": 0.8, "pit": 0.1},
    val_instances={"scratch": 20, "pit": 20},
    name="v1",
)


def _det(seed: int, n: int) -> Detections:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 40, size=(n, 2))
    probs = rng.uniform(0, 1, size=(n, len(CLASSES)))
    cls = probs.argmax(axis=1)
    # Outlines (each box's own rectangle) let the mask strategies score these fakes too.
    corners = [np.array([[x, y], [x + 5, y], [x + 5, y + 5], [x, y + 5]]) for x, y in xy]
    return Detections(
        np.hstack([xy, xy + 5]),
        cls,
        (64, 64),
        confidence=probs[np.arange(n), cls],
        class_probs=probs,
        polygons=tuple((c,) for c in corners),
    )


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``make(strategy, **select)`` -> a Project whose models are seeded fakes, and the shas."""
    from loop import model
    from loop.project import Project

    shas = [f"{i:02x}" * 32 for i in range(40)]
    # Images with no box all score the empty score: ties on purpose.
    dets = {s: _det(i, i % 4) for i, s in enumerate(shas)}
    other = {s: _det(100 + i, i % 3) for i, s in enumerate(shas)}
    vec = {s: np.random.default_rng(i).random(8).astype(np.float32) for i, s in enumerate(shas)}

    def fake_predict(self: Any, weights: Path, which: list[str]) -> Any:
        source = other if Path(weights).name == "old.pt" else dets
        return iter([source[s] for s in which])

    def fake_embed(weights: Path, paths: list[Path], *a: Any, **k: Any) -> np.ndarray:
        rows = [vec.get(Path(p).name, np.ones(8, np.float32)) for p in paths]
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def fake_tta(weights: Path, paths: list[Path], *a: Any, **k: Any) -> Any:
        return iter([[other[Path(p).name]] for p in paths])

    monkeypatch.setattr(Project, "predict", fake_predict)
    monkeypatch.setattr(model, "embed", fake_embed)
    monkeypatch.setattr(model, "predict_tta", fake_tta)

    def make(strategy: str, **select: Any) -> Any:
        cfg = ProjectConfig(
            classes=CLASSES,
            workspace=tmp_path / "ws",
            # The mask strategies read outlines, which only segment projects have.
            task="segment" if strategy in MASK_STRATEGIES else "detect",
            select={
                "strategy": strategy,
                "preannotation_conf": 0.5,
                "seed": 3,
                "batch_size": 6,
                **select,
            },
        )
        project = Project(cfg)
        project.state.round = 2
        # The pool's abs_path names the fake embeddings by sha.
        monkeypatch.setattr(project.pool, "abs_path", lambda s: Path(s))
        return project

    return make, shas


def _ranked(project: Any, shas: list[str], size: int, reverse: bool = False) -> list[Any]:
    plan = plan_scoring(project, MODELS)
    parts = [score_batch(project, plan, b) for b in batches(shas, size)]
    if reverse:
        parts.reverse()  # any arrival order
    labeled = labeled_set(project, plan) if "embeddings" in plan.needs else None
    return rank_candidates(project, plan, merge_scores(shas, parts), labeled)


@pytest.mark.parametrize("strategy", available_strategies())
def test_every_strategy_ranks_the_same_whatever_the_batches(fake: Any, strategy: str):
    make, shas = fake
    project = make(strategy)
    whole = _ranked(project, shas, len(shas))
    assert sorted(s.sha256 for s in whole) == sorted(shas)  # every candidate, once
    for size in (1, 7, 16):
        again = _ranked(project, shas, size, reverse=True)
        assert [(s.sha256, s.score) for s in again] == [(s.sha256, s.score) for s in whole]
        assert all(a.detections.same_boxes(b.detections) for a, b in zip(again, whole, strict=True))
    priorities = [s.score for s in whole]
    assert all(p >= 0 for p in priorities)
    assert priorities == sorted(priorities, reverse=True)
    # Boxes shown to labelers are those above preannotation_conf.
    for s in whole:
        assert s.detections.confidence is not None
        assert (s.detections.confidence >= 0.5).all()


def test_a_scorer_ranks_everything_by_score_with_one_seeded_tiebreak(fake: Any):
    make, shas = fake
    project = make("entropy")
    plan = plan_scoring(project, MODELS)
    scored = score_batch(project, plan, shas)
    whole = rank_candidates(project, plan, scored)
    expected = rank(shas, [r.score for r in scored], np.random.default_rng([3, 2]))
    assert [s for s, _ in expected] == [s.sha256 for s in whole]


def test_set_selectors_pick_among_images_not_yet_waiting(fake: Any):
    make, shas = fake
    project = make("class_diversity")
    waiting = set(shas[:10])
    project.state.pending = {s: i for i, s in enumerate(shas[:10])}
    ranked = _ranked(project, shas, 16)
    picks = ranked[:6]
    assert not waiting & {s.sha256 for s in picks}
    assert [s.score for s in picks] == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert all(s.score < 1 / 6 for s in ranked[6:])
    # The waiting images still get a place (and a refreshed priority) in the ranking.
    assert waiting <= {s.sha256 for s in ranked[6:]}


def test_class_quota_gives_the_hard_class_more_seats(fake: Any):
    make, shas = fake
    project = make("class_quota", batch_size=8)
    plan = plan_scoring(project, MODELS)
    # pit has val AP 0.1 on 20 boxes, scratch 0.8: difficulty ~0.55 vs ~0.2 after shrinkage.
    assert plan.class_difficulty is not None
    assert plan.class_difficulty[1] > 2 * plan.class_difficulty[0]
    scored = {r.sha256: r for r in score_batch(project, plan, shas)}
    picks = [s.sha256 for s in rank_candidates(project, plan, list(scored.values()))[:8]]
    by_class = [scored[s].image_class for s in picks]
    assert by_class.count(1) > by_class.count(0)


def test_random_scores_depend_on_the_image_not_the_batch(fake: Any):
    make, shas = fake
    project = make("random")
    plan = plan_scoring(project, MODELS)
    alone = {r.sha256: r.score for s in shas for r in score_batch(project, plan, [s])}
    together = {r.sha256: r.score for r in score_batch(project, plan, shas)}
    assert alone == together and len(set(alone.values())) == len(shas)


def test_plan_refuses_what_the_models_cannot_give(fake: Any):
    make, _ = fake
    bare = ScoringModels(weights=Path("w.pt"))
    with pytest.raises(StrategyError, match="validation AP"):
        plan_scoring(make("calibrated_entropy"), bare)
    with pytest.raises(StrategyError, match="committee"):
        plan_scoring(make("committee"), bare)
    # The strategies that need neither plan fine on bare models.
    assert plan_scoring(make("entropy"), bare).class_difficulty is None


def test_plan_counts_the_labeled_boxes_per_class_outside_the_test_split(fake: Any):
    make, shas = fake
    project = make("class_balance")
    boxes = Detections(np.tile([1.0, 1, 5, 5], (3, 1)), np.array([0, 1, 1]), (64, 64))
    rows = [
        LabeledImage(shas[0], "a.png", 64, 64, "train", boxes, {}),
        LabeledImage(shas[1], "b.png", 64, 64, "test", boxes, {}),
    ]
    project.set_version(DatasetVersion.create(CLASSES, rows))
    assert plan_scoring(project, MODELS).class_counts == (1.0, 2.0)


def test_merge_refuses_a_lost_batch(fake: Any):
    make, shas = fake
    project = make("entropy")
    plan = plan_scoring(project, MODELS)
    parts = [score_batch(project, plan, b) for b in batches(shas, 16)]
    with pytest.raises(DatasetError, match="missing"):
        merge_scores(shas, parts[:-1])
    with pytest.raises(DatasetError, match="twice"):
        merge_scores(shas, [*parts, parts[0]])
