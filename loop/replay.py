"""Oracle replay: run the active-learning loop on a fully labeled dataset, ground truth labeling.

For each (strategy, seed) a fresh temporary workspace runs the REAL loop's code: `Project.ingest`
fills the pool, `Project.fit` exports the dataset version, trains (`loop.model.train`, warm start
from the previous round or from scratch) and evaluates on the test split (`loop.model.evaluate`),
`Project.candidates` + `Project.predict` + `loop.selection.select_batch` (the same
`score_images` / `rank` the loop's scoring uses) choose the batch, `Project.push` /
`Project.pull` through an `OracleGateway` (ground truth plays Label Studio and the labeler) make
the next dataset version.

Protocol of one curve:

- test split: every image whose hash puts it in ``test`` (`assign_split`), labeled from the start,
  never selected, the same for every strategy and seed; its labels are not counted.
- round 0: a seeded random ``initial`` images of the rest (at least one train and one val image),
  then train and evaluate.
- rounds 1..R: score the unlabeled non-test images with the newest model, label the best ``step``
  (an image lands in train or val by its hash, as in the real loop), train, evaluate.

"labeled" counts the labeled train + val images. The newest model always scores the next round
and is the warm start (the replay measures labels vs accuracy; the real loop's promotion gate
could keep an older champion and would confound the curve). The round-0 model depends only on
the seed and the settings, so it is trained once per seed and shared by every strategy (cached in
the work folder). Results are written after every finished curve; a rerun with the same settings
skips the curves already done (add strategies or seeds freely).

MLflow (optional): each round is a training run (`Tracker.log_training`: params, metrics, dataset
version, weights) tagged with the strategy and seed, plus one ``replay`` run per curve with
``test_map50``/``test_map50_95``/``labeled`` per round (step = round). No model is registered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loop.config import MlflowConfig, ProjectConfig, SelectConfig, SplitConfig, TrainConfig
from loop.datasets import DatasetVersion, LabeledImage, Split, assign_split
from loop.detections import Detections
from loop.errors import ConfigError, DatasetError, StrategyError
from loop.images import IMAGE_SUFFIXES, atomic_write_text
from loop.project import FitResult, Project, ScoredImage
from loop.selection import SelectParams, select_batch, strategy_needs
from loop.simulate import OracleGateway, truth_from_yolo_dir
from loop.uncertainty import ScoringInputs

Log = Callable[[str], None]
RESULT_KIND = "defect-loop-replay"
REPLAY_EXPERIMENT = "defect-loop-replay"
_INIT_STREAM = 7919  # second seed word of the initial-set draw (independent of selection's rng)


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class ReplaySettings:
    """One replay experiment. ``train``/``select``/``split`` are the project config sections the
    simulated project uses (``train.warm_start``: fine-tune from the previous round, else from
    scratch each round; ``train.finetune_epochs`` applies to warm starts; ``train.seed`` and
    ``select.seed``/``strategy``/``batch_size`` are set per curve). ``max_images``: use a seeded
    random subset of the dataset (smoke runs)."""

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

    def check(self) -> None:
        """Raise `ConfigError`/`StrategyError` for settings that cannot run."""
        if not self.strategies:
            raise ConfigError("give at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"strategies repeat: {list(self.strategies)}")
        for name in self.strategies:
            strategy_needs(name)  # unknown names raise StrategyError with the valid ones
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

    def fingerprint(self) -> dict[str, Any]:
        """What finished curves depend on (everything but the strategy/seed lists and logging)."""
        train = self.train.model_dump(mode="json", exclude={"seed"})
        select = self.select.model_dump(
            mode="json", exclude={"strategy", "seed", "batch_size", "preannotation_conf"}
        )
        return {
            "dataset": str(Path(self.dataset).resolve()),
            "max_images": self.max_images,
            "initial": self.initial,
            "step": self.step,
            "rounds": self.rounds,
            "train": train,
            "select": select,
            "split": self.split.model_dump(mode="json"),
        }


# ------------------------------------------------------------------------------------------
# dataset
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDataset:
    """A labeled dataset as a YOLO folder: ``images_dir`` (symlinks to the originals),
    ``labels_dir`` (one ``.txt`` per image, same stem) and the class list (id order)."""

    source: Path
    kind: str
    images_dir: Path
    labels_dir: Path
    classes: list[str]
    n_images: int


def _subset(stems: list[str], max_images: int | None, seed: int = 0) -> list[str]:
    if max_images is None or max_images >= len(stems):
        return stems
    rng = np.random.default_rng(seed)
    return sorted(stems[i] for i in rng.choice(len(stems), size=max_images, replace=False))


def prepare_dataset(source: Path, dest: Path, max_images: int | None = None) -> PreparedDataset:
    """Turn a YOLO folder (``images/``, ``labels/``, ``classes.txt``) or a Pascal VOC folder
    (``annotations/`` + ``images/``, see `loop.formats.voc`) into a YOLO folder under ``dest``.

    Only images with labels are kept (the oracle must be able to answer for every image).
    Reuses ``dest`` when it was prepared from the same source and subset.
    """
    from loop.formats.voc import ANNOTATION_DIRS, read_voc_folder, write_yolo_folder

    source = Path(source).resolve()
    if not source.is_dir():
        raise DatasetError(f"dataset {source} is not a folder; pass a YOLO or Pascal VOC folder")
    marker = dest / "prepared.json"
    key = {"source": str(source), "max_images": max_images}
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            return PreparedDataset(
                source,
                info["kind"],
                dest / "images",
                dest / "labels",
                list(info["classes"]),
                int(info["n_images"]),
            )
    if dest.exists():
        shutil.rmtree(dest)
    if any((source / d).is_dir() for d in ANNOTATION_DIRS):
        folder = read_voc_folder(source)
        if not folder.items:
            raise DatasetError(f"{source} holds no annotation that matches an image")
        keep = set(_subset(sorted(it.image.stem for it in folder.items), max_images))
        sub = dataclasses.replace(
            folder, items=[it for it in folder.items if it.image.stem in keep]
        )
        write_yolo_folder(sub, dest, folder.classes)
        kind, classes, n = "voc", list(folder.classes), len(sub.items)
    else:
        images, labels = source / "images", source / "labels"
        classes_txt = source / "classes.txt"
        if not images.is_dir() or not labels.is_dir() or not classes_txt.is_file():
            raise DatasetError(
                f"{source} is neither a Pascal VOC folder (annotations/ + images/) nor a YOLO "
                "folder (images/, labels/ and classes.txt)"
            )
        classes = [ln.strip() for ln in classes_txt.read_text().splitlines() if ln.strip()]
        files = {
            p.stem: p
            for p in sorted(images.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and (labels / f"{p.stem}.txt").is_file()
        }
        if not files:
            raise DatasetError(f"{source}/images has no image with a label file in labels/")
        (dest / "images").mkdir(parents=True)
        (dest / "labels").mkdir(parents=True)
        stems = _subset(sorted(files), max_images)
        for stem in stems:
            os.symlink(files[stem].resolve(), dest / "images" / files[stem].name)
            shutil.copyfile(labels / f"{stem}.txt", dest / "labels" / f"{stem}.txt")
        (dest / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
        kind, n = "yolo", len(stems)
    info = {"key": key, "kind": kind, "classes": classes, "n_images": n}
    atomic_write_text(marker, json.dumps(info, indent=1))
    return PreparedDataset(source, kind, dest / "images", dest / "labels", classes, n)


def initial_set(
    shas: Sequence[str], split_of: Callable[[str], Split], n: int, seed: int
) -> list[str]:
    """A seeded random ``n`` of ``shas`` (sorted first, so the input order does not matter) with
    at least one ``train`` and one ``val`` image: the last draws are swapped for the first train
    / val image of the same permutation when the draw lacks one."""
    pool = sorted(shas)
    if n > len(pool):
        raise DatasetError(f"initial set of {n} images asked from {len(pool)} non-test images")
    order = [pool[i] for i in np.random.default_rng([seed, _INIT_STREAM]).permutation(len(pool))]
    chosen = order[:n]
    for need, other in (("val", "train"), ("train", "val")):
        if any(split_of(s) == need for s in chosen):
            continue
        extra = next((s for s in order[n:] if split_of(s) == need), None)
        if extra is None:
            raise DatasetError(
                f"the dataset has no '{need}' image outside the test split; use more images"
            )
        n_other = sum(split_of(s) == other for s in chosen)
        # Replace the last draw that the other requirement can spare (n >= 2: one always exists).
        for i in range(len(chosen) - 1, -1, -1):
            if split_of(chosen[i]) != other or n_other > 1:
                chosen[i] = extra
                break
    return chosen


# ------------------------------------------------------------------------------------------
# one curve
# ------------------------------------------------------------------------------------------


@dataclass
class _Newest:
    """Stands in for `Tracker` in `Project.fit`: the champion is the newest model of the replay."""

    latest: Any = None

    def champion(self) -> Any:
        return self.latest


def _eval_dict(ev: Any) -> dict[str, Any] | None:
    return None if ev is None else asdict(ev)


def _round0_key(version: DatasetVersion, train: TrainConfig) -> str:
    text = json.dumps(
        {"digest": version.digest, "train": train.model_dump(mode="json")}, sort_keys=True
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
    counts = version.split_counts()
    per_class = dict.fromkeys(version.classes, 0)
    for r in version.rows:
        if r.split != "test":
            for c in r.boxes.class_id:
                per_class[version.classes[int(c)]] += 1
    return {
        "labeled": counts["train"] + counts["val"],
        "n_train": counts["train"],
        "n_val": counts["val"],
        "n_test": counts["test"],
        "labeled_boxes": per_class,
    }


def _select(
    project: Project,
    strategy: str,
    candidates: list[str],
    checkpoints: list[Path],
    step: int,
) -> tuple[list[ScoredImage], dict[str, Any]]:
    """The ``step`` candidates the strategy picks with the newest checkpoint, best first.

    Model outputs come from the real loop's `Project.predict` (and `loop.model` for views and
    embeddings); the choice from `loop.selection.select_batch`, which ranks with the same
    `score_images` / `rank` as `Project.score` for single-model strategies.
    """
    from loop import model

    cfg = project.cfg
    sel = cfg.select
    needs = strategy_needs(strategy)
    weights = checkpoints[-1]
    info: dict[str, Any] = {}
    entries = [project.pool.get(s) for s in candidates]

    def detections() -> list[Detections]:
        if "predictions" in needs:
            return list(project.predict(weights, candidates))
        # Strategies that read no model output (random) still get one (empty) entry per image.
        return [Detections.empty((e.width, e.height), len(cfg.classes)) for e in entries]

    dets = detections()
    paths = [project.pool.abs_path(s) for s in candidates]
    threads, imgsz, ycd = cfg.train.threads, cfg.train.imgsz, cfg.yolo_config_dir
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
        members = list(reversed(checkpoints[-sel.committee_size : -1]))
        if not members:
            # Only one round trained so far: its last-epoch weights are the other member.
            last = weights.parent / "last.pt"
            if not last.is_file():
                raise StrategyError("committee needs two checkpoints; none besides best.pt exists")
            members = [last]
            info["note"] = "committee of best.pt and last.pt of the only trained round"
        info["committee_members"] = len(members) + 1
        member_dets = [list(project.predict(m, candidates)) for m in members]
        views = [[md[i] for md in member_dets] for i in range(len(candidates))]
    embeddings = labeled_emb = None
    if "embeddings" in needs:
        embeddings = model.embed(weights, paths, imgsz, ycd, threads=threads)
        version = project.current_version()
        labeled = [] if version is None else [r for r in version.rows if r.split != "test"]
        labeled_paths = [cfg.images_dir / r.path for r in labeled]
        labeled_emb = model.embed(weights, labeled_paths, imgsz, ycd, threads=threads)
    counts = None
    if "class_counts" in needs:
        version = project.current_version()
        stats = _labeled_stats(version) if version is not None else {"labeled_boxes": {}}
        counts = np.array([stats["labeled_boxes"].get(c, 0) for c in cfg.classes], float)
    inputs = ScoringInputs(dets, views, embeddings, counts)
    params = SelectParams(
        reduction=sel.reduction,
        empty_score=sel.empty_score,
        topk=sel.topk,
        hybrid_base=sel.hybrid_base,
        top_m=sel.hybrid_top_m,
        hybrid_factor=sel.hybrid_factor,
    )
    # Seeded like Project.score: by the selection seed and the round.
    rng = np.random.default_rng([sel.seed, project.state.round])
    picks = select_batch(strategy, candidates, inputs, step, rng, params, labeled_emb)
    shown = dict(zip(candidates, dets, strict=True))
    ranked = [
        ScoredImage(s, v, shown[s].with_min_confidence(sel.preannotation_conf)) for s, v in picks
    ]
    return ranked, info


def replay_curve(
    ds: PreparedDataset,
    strategy: str,
    seed: int,
    settings: ReplaySettings,
    work: Path,
    round0_cache: Path | None = None,
    tracker: Any = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """One learning curve (see the module docstring); returns its JSON-ready record.

    ``work``: this curve's temporary workspace (replaced). ``round0_cache``: folder holding
    shared round-0 models (None: always train). ``tracker``: a `loop.tracking.Tracker` to log to,
    or None.
    """
    started = time.monotonic()
    if work.exists():
        shutil.rmtree(work)  # an interrupted curve restarts from scratch
    cfg = ProjectConfig(
        name=f"replay-{strategy}-s{seed}",
        classes=ds.classes,
        workspace=work.resolve(),
        train=settings.train.model_copy(update={"seed": seed}),
        split=settings.split,
        select=settings.select.model_copy(
            update={"strategy": strategy, "batch_size": settings.step, "seed": seed}
        ),
        mlflow=MlflowConfig(tracking_uri=settings.mlflow_uri, experiment=REPLAY_EXPERIMENT),
    )
    project = Project(cfg)
    project.ingest(ds.images_dir)
    truth = truth_from_yolo_dir(project.pool, ds.labels_dir, len(ds.classes))

    def split_of(sha: str) -> Split:
        return assign_split(sha, cfg.split)

    test = sorted(s for s in truth if split_of(s) == "test")
    if not test:
        raise DatasetError("no image fell into the test split; use more images or a larger split")
    rest = sorted(s for s in truth if split_of(s) != "test")
    seed_set = initial_set(rest, split_of, settings.initial, seed)
    rows = []
    for sha in test + seed_set:
        e = project.pool.get(sha)
        rows.append(
            LabeledImage(
                sha, e.path, e.width, e.height, split_of(sha), truth[sha], {"source": "oracle-seed"}
            )
        )
    # The seed set, as `defect-loop ingest --labels` would make it (Project has no public setter).
    project._set_version(DatasetVersion.create(cfg.classes, rows))

    gateway = OracleGateway(truth)
    newest = _Newest()
    checkpoints: list[Path] = []
    rounds: list[dict[str, Any]] = []
    for r in range(settings.rounds + 1):
        t0 = time.monotonic()
        info: dict[str, Any] = {}
        select_s = 0.0
        if r > 0:
            candidates = [s for s in project.candidates() if s in truth]
            if not candidates:
                log(f"{strategy}/s{seed}: pool exhausted after round {r - 1}")
                break
            ts = time.monotonic()
            ranked, info = _select(project, strategy, candidates, checkpoints, settings.step)
            select_s = time.monotonic() - ts
            project.push(gateway, ranked, model_version=f"replay-round{r - 1}")
            project.pull(gateway)
        version = project.current_version()
        if version is None:  # pragma: no cover - set above
            raise DatasetError("the replay lost its dataset version")
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
        checkpoints.append(Path(fit.result.weights))
        project.state.round = r + 1
        project.save_state()
        stats = _labeled_stats(version)
        test_ev = fit.test
        rec = {
            "round": r,
            **stats,
            "test_map50": None if test_ev is None else test_ev.map50,
            "test_map50_95": None if test_ev is None else test_ev.map50_95,
            "test_per_class_ap50": None if test_ev is None else test_ev.per_class_ap50,
            "test_per_class_ap50_95": None if test_ev is None else test_ev.per_class_ap50_95,
            "val_map50": fit.result.val.map50,
            "train_seconds": round(float(fit.result.seconds), 3),
            "select_seconds": round(select_s, 3),
            "wall_seconds": round(time.monotonic() - t0, 3),
            "round0_cached": cached,
            "init": "scratch" if r == 0 or not cfg.train.warm_start else "previous round",
            "dataset_digest": version.digest,
            **info,
        }
        rounds.append(rec)
        log(
            f"{strategy}/s{seed} round {r}: {stats['labeled']} labeled, test mAP50 "
            f"{rec['test_map50'] if rec['test_map50'] is None else round(rec['test_map50'], 4)} "
            f"({rec['wall_seconds']:.0f}s{', cached' if cached else ''})"
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
        _log_curve(tracker, curve)
    if not settings.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return curve


def _champion(round_index: int, fit: FitResult) -> Any:
    from loop.tracking import Champion

    test = None if fit.test is None else fit.test.map50_95
    return Champion(str(round_index), "", Path(fit.result.weights), test)


def _log_round(
    tracker: Any, project: Project, fit: FitResult, strategy: str, seed: int, r: int
) -> None:
    from loop.tracking import TAG

    params = {
        **{f"train.{k}": v for k, v in project.cfg.train.model_dump().items()},
        "replay.strategy": strategy,
        "replay.seed": seed,
        "replay.round": r,
        "init_weights": "scratch" if r == 0 or not project.cfg.train.warm_start else "previous",
    }
    run_id = tracker.log_training(
        version=fit.version,
        store=project.store,
        result=fit.result,
        test=fit.test,
        params=params,
        round_index=r,
    )
    tracker.client.set_tag(run_id, TAG + "replay", f"{strategy}/s{seed}")


def _log_curve(tracker: Any, curve: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param

    from loop.tracking import TAG

    client = tracker.client
    run = client.create_run(
        tracker.experiment_id(),
        run_name=f"replay-{curve['strategy']}-s{curve['seed']}",
        tags={TAG + "kind": "replay", TAG + "replay": f"{curve['strategy']}/s{curve['seed']}"},
    )
    run_id = run.info.run_id
    ts = int(time.time() * 1000)
    metrics = []
    for rec in curve["rounds"]:
        step = int(rec["round"])
        metrics.append(Metric("labeled", float(rec["labeled"]), ts, step))
        for key in ("test_map50", "test_map50_95"):
            if rec[key] is not None:
                metrics.append(Metric(key, float(rec[key]), ts, step))
        metrics.append(Metric("round_wall_seconds", float(rec["wall_seconds"]), ts, step))
    params = [Param("strategy", curve["strategy"]), Param("seed", str(curve["seed"]))]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.log_text(run_id, json.dumps(curve, indent=1), "replay/curve.json")
    client.set_terminated(run_id, "FINISHED")


def _open_tracker(settings: ReplaySettings, out_dir: Path, classes: list[str]) -> Any:
    """A `Tracker` on the replay's MLflow store, with the experiment's artifacts in ``out_dir``."""
    from loop.tracking import Tracker

    uri = settings.mlflow_uri or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    cfg = ProjectConfig(
        classes=classes,
        workspace=out_dir.resolve(),
        mlflow=MlflowConfig(tracking_uri=uri, experiment=REPLAY_EXPERIMENT),
    )
    tracker = Tracker(cfg)
    client = tracker.client
    if client.get_experiment_by_name(REPLAY_EXPERIMENT) is None:
        # Created here so artifacts live beside the results, not in a deleted curve workspace.
        location = None if uri.startswith(("http://", "https://")) else cfg.mlflow_artifact_location
        client.create_experiment(REPLAY_EXPERIMENT, artifact_location=location)
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
    ds = prepare_dataset(settings.dataset, work / "dataset", settings.max_images)
    from loop.model import prepare_ultralytics

    # Bind Ultralytics' settings folder to one that outlives the per-curve workspaces.
    prepare_ultralytics(work / "ultralytics", settings.train.threads)
    doc.update({"dataset": str(ds.source), "classes": ds.classes, "n_images": ds.n_images})
    done = {(c["strategy"], int(c["seed"])) for c in doc["curves"]}
    tracker = _open_tracker(settings, out_dir, ds.classes) if settings.log_mlflow else None

    def save() -> None:
        doc["strategies"] = sorted({c["strategy"] for c in doc["curves"]})
        doc["seeds"] = sorted({int(c["seed"]) for c in doc["curves"]})
        doc["summary"] = label_savings(doc["curves"]) if "random" in doc["strategies"] else None
        doc["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_text(out_json, json.dumps(doc, indent=1))
        if png is not None and doc["curves"]:
            plot_curves(doc["curves"], png, title=f"oracle replay: {ds.source.name}")
        if on_save is not None:
            on_save(doc)

    if not doc["curves"]:
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


# ------------------------------------------------------------------------------------------
# label savings and plots (pure)
# ------------------------------------------------------------------------------------------


def _points(curve: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["labeled"], r[metric]) for r in curve["rounds"] if r.get(metric) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.array(pts, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def labels_to_reach(
    labeled: Sequence[float] | np.ndarray,
    metric: Sequence[float] | np.ndarray,
    target: float,
    cap: float,
) -> tuple[float, bool]:
    """Labels a curve needs to reach ``target``: ``(labels, reached)``.

    The first crossing, linearly interpolated between rounds (the first point itself when it is
    already at or above the target). Not reached: extrapolated along the least-squares slope of
    the last (up to) three points, at most ``cap``; ``cap`` when the curve is flat or falling.
    """
    x = np.asarray(labeled, dtype=np.float64)
    y = np.asarray(metric, dtype=np.float64)
    if x.size == 0:
        return cap, False
    for i in range(x.size):
        if y[i] >= target:
            if i == 0 or y[i] == y[i - 1]:
                return float(x[i]), True
            frac = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + frac * (x[i] - x[i - 1])), True
    tail_x, tail_y = x[-3:], y[-3:]
    if tail_x.size >= 2 and np.ptp(tail_x) > 0:
        slope = float(np.polyfit(tail_x, tail_y, 1)[0])
        if slope > 0:
            return float(min(cap, x[-1] + (target - y[-1]) / slope)), False
    return cap, False


def _savings_by_round(
    bx: np.ndarray, by: np.ndarray, sx: np.ndarray, sy: np.ndarray
) -> list[dict[str, Any]]:
    """Savings against every round of the baseline after its first, not only its last: for
    round ``r``, the labels the strategy needs to reach the baseline's ``metric`` at ``r``
    against the baseline's labels at ``r`` (rounds where the baseline is not above its first
    round are left out)."""
    rows = []
    for r in range(1, bx.size):
        if by[r] <= by[0]:
            continue
        need, reached = labels_to_reach(sx, sy, float(by[r]), cap=2 * float(bx[r]))
        rows.append(
            {
                "round": r,
                "baseline_labels": float(bx[r]),
                "target": float(by[r]),
                "labels_needed": need,
                "reached": reached,
                "savings": 1.0 - need / float(bx[r]),
            }
        )
    return rows


def _mean_by_round(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per baseline round: mean / min / max of the seeds' `_savings_by_round` savings."""
    by_round: dict[int, list[float]] = {}
    for rows in per_seed:
        for row in rows:
            by_round.setdefault(int(row["round"]), []).append(float(row["savings"]))
    return [
        {
            "round": r,
            "savings_mean": float(np.mean(v)),
            "savings_min": float(np.min(v)),
            "savings_max": float(np.max(v)),
            "n_seeds": len(v),
        }
        for r, v in sorted(by_round.items())
    ]


