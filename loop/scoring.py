"""The one scoring path: model outputs -> per-image scores -> the batch to label.

Production (`flows/score.py`: `defect-loop score`, `push`, the cycle, locally or on Dask) and the
oracle replay (`loop.replay`) both call these functions, so the label-efficiency benchmark
measures what the loop does:

1. `plan_scoring`: the round's shared inputs: the configured strategy's scorer and selector
   (`loop.selection.resolve_strategy`), the labeled boxes per class, the per-class difficulty of
   the current model (from its validation AP), the seed and round.
2. `score_batch` (any batch, on any worker): per image, the model outputs the strategy reads
   (predictions with class probabilities; test-time-augmented views; the committee's
   predictions; an embedding), its score, its predicted class and the boxes labelers will see.
   A score depends only on the image, the models and the plan, never on the batch it came in.
3. `labeled_set`: embeddings and classes of the labeled images, for the diversity selectors.
4. `rank_candidates`: the batches merged back in candidate order, then the selector picks
   ``select.batch_size`` of the images not yet waiting in Label Studio; the full ranking follows
   (see its docstring).

Models are named by a `ScoringModels`: production builds it from the MLflow registry
(`loop.tracking.Tracker.scoring_models`), the replay from its own rounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from loop.detections import Detections
from loop.errors import DatasetError, DefectLoopError, StrategyError
from loop.selection import (
    CandidateSet,
    LabeledSet,
    SelectParams,
    StrategyPlan,
    image_class,
    labeled_class,
    rank,
    resolve_strategy,
    select,
)
from loop.uncertainty import ScoringInputs, class_difficulty, score_inputs

if TYPE_CHECKING:
    from loop.project import Project, ScoredImage

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ScoringModels:
    """The trained models one round of scoring reads.

    ``weights``: the reference model (the champion): predictions, pre-annotations, embeddings.
    ``committee``: other checkpoints, newest first (the ``committee`` strategy).
    ``val_ap50`` / ``val_instances``: per-class AP50 of ``weights`` on the labeled validation
    images and the number of validation boxes behind each (class difficulty); None when unknown.
    ``name``: how logs and Label Studio name the model (e.g. its registry version).
    """

    weights: Path
    committee: tuple[Path, ...] = ()
    val_ap50: Mapping[str, float] | None = None
    val_instances: Mapping[str, int] | None = None
    name: str = ""


@dataclass(frozen=True)
class ScoringPlan:
    """What every batch of one round shares (picklable: it travels to Dask workers)."""

    models: ScoringModels
    strategy: StrategyPlan
    round: int
    seed: int
    class_counts: tuple[float, ...] | None = None
    class_difficulty: tuple[float, ...] | None = None

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.strategy.needs)


@dataclass(frozen=True, eq=False)
class ImageScore:
    """One candidate image after `score_batch`: its ``score`` (the scorer's; 0 for pure
    ``diversity``), the boxes labelers will see (``shown``, >= ``select.preannotation_conf``), its
    predicted class (-1: no box) and its embedding ``(d,)`` when the strategy reads one."""

    sha256: str
    score: float
    shown: Detections
    image_class: int
    embedding: npt.NDArray[np.float32] | None = None


def plan_scoring(project: Project, models: ScoringModels) -> ScoringPlan:
    """The round's shared inputs for ``project``'s configured strategy (see the module docstring).

    Raises `StrategyError` when the strategy needs something the models cannot give (e.g. class
    difficulty without validation metrics, a committee of one).
    """
    cfg = project.cfg
    sel = cfg.select
    strategy = resolve_strategy(sel.strategy, sel.base_strategy)
    classes = list(cfg.classes)
    counts = None
    if "class_counts" in strategy.needs:
        version = project.current_version()
        labeled = {c: 0 for c in classes}
        if version is not None:
            for row in version.rows:
                if row.split != "test":
                    for c in row.boxes.class_id:
                        labeled[classes[int(c)]] += 1
        counts = tuple(float(labeled[c]) for c in classes)
    difficulty = None
    if "class_difficulty" in strategy.needs:
        if models.val_ap50 is None:
            raise StrategyError(
                f"strategy {sel.strategy!r} weighs classes by the model's validation AP, but "
                f"model {models.name or models.weights} has no per-class validation metrics; "
                "retrain it (training logs them) or choose another strategy"
            )
        ap = [float(models.val_ap50.get(c, 0.0)) for c in classes]
        inst = [float((models.val_instances or {}).get(c, 0)) for c in classes]
        difficulty = tuple(
            float(x) for x in class_difficulty(ap, inst, prior_boxes=sel.difficulty_prior)
        )
    if "committee" in strategy.needs and not models.committee:
        raise StrategyError(
            "the committee strategy needs at least one checkpoint besides the champion; "
            "train another round first or choose another strategy"
        )
    return ScoringPlan(
        models,
        strategy,
        project.state.round,
        sel.seed,
        counts,
        difficulty,
    )


def _image_rng(plan: ScoringPlan, sha: str) -> np.random.Generator:
    # Seeded by the image itself, so a random score never depends on the batch it came in.
    return np.random.default_rng([plan.seed, plan.round, int(sha[:15], 16)])


def score_batch(project: Project, plan: ScoringPlan, shas: Sequence[str]) -> list[ImageScore]:
    """Model outputs, score, predicted class and shown boxes of ``shas``, in input order.

    Predictions always run (labelers see the model's boxes whatever the strategy), through
    ``scoring.backend``; TTA views, committee predictions and embeddings run only when the
    strategy reads them.
    """
    from loop import model

    cfg, sel = project.cfg, project.cfg.select
    shas = list(shas)
    needs = plan.needs
    weights = plan.models.weights
    dets = list(project.predict(weights, shas))
    paths = [project.pool.abs_path(s) for s in shas]
    ycd, imgsz, threads = cfg.paths.yolo_config, cfg.train.imgsz, cfg.train.threads
    views: list[list[Detections]] | None = None
    if "tta" in needs:
        views = list(
            model.predict_tta(
                weights,
                paths,
                imgsz,
                sel.candidate_conf,
                ycd,
                len(cfg.classes),
                augmentations=sel.tta,
                threads=threads,
                min_candidates=sel.min_candidates,
            )
        )
    if "committee" in needs:
        members = [list(project.predict(m, shas)) for m in plan.models.committee]
        views = [[md[i] for md in members] for i in range(len(shas))]
    embeddings = None
    if "embeddings" in needs and shas:
        embeddings = model.embed(weights, paths, imgsz, ycd, threads=threads)
    counts = None if plan.class_counts is None else np.asarray(plan.class_counts)
    difficulty = None if plan.class_difficulty is None else np.asarray(plan.class_difficulty)
    out: list[ImageScore] = []
    for i, (sha, det) in enumerate(zip(shas, dets, strict=True)):
        score = 0.0
        if plan.strategy.scorer is not None:
            inputs = ScoringInputs(
                [det],
                views=None if views is None else [views[i]],
                labeled_class_counts=counts,
                class_difficulty=difficulty,
            )
            score = float(
                score_inputs(
                    plan.strategy.scorer,
                    inputs,
                    reduction=sel.reduction,
                    rng=_image_rng(plan, sha),
                    empty_score=sel.empty_score,
                    k=sel.topk,
                )[0]
            )
        out.append(
            ImageScore(
                sha,
                score,
                det.with_min_confidence(sel.preannotation_conf),
                image_class(det),
                None if embeddings is None else embeddings[i],
            )
        )
    return out


def labeled_set(project: Project, plan: ScoringPlan) -> LabeledSet:
    """Embeddings (when the strategy reads them) and classes (`labeled_class`) of the current
    version's labeled train and val images."""
    from loop import model

    if "embeddings" not in plan.needs:
        return LabeledSet()
    version = project.current_version()
    rows = [] if version is None else [r for r in version.rows if r.split != "test"]
    cfg = project.cfg
    emb = model.embed(
        plan.models.weights,
        [cfg.paths.images / r.path for r in rows],
        cfg.train.imgsz,
        cfg.paths.yolo_config,
        threads=cfg.train.threads,
    )
    classes = np.array([labeled_class(r.boxes) for r in rows], dtype=np.int64)
    return LabeledSet(np.asarray(emb, dtype=np.float64) if rows else None, classes)


def merge_scores(shas: Sequence[str], parts: Iterable[list[ImageScore]]) -> list[ImageScore]:
    """The `score_batch` results of every batch put back in ``shas`` order; raises
    `DatasetError` for a missing, doubled or unknown image."""
    from loop.scheduling import merge_in_order

    try:
        rows = merge_in_order(shas, ([(r.sha256, r) for r in part] for part in parts))
    except DefectLoopError as exc:
        raise DatasetError(str(exc)) from exc
    return [r[1] for r in rows]


def rank_candidates(
    project: Project,
    plan: ScoringPlan,
    scored: Sequence[ImageScore],
    labeled: LabeledSet | None = None,
) -> list[ScoredImage]:
    """Every scored candidate, most valuable first, with a priority >= 0.

    ``top`` (a scorer's own ranking): all candidates by score, the score as priority, so images
    already waiting in Label Studio get their new place among the others. Set selectors: the
    ``select.batch_size`` images the selector picks among those not yet waiting (the waiting ones
    and the labeled set are the centres diversity keeps away from), with rank-based priorities
    ``1 .. 1/k``; then every other candidate by score, below ``1/k``. Ties are broken by one
    generator seeded by ``(select.seed, round)``, so the ranking is the same however the batches
    were cut, run or returned.
    """
    from loop.project import ScoredImage

    sel = project.cfg.select
    rng = np.random.default_rng([plan.seed, plan.round])
    shown = {r.sha256: r.shown for r in scored}
    ids = [r.sha256 for r in scored]
    scores = np.array([r.score for r in scored], dtype=np.float64)
    if plan.strategy.selector == "top":
        if scores.size and scores.min() < 0:
            scores = scores - scores.min()  # priorities must be >= 0; the ranking is unchanged
        return [ScoredImage(s, v, shown[s]) for s, v in rank(ids, scores, rng)]
    pending = project.state.pending
    fresh = [i for i, s in enumerate(ids) if s not in pending]
    waiting = [i for i, s in enumerate(ids) if s in pending]
    labeled = labeled or LabeledSet()
    has_emb = any(r.embedding is not None for r in scored)
    emb = np.stack([np.asarray(r.embedding, np.float64) for r in scored]) if has_emb else None
    cls = np.array([r.image_class for r in scored], dtype=np.int64)
    if emb is not None and waiting:
        # Images waiting in Label Studio will be labeled: count them as labeled for diversity.
        lab_emb = (
            emb[waiting]
            if labeled.embeddings is None
            else np.vstack([labeled.embeddings, emb[waiting]])
        )
        lab_cls = (
            cls[waiting]
            if labeled.image_class is None
            else np.concatenate([labeled.image_class, cls[waiting]])
        )
        labeled = LabeledSet(lab_emb, lab_cls)
    cands = CandidateSet(
        [ids[i] for i in fresh],
        scores[fresh],
        None if emb is None else emb[fresh],
        cls[fresh],
    )
    params = SelectParams(
        reduction=sel.reduction,
        empty_score=sel.empty_score,
        topk=sel.topk,
        base_strategy=sel.base_strategy,
        top_m=sel.hybrid_top_m,
        hybrid_factor=sel.hybrid_factor,
        class_weights=None
        if plan.class_difficulty is None
        else np.asarray(plan.class_difficulty, dtype=np.float64),
    )
    picks = select(plan.strategy, cands, sel.batch_size, rng, params, labeled)
    chosen = {s for s, _ in picks}
    rest = [i for i, s in enumerate(ids) if s not in chosen]
    floor = 1.0 / max(len(picks), 1)
    others = rank([ids[i] for i in rest], scores[rest], rng)
    out = [ScoredImage(s, p, shown[s]) for s, p in picks]
    n = len(others)
    out += [ScoredImage(s, floor * (n - j) / (n + 1), shown[s]) for j, (s, _) in enumerate(others)]
    return out
