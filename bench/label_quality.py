"""Label quality on NEU-DET: does the error finder catch injected label errors, and does fixing
its suspects recover the noise penalty? Do the per-annotator figures recover known error rates?

Protocol (`FULL`, one seed):

1. A seeded subset of NEU-DET is ingested into a real project (its frozen test split keeps the
   CLEAN labels: it judges models). Noise is injected into the train and val labels with
   `loop.label_noise.inject_label_noise`: 10 % of the boxes dropped, 10 % shifted by a large
   offset (IoU with the original < 0.3), 5 % given another class; disjoint, exact shares.
2. The error finder runs as `defect-loop review-labels` does: `loop.crossfit.project_cross_fit`
   (``--folds`` models, each trained like a round from the COCO checkpoint on the other folds)
   and `loop.label_errors.find_label_errors` (cleanlab ObjectLab). Precision and recall of its
   top-K suspects against the images that really hold an injected error, K = 5 % and 10 % of
   the images; the precision of K random images (the share of corrupted images) is the
   baseline. Also recall per error kind.
3. Three trainings with the same recipe, evaluated on the clean test split: on the noisy
   labels, on the noisy labels with the top ``fix_share`` suspects replaced by their clean
   labels (a reviewer fixing them), and on the clean labels.
4. Simulated annotators (`loop.label_noise.simulate_annotator`) with known miss/shift/swap
   rates each label the same images; `loop.annotator_quality` measures each against the clean
   labels (a lead's reviewed ground truth) and against the consensus of the three
   (`loop.consensus.fuse_boxes`, what a pull merges); reported beside the rates' expected
   precision, recall and miss share.

Resumable: each finished stage is saved in ``<work>/state.json`` and skipped on the next run.
Writes ``bench/results/label_quality.json`` and prints ONE JSON line. ``--smoke``: a tiny
configuration (120 images, 64 px, 1 epoch, 2 folds) writing ``label_quality_smoke.json``.
About 45 minutes of both cores with the defaults.

Dataset: ``--dataset``, else ``$DEFECT_LOOP_NEU_DET``, else ``../shared/datasets/neu-det``.
Checkpoint: ``--weights``, else ``../shared/models/yolov8n.pt`` when present (the result file
says which, ``start``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from label_efficiency import SHARED_WEIGHTS, neu_det_path  # noqa: E402

from loop.annotator_quality import AnnotatedTask, annotator_quality  # noqa: E402
from loop.config import MlflowConfig, ProjectConfig, SplitConfig, TrainConfig  # noqa: E402
from loop.consensus import fuse_boxes  # noqa: E402
from loop.datasets import DatasetVersion, LabeledImage, assign_split  # noqa: E402
from loop.detections import Detections  # noqa: E402
from loop.images import atomic_write_text  # noqa: E402
from loop.label_noise import AnnotatorRates, inject_label_noise, simulate_annotator  # noqa: E402
from loop.project import Project  # noqa: E402
from loop.replay_dataset import prepare_dataset  # noqa: E402
from loop.simulate import truth_from_yolo_dir  # noqa: E402

FULL: dict[str, Any] = {
    "max_images": 1200,
    "folds": 4,
    "imgsz": 224,
    "epochs": 10,
    "min_iterations": 200,
    "batch": 16,
    "drop": 0.10,
    "shift": 0.10,
    "swap": 0.05,
    "fix_share": 0.10,
    "annotated_images": 300,
}
SMOKE: dict[str, Any] = {
    "max_images": 120,
    "folds": 2,
    "imgsz": 64,
    "epochs": 1,
    "min_iterations": 0,
    "batch": 8,
    "drop": 0.10,
    "shift": 0.10,
    "swap": 0.05,
    "fix_share": 0.10,
    "annotated_images": 40,
}
ANNOTATORS = (
    AnnotatorRates("careful", miss=0.03, shift=0.02, swap=0.02),
    AnnotatorRates("average", miss=0.10, shift=0.05, swap=0.05),
    AnnotatorRates("sloppy", miss=0.25, shift=0.10, swap=0.10),
)
TOP_SHARES = (0.05, 0.10)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="NEU-DET (Pascal VOC) or any YOLO/VOC folder")
    p.add_argument("--smoke", action="store_true", help="tiny configuration, *_smoke outputs")
    p.add_argument("--seed", type=int, default=0, help="noise, folds and training seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=Path, default=None, help="start checkpoint of every training")
    for key, value in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    p.add_argument("--fresh", action="store_true", help="discard finished stages")
    p.add_argument("--work", type=Path, default=None, help="state folder (default bench/work/...)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = SMOKE if args.smoke else FULL
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), REPO)
    except ValueError:
        return path.name


# ------------------------------------------------------------------------------------------
# JSON of predictions (the cross-fit is the expensive stage: it is saved)
# ------------------------------------------------------------------------------------------


def _det_to_json(d: Detections) -> dict[str, Any]:
    return {
        "wh": list(d.image_wh),
        "xyxy": np.round(d.xyxy, 3).tolist(),
        "cls": d.class_id.tolist(),
        "conf": None if d.confidence is None else np.round(d.confidence, 6).tolist(),
    }


def _det_from_json(j: dict[str, Any]) -> Detections:
    return Detections(
        np.asarray(j["xyxy"], dtype=float).reshape(-1, 4),
        np.asarray(j["cls"], dtype=int),
        (int(j["wh"][0]), int(j["wh"][1])),
        None if j["conf"] is None else np.asarray(j["conf"], dtype=float),
    )


# ------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------


class _NoChampion:
    """`Project.fit`'s champion source: every training here starts from the checkpoint."""

    def champion(self) -> None:
        return None