def label_savings(
    curves: Iterable[dict[str, Any]], baseline: str = "random", metric: str = "test_map50"
) -> dict[str, Any]:
    """Label savings of every strategy against ``baseline``, seed by seed.

    For seed ``s``: target = the baseline's final ``metric``, ``L_b`` = the baseline's final
    labeled count, ``L`` = `labels_to_reach` on the strategy's curve (capped at ``2 L_b``), and
    savings = ``1 - L / L_b`` (in ``[-1, 1)``; 0.3 = the same accuracy with 30% fewer labels;
    negative = more labels). A seed whose baseline never rose above its first round has no
    savings (None, with a reason); means and extremes are over the other seeds. Also the mean
    curve over seeds per round, and the same savings against each earlier round of the
    baseline (``savings_by_round``, averaged into ``savings_mean_over_rounds``): one final
    point is a noisy measure of a whole curve.
    """
    by_key: dict[tuple[str, int], dict[str, Any]] = {
        (c["strategy"], int(c["seed"])): c for c in curves
    }
    strategies = sorted({k[0] for k in by_key})
    out: dict[str, Any] = {"baseline": baseline, "metric": metric, "strategies": {}}
    for name in strategies:
        per_seed: list[dict[str, Any]] = []
        for (strat, seed), curve in sorted(by_key.items()):
            if strat != name or (baseline, seed) not in by_key:
                continue
            bx, by = _points(by_key[(baseline, seed)], metric)
            sx, sy = _points(curve, metric)
            if bx.size == 0 or sx.size == 0:
                continue
            base_labels, target = float(bx[-1]), float(by[-1])
            if bx.size < 2 or target <= by[0]:
                # The baseline did not improve on its first round (e.g. a model that has not
                # started learning): every curve "reaches" it at once, savings mean nothing.
                per_seed.append(
                    {
                        "seed": seed,
                        "savings": None,
                        "reason": "the baseline did not improve on its first round",
                        "baseline_labels": base_labels,
                        "target": target,
                    }
                )
                continue
            need, reached = labels_to_reach(sx, sy, target, cap=2 * base_labels)
            per_seed.append(
                {
                    "seed": seed,
                    "savings": 1.0 - need / base_labels,
                    "labels_needed": need,
                    "reached": reached,
                    "baseline_labels": base_labels,
                    "target": target,
                    "by_round": _savings_by_round(bx, by, sx, sy),
                }
            )
        vals = np.array(
            [p["savings"] for p in per_seed if p["savings"] is not None], dtype=np.float64
        )
        rounds_mean = _mean_by_round([p.get("by_round", []) for p in per_seed])
        out["strategies"][name] = {
            "savings_by_round": rounds_mean,
            "savings_mean_over_rounds": (
                float(np.mean([r["savings_mean"] for r in rounds_mean])) if rounds_mean else None
            ),
            "savings_mean": float(vals.mean()) if vals.size else None,
            "savings_min": float(vals.min()) if vals.size else None,
            "savings_max": float(vals.max()) if vals.size else None,
            "savings_std": float(vals.std(ddof=1)) if vals.size > 1 else None,
            "per_seed": per_seed,
            "curve": mean_curve([c for (s, _), c in by_key.items() if s == name]),
        }
    others = {
        n: v["savings_mean"]
        for n, v in out["strategies"].items()
        if n != baseline and v["savings_mean"] is not None
    }
    best = max(others, key=lambda n: others[n]) if others else None
    out["best_strategy"] = best
    out["best_savings_mean"] = None if best is None else others[best]
    return out


