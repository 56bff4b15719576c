"""Oracle replay: run the active-learning loop on a fully labeled dataset, ground truth labeling.

For each (strategy, seed) a fresh temporary workspace runs the REAL loop's code: `Project.ingest`
fills the pool, `Project.fit` exports the dataset version, trains (`loop.model.train`, from the
configured start: ``train.init``) and evaluates on the test split (`loop.model.evaluate`);
`loop.scoring` scores and selects exactly as the production ``score`` flow does (same plan,
batches, labeled set and selector); `Project.push` / `Project.pull` through an `OracleGateway`
(ground truth plays Label Studio and the labeler) make the next dataset version, with the
correction analytics of what the labeler would have changed in the pre-annotations.

Protocol of one curve:

- test split: every image whose hash puts it in ``test`` (`assign_split`), labeled from the start,
  never selected, the same for every strategy and seed; its labels are not counted.
- round 0: a seeded random ``initial`` images of the rest (at least one train and one val image),
  then train and evaluate.
- rounds 1..R: score the unlabeled non-test images with the newest model, label the best ``step``
  (an image lands in train or val by its hash, as in the real loop), train, evaluate.

"labeled" counts the labeled train + val images; ``effort`` the pre-annotation outcomes of the
images a round added, ``actions_total`` a labeler's cumulative correction actions (the seed set
drawn from scratch). The newest model always scores the next round (and is the warm start with
``train.init: champion``): the replay measures labels vs accuracy; the real loop's promotion gate
could keep an older champion and would confound the curve. The round-0 model depends only on
the seed and the settings, so it is trained once per seed and shared by every strategy (cached in
the work folder). `replay_ceiling` trains once on every non-test label with the same recipe.
Results are written after every finished curve; a rerun with the same settings skips the curves
already done (add strategies or seeds freely). Savings: `loop.savings`.

Segment replays (``task: segment``, a mask-PNG dataset prepared by the product's mask import,
`loop.replay_dataset.prepare_mask_dataset`): the project is a ``segment`` project, the oracle
answers with the ground-truth polygon instances (defect-free images with none), so dataset versions
hold polygons and every round trains the segmentation model; rounds record mask and box metrics,
and the savings are computed on test mask mAP50 (``ReplaySettings.metric``). ``defect_free``
counts the labeled (train + val) images without any instance.

MLflow (optional): each round is a training run (`Tracker.log_training`: params, metrics, dataset
version, weights) tagged with the strategy and seed, plus one ``replay`` run per curve with
``test_map50``/``test_map50_95``/``labeled`` per round (step = round). No model is registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loop.config import (
    MlflowConfig,
    ProjectConfig,
    SelectConfig,
    SplitConfig,
    TaskType,
    TrainConfig,
)
from loop.datasets import DatasetVersion, LabeledImage, Split, assign_split
from loop.detections import Detections
from loop.errors import ConfigError, DatasetError
from loop.images import atomic_write_text
from loop.project import FitResult, Project, ScoredImage
from loop.replay_dataset import (
    PreparedDataset,
    initial_set,
    prepare_dataset,
    prepare_mask_dataset,
)
from loop.report.plots import plot_curves
from loop.savings import summarize
from loop.scheduling import batches
from loop.scoring import (
    ScoringModels,
    labeled_set,
    merge_scores,
    plan_scoring,
    rank_candidates,
    score_batch,
)
from loop.selection import strategy_needs
from loop.simulate import (
    OracleGateway,
    boxes_and_polygons,
    truth_from_json,
    truth_from_yolo_dir,
)
from loop.tracking import TAG, Champion, Tracker
from loop.workspace import Workspace

Log = Callable[[str], None]
RESULT_KIND = "defect-loop-replay"
REPLAY_EXPERIMENT = "defect-loop-replay"


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class ReplaySettings:
    """One replay experiment. ``train``/``select``/``split`` are the project config sections the
    simulated project uses (``train.init``: ``pretrained`` starts every round from
    ``train.weights`` or the YAML, ``champion`` fine-tunes the previous round's model for
    ``train.finetune_epochs``; ``train.seed`` and ``select.seed``/``strategy``/``batch_size`` are
    set per curve). ``max_images``: use a seeded
    random subset of the dataset (smoke runs). ``ceiling``: also train once on every non-test
    label with the same recipe (`replay_ceiling`).

    ``task``: ``detect`` (boxes) or ``segment`` (a segment project: polygon labels, the
    segmentation model, savings on mask mAP50). ``mask_classes``: the dataset is a mask-PNG folder
    (`prepare_mask_dataset`), its top folders mapped to classes (``(("MT_Crack", "crack"),
    ...)``, classes in first-seen order); a ``segment`` replay needs one. ``mask_threshold`` and
    ``mask_min_area``: the mask import's options."""

    dataset: Path
    strategies: tuple[str, ...] = ("random", "entropy", "hybrid")
    seeds: tuple[int, ...] = (0, 1, 2)
    initial: int = 100
    step: int = 100
    rounds: int = 5
    train: TrainConfig = field(default_factory=TrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_images: int | None = None
    log_mlflow: bool = False
    mlflow_uri: str | None = None
    keep_work: bool = False
    ceiling: bool = False
    task: TaskType = "detect"
    mask_classes: tuple[tuple[str, str], ...] = ()
    mask_threshold: float = 128
    mask_min_area: int = 4

    @property
    def metric(self) -> str:
        """The round metric the savings and the plot use."""
        return "test_mask_map50" if self.task == "segment" else "test_map50"

    def check(self) -> None:
        """Raise `ConfigError`/`StrategyError` for settings that cannot run."""
        if not self.strategies:
            raise ConfigError("give at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"strategies repeat: {list(self.strategies)}")
        for name in self.strategies:
            # Unknown names raise StrategyError with the valid ones.
            strategy_needs(name, self.select.base_strategy)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"give one or more distinct seeds, got {list(self.seeds)}")
        if any(s < 0 for s in self.seeds):
            raise ConfigError("seeds must be >= 0")
        if self.initial < 2:
            raise ConfigError(f"initial must be >= 2 (a train and a val image), got {self.initial}")
        if self.step < 1 or self.rounds < 0:
            raise ConfigError(f"need step >= 1 and rounds >= 0, got {self.step}, {self.rounds}")
        if self.max_images is not None and self.max_images < self.initial:
            raise ConfigError(f"max_images ({self.max_images}) is below initial ({self.initial})")
        if self.split.test <= 0:
            raise ConfigError("split.test must be > 0: the replay evaluates on the test split")
        if self.task not in ("detect", "segment"):
            raise ConfigError(f"task must be detect or segment, got {self.task!r}")
        if self.task == "segment" and not self.mask_classes:
            raise ConfigError(
                "a segment replay needs a mask dataset: give its folder -> class map "
                "(mask_classes, e.g. MT_Crack=crack)"
            )
        if self.task != "segment":
            from loop.uncertainty import MASK_STRATEGIES

            masked = [n for n in self.strategies if n in MASK_STRATEGIES]
            if masked or self.select.base_strategy in MASK_STRATEGIES:
                raise ConfigError(
                    f"{masked or self.select.base_strategy} read instance masks: run a segment "
                    "replay (task segment) or choose box strategies"
                )

    def fingerprint(self) -> dict[str, Any]:
        """What finished curves depend on (everything but the strategy/seed lists and logging)."""
        train = self.train.model_dump(mode="json", exclude={"seed"})
        select = self.select.model_dump(
            mode="json", exclude={"strategy", "seed", "batch_size", "preannotation_conf"}
        )
        out: dict[str, Any] = {
            "dataset": str(Path(self.dataset).resolve()),
            "max_images": self.max_images,
            "initial": self.initial,
            "step": self.step,
            "rounds": self.rounds,
            "train": train,
            "select": select,
            "split": self.split.model_dump(mode="json"),
        }
        # Only where set, so that detect replays of box datasets keep their fingerprints.
        if self.task != "detect":
            out["task"] = self.task
        if self.mask_classes:
            out["mask_import"] = {
                "folder_classes": [list(p) for p in self.mask_classes],
                "threshold": self.mask_threshold,
                "min_area": self.mask_min_area,
            }
        return out


# ------------------------------------------------------------------------------------------
# one curve
# ------------------------------------------------------------------------------------------


@dataclass
class _Newest:
    """Stands in for `Tracker` in `Project.fit`: the champion is the newest model of the replay."""

    latest: Champion | None = None

    def champion(self) -> Champion | None:
        return self.latest


def _eval_dict(ev: Any) -> dict[str, Any] | None:
    return None if ev is None else asdict(ev)


def _round0_key(version: DatasetVersion, train: TrainConfig) -> str:
    start = train.start_checkpoint()
    text = json.dumps(
        {
            "digest": version.digest,
            "train": train.model_dump(mode="json"),
            "start_sha256": None if start is None else start.sha256,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load_round0(cache: Path, version: DatasetVersion) -> FitResult | None:
    from loop.model import EvalResult, TrainResult

    info_path = cache / "result.json"
    if not info_path.is_file() or not (cache / "best.pt").is_file():
        return None
    info = json.loads(info_path.read_text())
    result = TrainResult(
        weights=(cache / "best.pt").resolve(),
        run_dir=cache.resolve(),
        epochs=info["epochs"],
        val=EvalResult(**info["val"]),
        seconds=float(info["seconds"]),
    )
    test = None if info["test"] is None else EvalResult(**info["test"])
    return FitResult(version, result, test, None, 1)


def _save_round0(cache: Path, fit: FitResult) -> None:
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = Path(fit.result.weights)
    shutil.copyfile(weights, tmp / "best.pt")
    if (weights.parent / "last.pt").is_file():
        shutil.copyfile(weights.parent / "last.pt", tmp / "last.pt")
    info = {
        "epochs": fit.result.epochs,
        "val": asdict(fit.result.val),
        "test": _eval_dict(fit.test),
        "seconds": fit.result.seconds,
    }
    (tmp / "result.json").write_text(json.dumps(info))
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)


def _labeled_stats(version: DatasetVersion) -> dict[str, Any]:
    """Labeled (train + val) images, per split, their boxes per class, ``defect_free`` images
    (no instance) and ``polygon_instances`` (instances stored with an outline)."""
    counts = version.split_counts()
    per_class = dict.fromkeys(version.classes, 0)
    defect_free = outlined = 0
    for r in version.rows:
        if r.split != "test":
            defect_free += len(r.boxes) == 0
            outlined += sum(1 for rings in r.polygons if rings)
            for c in r.boxes.class_id:
                per_class[version.classes[int(c)]] += 1
    return {
        "labeled": counts["train"] + counts["val"],
        "n_train": counts["train"],
        "n_val": counts["val"],
        "n_test": counts["test"],
        "labeled_boxes": per_class,
        "defect_free": defect_free,
        "polygon_instances": outlined,
    }


def _scoring_models(fits: list[FitResult], committee_size: int) -> ScoringModels:
    """The newest round's model as production's `Tracker.scoring_models` names the champion: its
    weights, its validation metrics and a committee of the previous rounds' models, newest first
    (after one round: its last-epoch weights)."""
    newest = fits[-1]
    weights = Path(newest.result.weights)
    committee = [Path(f.result.weights) for f in reversed(fits[:-1])][: committee_size - 1]
    last = weights.with_name("last.pt")
    if not committee and last.is_file() and last.resolve() != weights.resolve():
        committee = [last]
    val = newest.result.val
    return ScoringModels(
        weights=weights,
        committee=tuple(committee),
        val_ap50=dict(val.per_class_ap50),
        val_instances=dict(val.n_instances),
        name=f"replay-round{newest.round_index - 1}",
    )


def _select(
    project: Project, candidates: list[str], models: ScoringModels
) -> tuple[list[ScoredImage], dict[str, Any]]:
    """Rank ``candidates`` exactly as the production `score` flow does (`loop.scoring`: plan,
    score in batches of ``scoring.batch_size``, labeled set, selector); returns the ranking and
    what the round used."""
    plan = plan_scoring(project, models)
    parts = [
        score_batch(project, plan, part)
        for part in batches(candidates, project.cfg.scoring.batch_size)
    ]
    scored = merge_scores(candidates, parts)
    labeled = labeled_set(project, plan) if "embeddings" in plan.needs else None
    ranked = rank_candidates(project, plan, scored, labeled)
    classes = project.cfg.classes
    predicted = {r.sha256: r.image_class for r in scored}
    chosen = ranked[: project.cfg.select.batch_size]
    mix = dict.fromkeys(classes, 0)
    for s in chosen:
        c = predicted[s.sha256]
        if c >= 0:
            mix[classes[c]] += 1
    info: dict[str, Any] = {
        "scorer": plan.strategy.scorer,
        "selector": plan.strategy.selector,
        "selected_predicted_class": mix,
    }
    if plan.class_difficulty is not None:
        info["class_difficulty"] = dict(zip(classes, plan.class_difficulty, strict=True))
    if "committee" in plan.needs:
        info["committee_members"] = len(models.committee) + 1
    return ranked, info


def _round_effort(project: Project, version: DatasetVersion) -> dict[str, int]:
    """What a labeler would have done with the pre-annotations of the images this version
    added (the version's correction analytics, `loop.corrections`): counts of accepted,
    adjusted, relabeled, removed and added boxes, ``actions`` (all but accepted) and
    ``gt_boxes`` (the boxes of the final labels: the work of drawing them all from scratch)."""
    from loop.corrections import OUTCOMES, read_corrections

    path = project.cfg.paths.corrections(version.digest)
    if not path.is_file():
        raise DatasetError(f"the replay's pull wrote no correction analytics for {version.short}")
    report = read_corrections(path)
    totals = dict.fromkeys(OUTCOMES, 0)
    for counts in report["per_class"].values():
        for k in OUTCOMES:
            totals[k] += int(counts.get(k, 0))
    totals["actions"] = sum(totals[k] for k in OUTCOMES if k != "accepted")
    totals["gt_boxes"] = sum(len(img["final"]) for img in report["images"])
    return totals


def _seeded_project(
    ds: PreparedDataset,
    name: str,
    seed: int,
    settings: ReplaySettings,
    work: Path,
    strategy: str | None = None,
) -> tuple[Project, dict[str, Detections], list[str], list[str]]:
    """A fresh workspace holding the whole dataset in its pool: the project, the ground truth,
    the test images (labeled from the start) and every other image, sorted by sha256."""
    if work.exists():
        shutil.rmtree(work)  # an interrupted curve restarts from scratch
    cfg = ProjectConfig(
        name=name,
        classes=ds.classes,
        task=settings.task,
        workspace=work.resolve(),
        train=settings.train.model_copy(update={"seed": seed}),
        split=settings.split,
        select=settings.select.model_copy(
            update={
                "batch_size": settings.step,
                "seed": seed,
                "strategy": strategy or settings.select.strategy,
            }
        ),
        mlflow=MlflowConfig(tracking_uri=settings.mlflow_uri, experiment=REPLAY_EXPERIMENT),
    )
    project = Project(cfg)
    project.ingest(ds.images_dir)
    truth = _truth(project, ds, settings.task)
    test = sorted(s for s in truth if assign_split(s, cfg.split) == "test")
    if not test:
        raise DatasetError("no image fell into the test split; use more images or a larger split")
    rest = sorted(s for s in truth if assign_split(s, cfg.split) != "test")
    return project, truth, test, rest


def _truth(project: Project, ds: PreparedDataset, task: str) -> dict[str, Detections]:
    """Ground truth of the pool's images: sha256 -> pixel boxes, with their polygon rings in a
    segment replay (a detect replay of a mask dataset keeps the boxes only)."""
    if ds.truth_file is None:
        return truth_from_yolo_dir(project.pool, ds.labels_dir, len(ds.classes))
    stored = truth_from_json(ds.truth_file.read_text())
    truth = {e.sha256: stored[e.sha256] for e in project.pool if e.sha256 in stored}
    if task != "segment":
        truth = {sha: boxes_and_polygons(det)[0] for sha, det in truth.items()}
    return truth


def _label(project: Project, truth: dict[str, Detections], shas: list[str]) -> None:
    """The ground truth of ``shas`` as the project's dataset version, as `defect-loop ingest
    --labels` would make it (Project has no public setter)."""
    rows = []
    for sha in shas:
        e = project.pool.get(sha)
        split = assign_split(sha, project.cfg.split)
        boxes, polygons = boxes_and_polygons(truth[sha])
        rows.append(
            LabeledImage(
                sha, e.path, e.width, e.height, split, boxes, {"source": "oracle"}, polygons
            )
        )
    project.set_version(DatasetVersion.create(project.cfg.classes, rows))


def _eval_record(fit: FitResult) -> dict[str, Any]:
    test_ev = fit.test
    return {
        "test_map50": None if test_ev is None else test_ev.map50,
        "test_map50_95": None if test_ev is None else test_ev.map50_95,
        "test_per_class_ap50": None if test_ev is None else test_ev.per_class_ap50,
        "test_per_class_ap50_95": None if test_ev is None else test_ev.per_class_ap50_95,
        "val_map50": fit.result.val.map50,
        # Segment projects: the mask figures the gate judges by (None for detectors).
        "test_mask_map50": None if test_ev is None else test_ev.mask_map50,
        "test_mask_map50_95": None if test_ev is None else test_ev.mask_map50_95,
        "test_mask_per_class_ap50": None if test_ev is None else test_ev.mask_per_class_ap50,
        "train_seconds": round(float(fit.result.seconds), 3),
        "epochs": len(fit.result.epochs),
        "init": fit.init,
    }


def replay_curve(
    ds: PreparedDataset,
    strategy: str,
    seed: int,
    settings: ReplaySettings,
    work: Path,
    round0_cache: Path | None = None,
    tracker: Tracker | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """One learning curve (see the module docstring); returns its JSON-ready record.

    ``work``: this curve's temporary workspace (replaced). ``round0_cache``: folder holding
    shared round-0 models (None: always train). ``tracker``: a `loop.tracking.Tracker` to log to,
    or None.
    """
    started = time.monotonic()
    project, truth, test, rest = _seeded_project(
        ds, f"replay-{strategy}-s{seed}", seed, settings, work, strategy
    )
    cfg = project.cfg

    def split_of(sha: str) -> Split:
        return assign_split(sha, cfg.split)

    seed_set = initial_set(rest, split_of, settings.initial, seed)
    _label(project, truth, test + seed_set)
    seed_boxes = sum(len(truth[s]) for s in seed_set)

    gateway = OracleGateway(truth)
    newest = _Newest()
    fits: list[FitResult] = []
    rounds: list[dict[str, Any]] = []
    actions_total = gt_total = seed_boxes  # the seed set is drawn from scratch
    for r in range(settings.rounds + 1):
        t0 = time.monotonic()
        info: dict[str, Any] = {}
        effort: dict[str, int] | None = None
        select_s = 0.0
        if r > 0:
            candidates = [s for s in project.candidates() if s in truth]
            if not candidates:
                log(f"{strategy}/s{seed}: pool exhausted after round {r - 1}")
                break
            ts = time.monotonic()
            models = _scoring_models(fits, cfg.select.committee_size)
            ranked, info = _select(project, candidates, models)
            select_s = time.monotonic() - ts
            project.push(gateway, ranked, model_version=models.name)
            project.pull(gateway)
        version = project.current_version()
        if version is None:  # pragma: no cover - set above
            raise DatasetError("the replay lost its dataset version")
        if r > 0:
            effort = _round_effort(project, version)
            actions_total += effort["actions"]
            gt_total += effort["gt_boxes"]
        fit: FitResult | None = None
        cached = False
        cache_dir = None
        if r == 0 and round0_cache is not None:
            cache_dir = round0_cache / _round0_key(version, cfg.train)
            fit = _load_round0(cache_dir, version)
            cached = fit is not None
        if fit is None:
            fit = project.fit(newest)
            if cache_dir is not None:
                _save_round0(cache_dir, fit)
        newest.latest = _champion(r, fit)
        fits.append(fit)
        project.state.round = r + 1
        project.save_state()
        stats = _labeled_stats(version)
        rec = {
            "round": r,
            **stats,
            **_eval_record(fit),
            "effort": effort,
            "actions_total": actions_total,
            "gt_boxes_total": gt_total,
            "select_seconds": round(select_s, 3),
            "wall_seconds": round(time.monotonic() - t0, 3),
            "round0_cached": cached,
            "dataset_digest": version.digest,
            **info,
        }
        rounds.append(rec)
        log(
            f"{strategy}/s{seed} round {r}: {stats['labeled']} labeled, test mAP50 "
            f"{rec['test_map50'] if rec['test_map50'] is None else round(rec['test_map50'], 4)}"
            + (
                f", mask mAP50 {_fmt(rec['test_mask_map50'])}, {stats['defect_free']} defect-free"
                if settings.task == "segment"
                else ""
            )
            + f" ({rec['wall_seconds']:.0f}s{', cached' if cached else ''})"
        )
        if tracker is not None:
            _log_round(tracker, project, fit, strategy, seed, r)
    curve = {
        "strategy": strategy,
        "seed": seed,
        "n_test": len(test),
        "rounds": rounds,
        "wall_seconds": round(time.monotonic() - started, 3),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if tracker is not None:
        tracker.log_replay_curve(curve)
    if not settings.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return curve


def replay_ceiling(
    ds: PreparedDataset, settings: ReplaySettings, work: Path, seed: int = 0, log: Log = _quiet
) -> dict[str, Any]:
    """The full-pool ceiling: one training on EVERY non-test label with the curves' recipe
    (``settings.train``, seed ``seed``), evaluated on the same test split."""
    started = time.monotonic()
    project, truth, test, rest = _seeded_project(ds, "replay-ceiling", seed, settings, work)
    _label(project, truth, test + rest)
    version = project.current_version()
    if version is None:  # pragma: no cover - set above
        raise DatasetError("the replay lost its dataset version")
    fit = project.fit(_Newest())
    rec = {
        "seed": seed,
        "n_test": len(test),
        **_labeled_stats(version),
        **_eval_record(fit),
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    log(f"ceiling: {rec['labeled']} labeled, test mAP50 {rec['test_map50']}")
    if not settings.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return rec


def _fmt(value: float | None) -> str:
    return "None" if value is None else str(round(value, 4))


def _champion(round_index: int, fit: FitResult) -> Champion:
    test = None if fit.test is None else fit.test.map50_95
    return Champion(str(round_index), "", Path(fit.result.weights), test)


def _log_round(
    tracker: Tracker, project: Project, fit: FitResult, strategy: str, seed: int, r: int
) -> None:
    params = {
        **{f"train.{k}": v for k, v in project.cfg.train.model_dump().items()},
        "replay.strategy": strategy,
        "replay.seed": seed,
        "replay.round": r,
        "init_weights": fit.init,
        "init_weights_sha256": fit.init_sha256 or "",
    }
    run_id = tracker.log_training(
        version=fit.version,
        store=project.store,
        result=fit.result,
        test=fit.test,
        params=params,
        round_index=r,
    )
    tracker.log_tags(run_id, {TAG + "replay": f"{strategy}/s{seed}"})


def _open_tracker(settings: ReplaySettings, out_dir: Path, classes: list[str]) -> Tracker:
    """A `Tracker` on the replay's MLflow store, with the experiment's artifacts in ``out_dir``."""
    uri = settings.mlflow_uri or f"sqlite:///{Workspace(out_dir).mlflow_db.resolve()}"
    cfg = ProjectConfig(
        classes=classes,
        workspace=out_dir.resolve(),
        mlflow=MlflowConfig(tracking_uri=uri, experiment=REPLAY_EXPERIMENT),
    )
    tracker = Tracker(cfg)
    # Created here so artifacts live beside the results, not in a deleted curve workspace.
    location = None if uri.startswith(("http://", "https://")) else cfg.mlflow_artifact_location
    tracker.ensure_experiment(REPLAY_EXPERIMENT, location)
    return tracker


# ------------------------------------------------------------------------------------------
# many curves, resumable
# ------------------------------------------------------------------------------------------


def run_replay(
    settings: ReplaySettings,
    out_json: Path,
    work_dir: Path | None = None,
    png: Path | None = None,
    resume: bool = True,
    log: Log = _quiet,
    on_save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every (seed, strategy) curve not yet in ``out_json``; return the results document.

    Seeds are the outer loop, so a partial run holds complete seeds to compare. ``out_json`` is
    rewritten (atomically) after every finished curve with the curves, the label savings
    (`label_savings`, when ``random`` is among the curves) and the settings; ``png`` (optional)
    is redrawn with it. ``resume``: keep the curves of an existing ``out_json`` made with the same
    settings (`ReplaySettings.fingerprint`); different settings raise `ConfigError`.
    ``work_dir``: temporary workspaces and the round-0 cache (default: beside ``out_json``).
    ``on_save(doc)``: called after every save (e.g. to write a benchmark's own result file).
    """
    settings.check()
    out_json = Path(out_json)
    out_dir = out_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir is not None else out_dir / f"{out_json.stem}-work"
    fingerprint = settings.fingerprint()
    doc: dict[str, Any] = {"kind": RESULT_KIND, "settings": fingerprint, "curves": []}
    if out_json.is_file():
        old = json.loads(out_json.read_text())
        if resume and old.get("kind") == RESULT_KIND:
            if old.get("settings") != fingerprint:
                raise ConfigError(
                    f"{out_json} holds curves made with other settings; pass another output "
                    "file, delete it, or run without resume (--fresh)"
                )
            doc["curves"] = list(old.get("curves", []))
            if old.get("ceiling") is not None:
                doc["ceiling"] = old["ceiling"]
    ds = (
        prepare_mask_dataset(
            settings.dataset,
            work / "dataset",
            dict(settings.mask_classes),
            settings.max_images,
            settings.mask_threshold,
            settings.mask_min_area,
        )
        if settings.mask_classes
        else prepare_dataset(settings.dataset, work / "dataset", settings.max_images)
    )
    from loop.model import prepare_ultralytics

    # Bind Ultralytics' settings folder to one that outlives the per-curve workspaces.
    prepare_ultralytics(work / "ultralytics", settings.train.threads)
    doc.update({"dataset": str(ds.source), "classes": ds.classes, "n_images": ds.n_images})
    if ds.n_defect_free is not None:
        doc["n_defect_free"] = ds.n_defect_free
    if settings.task != "detect":
        doc["task"] = settings.task
        doc["metric"] = settings.metric
    done = {(c["strategy"], int(c["seed"])) for c in doc["curves"]}
    tracker = _open_tracker(settings, out_dir, ds.classes) if settings.log_mlflow else None

    def save() -> None:
        doc["strategies"] = sorted({c["strategy"] for c in doc["curves"]})
        doc["seeds"] = sorted({int(c["seed"]) for c in doc["curves"]})
        doc["summary"] = summarize(doc["curves"], doc.get("ceiling"), metric=settings.metric)
        doc["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_text(out_json, json.dumps(doc, indent=1))
        if png is not None and doc["curves"]:
            plot_curves(
                doc["curves"],
                png,
                metric=settings.metric,
                title=f"oracle replay: {ds.source.name}",
                ceiling=doc.get("ceiling"),
            )
        if on_save is not None:
            on_save(doc)

    if not doc["curves"]:
        save()
    if settings.ceiling and doc.get("ceiling") is None:
        doc["ceiling"] = replay_ceiling(
            ds, settings, work / "ceiling", seed=settings.seeds[0], log=log
        )
        save()
    for seed in settings.seeds:
        for strategy in settings.strategies:
            if (strategy, seed) in done:
                log(f"{strategy}/s{seed}: already done, skipped")
                continue
            curve = replay_curve(
                ds,
                strategy,
                seed,
                settings,
                work / f"{strategy}-s{seed}",
                round0_cache=work / "round0",
                tracker=tracker,
                log=log,
            )
            doc["curves"].append(curve)
            done.add((strategy, seed))
            save()
    save()
    return doc