def _version(project: Project, labels: dict[str, Detections], shas: list[str]) -> DatasetVersion:
    rows = []
    for sha in shas:
        e = project.pool.get(sha)
        split = assign_split(sha, project.cfg.split)
        rows.append(
            LabeledImage(sha, e.path, e.width, e.height, split, labels[sha], {"source": "bench"})
        )
    return DatasetVersion.create(project.cfg.classes, rows)


def _fit(project: Project, version: DatasetVersion) -> dict[str, Any]:
    project.set_version(version)
    started = time.monotonic()
    fit = project.fit(_NoChampion())
    test = fit.test
    return {
        "version": version.digest,
        "test_map50": None if test is None else test.map50,
        "test_map50_95": None if test is None else test.map50_95,
        "test_per_class_ap50": None if test is None else test.per_class_ap50,
        "train_seconds": round(time.monotonic() - started, 1),
        "epochs": len(fit.result.epochs),
    }


def _finder_scores(
    ranked: list[str], corrupted: set[str], errors: dict[str, Any], n: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"images": n, "corrupted": len(corrupted)}
    prevalence = len(corrupted) / n if n else 0.0
    out["random_precision"] = round(prevalence, 4)
    for share in TOP_SHARES:
        k = max(1, round(share * n))
        top = ranked[:k]
        hits = sum(1 for s in top if s in corrupted)
        kinds: dict[str, Any] = {}
        for kind in ("dropped", "shifted", "swapped"):
            having = {s for s, errs in errors.items() if any(e["kind"] == kind for e in errs)}
            caught = sum(1 for s in top if s in having)
            kinds[kind] = {
                "images": len(having),
                "caught": caught,
                "recall": round(caught / len(having), 4) if having else None,
            }
        out[f"top_{round(share * 100)}pct"] = {
            "k": k,
            "hits": hits,
            "precision": round(hits / k, 4),
            "recall": round(hits / len(corrupted), 4) if corrupted else None,
            "by_kind": kinds,
        }
    return out


def _expected(rates: AnnotatorRates) -> dict[str, float]:
    """Per-box figures the rates imply when a shifted box never matches (IoU < 0.3 < 0.5) and
    a swapped one matches with the wrong class: drawn = 1-m; correct = (1-m)(1-s)(1-w)."""
    kept = 1 - rates.miss
    correct = kept * (1 - rates.shift) * (1 - rates.swap)
    return {
        "precision": round(correct / kept, 4) if kept else 0.0,
        "recall": round(correct, 4),
        "missed_share": round(rates.miss + kept * rates.shift, 4),
    }


def _measured(q: Any) -> dict[str, Any]:
    missed = int(q.confusion[:-1, -1].sum())
    return {
        "precision": None if q.precision is None else round(q.precision, 4),
        "recall": None if q.recall is None else round(q.recall, 4),
        "missed_share": round(missed / q.reference_boxes, 4) if q.reference_boxes else None,
    }