def mean_curve(curves: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: mean labeled count and mean/min/max test mAP50 (and mean mAP50-95) over the
    curves (seeds) that reached that round."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for c in curves:
        for r in c["rounds"]:
            by_round.setdefault(int(r["round"]), []).append(r)
    out = []
    for rnd in sorted(by_round):
        recs = by_round[rnd]
        m50 = [r["test_map50"] for r in recs if r["test_map50"] is not None]
        m95 = [r["test_map50_95"] for r in recs if r["test_map50_95"] is not None]
        out.append(
            {
                "round": rnd,
                "labeled": float(np.mean([r["labeled"] for r in recs])),
                "map50_mean": float(np.mean(m50)) if m50 else None,
                "map50_min": float(np.min(m50)) if m50 else None,
                "map50_max": float(np.max(m50)) if m50 else None,
                "map50_95_mean": float(np.mean(m95)) if m95 else None,
                "n_seeds": len(recs),
            }
        )
    return out


def plot_curves(
    curves: Sequence[dict[str, Any]], png: Path, metric: str = "test_map50", title: str = ""
) -> Path:
    """Learning curves (mean over seeds, min-max band) of every strategy: ``metric`` vs labeled
    images. Written with matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({c["strategy"] for c in curves}, key=lambda n: (n != "random", n))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    key = "map50" if metric == "test_map50" else "map50_95"
    for name in names:
        mc = mean_curve([c for c in curves if c["strategy"] == name])
        xs = [p["labeled"] for p in mc if p[f"{key}_mean"] is not None]
        ys = [p[f"{key}_mean"] for p in mc if p[f"{key}_mean"] is not None]
        n_seeds = max((p["n_seeds"] for p in mc), default=0)
        style = "--" if name == "random" else "-"
        (line,) = ax.plot(xs, ys, style, marker="o", ms=3, label=f"{name} ({n_seeds} seeds)")
        if key == "map50":
            lo = [p["map50_min"] for p in mc if p["map50_mean"] is not None]
            hi = [p["map50_max"] for p in mc if p["map50_mean"] is not None]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        if name == "random" and ys:
            # What the other strategies must reach: random's final mean (savings target).
            ax.axhline(ys[-1], color=line.get_color(), alpha=0.4, linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom=0.0, top=max(0.05, ax.get_ylim()[1]))
    ax.set_xlabel("labeled images (train + val)")
    ax.set_ylabel("test mAP50" if key == "map50" else "test mAP50-95")
    ax.set_title(title or "oracle replay")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png