def _annotators(
    truth: dict[str, Detections], shas: list[str], classes: list[str], seed: int
) -> dict[str, Any]:
    num_classes = len(classes)
    rng = np.random.default_rng([seed, 31])
    drawn = {
        sha: {a.name: simulate_annotator(truth[sha], a, num_classes, rng) for a in ANNOTATORS}
        for sha in shas
    }
    references: dict[str, Callable[[str], Detections]] = {
        "reviewed": lambda s: truth[s],
        # What a pull merges when the three agree (loop.consensus: strict-majority box fusion).
        "consensus": lambda s: fuse_boxes(list(drawn[s].values())),
    }
    n_ref = sum(len(truth[s]) for s in shas)
    out: dict[str, Any] = {
        "images": len(shas),
        "true_boxes": n_ref,
        "consensus": "strict-majority box fusion of the three (loop.consensus.fuse_boxes)",
        "annotators": {},
    }
    for ref_name, ref in references.items():
        tasks = [AnnotatedTask(i, sha, ref(sha), drawn[sha]) for i, sha in enumerate(shas, start=1)]
        quality = annotator_quality(tasks, classes)
        for a in ANNOTATORS:
            entry = out["annotators"].setdefault(
                a.name,
                {"rates": {"miss": a.miss, "shift": a.shift, "swap": a.swap}, **_expected(a)},
            )
            entry[f"measured_vs_{ref_name}"] = _measured(quality[a.name])
    for entry in out["annotators"].values():
        for ref_name in references:
            m = entry[f"measured_vs_{ref_name}"]
            entry[f"abs_error_vs_{ref_name}"] = {
                k: None if m[k] is None else round(abs(m[k] - entry[k]), 4)
                for k in ("precision", "recall", "missed_share")
            }
    return out


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    s = _settings(args)
    dataset = neu_det_path(args.dataset)
    suffix = "_smoke" if args.smoke else ""
    results = args.results.resolve() / f"label_quality{suffix}.json"
    work = (args.work or REPO / "bench" / "work" / f"label_quality{suffix}").resolve()
    if not dataset.is_dir():
        print(json.dumps({"bench": "label_quality", "error": f"dataset not found: {dataset}"}))
        return 2
    weights = args.weights.resolve() if args.weights else None
    if weights is None and SHARED_WEIGHTS.is_file():
        weights = SHARED_WEIGHTS
    state_path = work / "state.json"
    key = {"settings": s, "seed": args.seed, "dataset": str(dataset.resolve()), "w": str(weights)}
    state: dict[str, Any] = {}
    if state_path.is_file() and not args.fresh:
        state = json.loads(state_path.read_text())
        if state.get("key") != key:
            state = {}
    state["key"] = key
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def save() -> None:
        atomic_write_text(state_path, json.dumps(state))

    with contextlib.redirect_stdout(sys.stderr):
        ds = prepare_dataset(dataset, work / "dataset", s["max_images"])
        cfg = ProjectConfig(
            name="label-quality",
            classes=ds.classes,
            workspace=work / "project",
            train=TrainConfig(
                model="yolov8n.yaml",
                weights=weights,
                init="pretrained",
                imgsz=s["imgsz"],
                epochs=s["epochs"],
                min_iterations=s["min_iterations"],
                batch=s["batch"],
                threads=args.threads,
                seed=args.seed,
            ),
            split=SplitConfig(val=0.15, test=0.15),
            mlflow=MlflowConfig(tracking_uri=f"sqlite:///{work / 'mlflow.db'}"),
        )
        project = Project(cfg)
        project.ingest(ds.images_dir)
        truth = truth_from_yolo_dir(project.pool, ds.labels_dir, len(ds.classes))
        test = sorted(x for x in truth if assign_split(x, cfg.split) == "test")
        rest = sorted(x for x in truth if assign_split(x, cfg.split) != "test")
        noisy = inject_label_noise(
            {x: truth[x] for x in rest},
            len(ds.classes),
            np.random.default_rng([args.seed, 17]),
            s["drop"],
            s["shift"],
            s["swap"],
        )
        errors = {
            sha: [{"kind": e.kind, "box": e.box} for e in errs]
            for sha, errs in noisy.errors.items()
        }
        labels_noisy = {**{x: truth[x] for x in test}, **noisy.labels}
        v_noisy = _version(project, labels_noisy, test + rest)
        log(
            f"{len(rest)} train/val images ({len(noisy.corrupted)} corrupted: "
            f"{noisy.counts()}), {len(test)} clean test images"
        )

        if "crossfit" not in state:
            from loop.crossfit import project_cross_fit

            project.set_version(v_noisy)
            t0 = time.monotonic()
            version, oos = project_cross_fit(project, s["folds"], args.seed, progress=log)
            state["crossfit"] = {
                "version": version.digest,
                "seconds": round(time.monotonic() - t0, 1),
                "predictions": {x: _det_to_json(o.predictions) for x, o in oos.items()},
            }
            save()
        from loop.label_errors import find_label_errors, label_checks

        predictions = {x: _det_from_json(j) for x, j in state["crossfit"]["predictions"].items()}
        t0 = time.monotonic()
        suspects = find_label_errors(label_checks(v_noisy, predictions), len(ds.classes))
        cleanlab_s = round(time.monotonic() - t0, 2)
        ranked = [x.sha256 for x in suspects]
        finder = _finder_scores(ranked, noisy.corrupted, errors, len(rest))
        finder["cleanlab_seconds"] = cleanlab_s
        finder["crossfit_seconds"] = state["crossfit"]["seconds"]
        finder["flagged"] = sum(1 for x in suspects if x.flagged)
        log(f"finder: {json.dumps({k: finder[k] for k in ('top_5pct', 'top_10pct')})}")

        n_fix = max(1, round(s["fix_share"] * len(rest)))
        fixed_labels = dict(labels_noisy)
        for sha in ranked[:n_fix]:
            fixed_labels[sha] = truth[sha]
        runs = {
            "noisy": v_noisy,
            "fixed_top": _version(project, fixed_labels, test + rest),
            "clean": _version(project, truth, test + rest),
        }
        for name, version in runs.items():
            if name not in state:
                log(f"training on the {name} labels")
                state[name] = _fit(project, version)
                save()
                log(f"{name}: test mAP50 {state[name]['test_map50']}")
        annotated = rest[: s["annotated_images"]]
        annotators = _annotators(truth, annotated, list(ds.classes), args.seed)

    m = {n: state[n]["test_map50"] for n in runs}
    penalty = None if None in m.values() else m["clean"] - m["noisy"]
    recovered = (
        None
        if penalty is None or abs(penalty) < 1e-9
        else round((m["fixed_top"] - m["noisy"]) / penalty, 4)
    )
    doc: dict[str, Any] = {
        "bench": "label_quality",
        "dataset": _rel(dataset),
        "start": _rel(weights) if weights else "yolov8n.yaml (random weights)",
        "seed": args.seed,
        "settings": s,
        "noise": {"counts": noisy.counts(), "corrupted_images": len(noisy.corrupted)},
        "finder": finder,
        "precision_at_5pct": finder["top_5pct"]["precision"],
        "goal_precision_at_5pct": 0.6,
        "fixed_images": n_fix,
        "training": {n: state[n] for n in runs},
        "test_map50": m,
        "noise_penalty_map50": None if penalty is None else round(penalty, 4),
        "penalty_recovered_share": recovered,
        "annotators": annotators,
        "elapsed_s_this_run": round(time.monotonic() - started, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(doc, indent=1))
    line = {
        k: doc[k]
        for k in (
            "bench",
            "dataset",
            "start",
            "precision_at_5pct",
            "goal_precision_at_5pct",
            "test_map50",
            "noise_penalty_map50",
            "penalty_recovered_share",
            "elapsed_s_this_run",
        )
    }
    line["recall_at_10pct"] = finder["top_10pct"]["recall"]
    line["random_precision"] = finder["random_precision"]
    for ref in ("reviewed", "consensus"):
        line[f"annotator_abs_error_vs_{ref}"] = {
            n: a[f"abs_error_vs_{ref}"] for n, a in annotators["annotators"].items()
        }
    line["result_file"] = _rel(results)
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
