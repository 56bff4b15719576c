"""Evaluation noise on NEU-DET: how wide is a test interval, and does the gate promote noise?

Trains pairs of models that differ ONLY by their training seed (same data, same recipe:
COCO-pretrained yolov8n fine-tuned briefly at a small size), evaluates each once on a pool of
held-out NEU-DET test images (per-image match statistics, `loop.model.evaluate_matches`), and
measures from those statistics:

- the half-width of the test mAP50 interval (percentile bootstrap over test images,
  `loop.evaluation.bootstrap`) of one model at 30, 100 and 300 test images (the smaller sizes
  are several random subsets of the pool; the mean is reported);
- the false-promotion rate of the old gate (`loop.tracking.gate`: point estimates, promote when
  the candidate's mAP50-95 is not lower and no class AP50-95 fell by more than 0.05) and of the
  new paired gate (`loop.evaluation.paired_gate`, tolerance 0), over every ordered pair of
  same-data different-seed models (a promotion there is a promotion of noise), at each size;
- the time of 1,000 bootstrap resamples of 300 test images (goal: under 5 s on 2 cores), and
  of the paired bootstrap the gate runs (two models): wall time and the process's CPU time
  (the bootstrap is single-threaded, so CPU time is its time on an idle core), with the
  machine's load average beside them.

Resumable: trained models and their match statistics stay under ``--work`` (default
``bench/work/evaluation_noise``); a rerun trains only what is missing. Writes
``bench/results/evaluation_noise.json`` after every model (``complete`` says whether all are
in) and prints ONE JSON line at the end. ``--smoke``: a tiny configuration (4 models, 1 epoch
at 64 px, 30 test images, 200 resamples) that writes ``evaluation_noise_smoke.json``::

    nohup nice -n 19 .venv/bin/python bench/evaluation_noise.py > bench/work/evaluation_noise.log 2>&1 &

Dataset: ``--dataset``, else ``$DEFECT_LOOP_NEU_DET``, else ``../shared/datasets/neu-det``;
weights: ``--weights``, else ``$DEFECT_LOOP_YOLOV8N``, else ``../shared/models/yolov8n.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loop.config import TrainConfig  # noqa: E402
from loop.evaluation import (  # noqa: E402
    BootstrapSettings,
    ImageMatches,
    bootstrap,
    box_metrics,
    paired_bootstrap,
    paired_gate,
)
from loop.images import atomic_write_text  # noqa: E402
from loop.tracking import class_metric, gate  # noqa: E402

# Full run: 20 models (10 disjoint seed pairs), each fine-tuned from COCO yolov8n on the same
# 120 random NEU-DET images (50 for validation) at 160 px for 10 epochs; a pool of 300 other
# images for testing.
FULL: dict[str, Any] = {
    "pairs": 10,
    "train": 120,
    "val": 50,
    "test": 300,
    "sizes": "30,100,300",
    "subsets": 5,
    "imgsz": 160,
    "epochs": 10,
    "batch": 16,
    "resamples": 1000,
}
SMOKE: dict[str, Any] = {
    "pairs": 2,
    "train": 16,
    "val": 8,
    "test": 30,
    "sizes": "10,20,30",
    "subsets": 2,
    "imgsz": 64,
    "epochs": 1,
    "batch": 8,
    "resamples": 200,
}
TOLERANCE = 0.0  # the promotion config's defaults
MAX_CLASS_DROP = 0.05
TIMING_IMAGES = 300
TIMING_RESAMPLES = 1000


def shared_path(arg: str | None, env: str, rel: str) -> Path:
    if arg:
        return Path(arg)
    value = os.environ.get(env)
    return Path(value) if value else REPO.parent / "shared" / rel


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="NEU-DET (Pascal VOC folder)")
    p.add_argument("--weights", help="COCO-pretrained yolov8n.pt to fine-tune")
    p.add_argument("--smoke", action="store_true", help="tiny configuration, *_smoke outputs")
    for key in FULL:
        p.add_argument(f"--{key}", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="state folder (bench/work/...)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    base = SMOKE if args.smoke else FULL
    out = {
        k: type(v)(getattr(args, k)) if getattr(args, k) is not None else v for k, v in base.items()
    }
    out["sizes"] = [int(s) for s in str(out["sizes"]).split(",") if s.strip()]
    if max(out["sizes"]) > out["test"]:
        raise SystemExit(f"--sizes {out['sizes']} exceed the test pool of {out['test']} images")
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data


def prepare_data(dataset: Path, work: Path, s: dict[str, Any]) -> tuple[Path, list[str]]:
    """A YOLO copy of NEU-DET (symlinked images) split at random (seed 0) into train / val /
    test pool of the configured sizes; the same split on every run. Returns data.yaml, classes."""
    from loop.formats.voc import read_voc_folder, write_yolo_folder

    data_yaml = work / "data" / "data.yaml"
    if data_yaml.is_file():
        classes = json.loads((work / "data" / "classes.json").read_text())
        return data_yaml, classes
    folder = read_voc_folder(dataset)
    classes = list(folder.classes)
    yolo = write_yolo_folder(folder, work / "yolo", classes)
    images = sorted((yolo / "images").iterdir())
    n = s["train"] + s["val"] + s["test"]
    if n > len(images):
        raise SystemExit(f"{dataset} has {len(images)} images, the split needs {n}")
    order = np.random.default_rng(0).permutation(len(images))[:n].tolist()
    parts = {
        "train": order[: s["train"]],
        "val": order[s["train"] : s["train"] + s["val"]],
        "test": order[s["train"] + s["val"] :],
    }
    for split, idx in parts.items():
        (work / "data" / split / "images").mkdir(parents=True, exist_ok=True)
        (work / "data" / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = images[i]
            dst = work / "data" / split / "images" / img.name
            if not dst.exists():
                os.symlink(img.resolve(), dst)
            lbl = (yolo / "labels" / f"{img.stem}.txt").read_text()
            (work / "data" / split / "labels" / f"{img.stem}.txt").write_text(lbl)
    root = work / "data"
    names = "\n".join(f"  {i}: {json.dumps(c)}" for i, c in enumerate(classes))
    (root / "classes.json").write_text(json.dumps(classes))
    data_yaml.write_text(
        f"path: {root}\ntrain: {root / 'train' / 'images'}\nval: {root / 'val' / 'images'}\n"
        f"test: {root / 'test' / 'images'}\nnames:\n{names}\n"
    )
    return data_yaml, classes


# ------------------------------------------------------------------ models


def train_and_evaluate(
    seed: int,
    data_yaml: Path,
    classes: list[str],
    work: Path,
    weights: Path,
    s: dict[str, Any],
    threads: int,
) -> tuple[ImageMatches, dict[str, Any]]:
    """Fine-tune with ``seed`` (skipped when done before) and evaluate on the test pool once."""
    from loop import model

    done = work / "models" / f"s{seed}.json"
    npz = work / "models" / f"s{seed}.npz"
    if done.is_file() and npz.is_file():
        with np.load(npz) as z:
            return ImageMatches.from_arrays(dict(z)), json.loads(done.read_text())
    cfg = TrainConfig(
        model="yolov8n.yaml",
        imgsz=s["imgsz"],
        epochs=s["epochs"],
        batch=s["batch"],
        seed=seed,
        threads=threads,
    )
    ycd = work / "ultralytics"
    t0 = time.monotonic()
    result = model.train(data_yaml, work / "runs", cfg, ycd, init_weights=weights, name=f"s{seed}")
    t1 = time.monotonic()
    ev, matches = model.evaluate_matches(
        result.weights, data_yaml, "test", s["imgsz"], ycd, classes, threads=threads
    )
    t2 = time.monotonic()
    # Our statistics reproduce Ultralytics' own figures: check it on every model.
    mine = box_metrics(matches)
    info = {
        "seed": seed,
        "map50": ev.map50,
        "map50_95": ev.map50_95,
        "recall": ev.recall,
        "max_abs_diff_vs_ultralytics": max(
            abs(mine.map50 - ev.map50),
            abs(mine.map50_95 - ev.map50_95),
            abs(mine.precision - ev.precision),
            abs(mine.recall - ev.recall),
        ),
        "predictions": len(matches.conf),
        "train_s": round(t1 - t0, 1),
        "eval_s": round(t2 - t1, 1),
    }
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **matches.to_arrays())
    atomic_write_text(done, json.dumps(info, indent=1))
    return matches, info


# ------------------------------------------------------------------ analysis


def _metric_dict(m: ImageMatches, classes: list[str]) -> dict[str, float]:
    """What the old gate read from MLflow: test mAP50-95 and per-class AP50-95."""
    b = box_metrics(m)
    out = {"test_map50_95": b.map50_95}
    for c, name in enumerate(classes):
        if b.n_targets[c] > 0:
            out[class_metric("test", "ap50_95", name)] = float(b.ap50_95[c])
    return out


def analyse(
    matches: dict[int, ImageMatches], classes: list[str], s: dict[str, Any]
) -> dict[str, Any]:
    settings = BootstrapSettings(resamples=s["resamples"], confidence=0.95, seed=0)
    seeds = sorted(matches)
    pool = matches[seeds[0]].n_images
    rng = np.random.default_rng(12345)
    # One fixed subset per size for the gates (a project has one test split); several for the
    # half-width (how much it varies with which images are in the split).
    gate_subsets = {
        n: np.arange(pool) if n >= pool else np.sort(rng.choice(pool, n, replace=False))
        for n in s["sizes"]
    }
    ref = seeds[0]
    halfwidth: dict[str, Any] = {}
    for n in s["sizes"]:
        reps = 1 if n >= pool else s["subsets"]
        widths, values = [], []
        for _ in range(reps):
            idx = np.arange(pool) if n >= pool else np.sort(rng.choice(pool, n, replace=False))
            iv = bootstrap(matches[ref].take(idx), classes, settings)
            widths.append(round(iv.map50.halfwidth, 4))
            values.append([round(iv.map50.value, 4), round(iv.map50.lo, 4), round(iv.map50.hi, 4)])
        halfwidth[str(n)] = {
            "mean": round(float(np.mean(widths)), 4),
            "per_subset": widths,
            "map50_interval": values,
        }
    pairs = [(seeds[2 * i], seeds[2 * i + 1]) for i in range(len(seeds) // 2)]
    promotion: dict[str, Any] = {}
    differences: list[dict[str, Any]] = []
    for n in s["sizes"]:
        idx = gate_subsets[n]
        old_n = new_n = comps = 0
        verdicts: dict[str, int] = {"improvement": 0, "noise": 0, "worse": 0}
        for a, b in pairs:
            ma, mb = matches[a].take(idx), matches[b].take(idx)
            # One paired bootstrap per pair; the other order shares its replicates.
            b_vs_a = paired_bootstrap(mb, ma, classes, settings)
            for champ, cand, champ_seed, comp in (
                (ma, mb, a, b_vs_a),
                (mb, ma, b, b_vs_a.swapped()),
            ):
                comps += 1
                old = gate(
                    _metric_dict(cand, classes),
                    _metric_dict(champ, classes),
                    classes,
                    TOLERANCE,
                    MAX_CLASS_DROP,
                )
                new = paired_gate(comp, TOLERANCE, MAX_CLASS_DROP, str(champ_seed))
                old_n += int(old.promoted)
                new_n += int(new.promoted)
                verdicts[new.verdict] += 1
                if n == max(s["sizes"]) and champ is ma:
                    d = comp.difference_map50_95
                    differences.append(
                        {
                            "pair": [a, b],
                            "map50_95_difference": [
                                round(d.value, 4),
                                round(d.lo, 4),
                                round(d.hi, 4),
                            ],
                            "verdict": new.verdict,
                        }
                    )
        promotion[str(n)] = {
            "comparisons": comps,
            "old_gate_promoted": old_n,
            "new_gate_promoted": new_n,
            "old_gate_rate": round(old_n / comps, 3) if comps else None,
            "new_gate_rate": round(new_n / comps, 3) if comps else None,
            "new_gate_verdicts": verdicts,
        }
    # Timing: the bootstrap the loop runs on a 300-image test split (or the whole pool when
    # smaller), and the paired one of the gate.
    # Wall time on a shared machine depends on its load; the process's CPU time is what the
    # same work takes on an idle core (the bootstrap runs in one thread).
    idx = np.arange(min(pool, TIMING_IMAGES))
    m0 = matches[ref].take(idx)
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    bootstrap(m0, classes, BootstrapSettings(resamples=TIMING_RESAMPLES))
    t1, c1 = time.perf_counter(), time.process_time()
    if len(seeds) > 1:
        other = matches[seeds[1]].take(idx)
        paired_bootstrap(other, m0, classes, BootstrapSettings(resamples=TIMING_RESAMPLES))
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "reference_model": f"s{ref}",
        "halfwidth_map50": halfwidth,
        "false_promotion": promotion,
        "pairs": [list(p) for p in pairs],
        "seed_differences_full_pool": differences,
        "bootstrap_timing": {
            "images": len(idx),
            "resamples": TIMING_RESAMPLES,
            "predictions": len(m0.conf),
            "bootstrap_s": round(t1 - t0, 2),
            "bootstrap_cpu_s": round(c1 - c0, 2),
            "paired_bootstrap_s": round(t2 - t1, 2),
            "paired_bootstrap_cpu_s": round(c2 - c1, 2),
            "load_average_1min": round(load, 1),
            "goal_s": 5.0,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = sys.stdout
    s = settings_from(args)
    dataset = shared_path(args.dataset, "DEFECT_LOOP_NEU_DET", "datasets/neu-det")
    weights = shared_path(args.weights, "DEFECT_LOOP_YOLOV8N", "models/yolov8n.pt")
    suffix = "_smoke" if args.smoke else ""
    results = args.results.resolve() / f"evaluation_noise{suffix}.json"
    work = (args.work or REPO / "bench" / "work" / f"evaluation_noise{suffix}").resolve()
    for what, path in (("dataset", dataset), ("weights", weights)):
        if not path.exists():
            print(
                json.dumps({"bench": "evaluation_noise", "error": f"{what} not found: {path}"}),
                file=out,
            )
            return 2
    started = time.monotonic()
    seeds = list(range(2 * s["pairs"]))
    matches: dict[int, ImageMatches] = {}
    infos: dict[int, dict[str, Any]] = {}
    doc: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):  # training prints; stdout is the JSON line
        from loop import model

        model.prepare_ultralytics(work / "ultralytics", args.threads)
        data_yaml, classes = prepare_data(dataset, work, s)
        for seed in seeds:
            log(f"model s{seed}: training / evaluating")
            matches[seed], infos[seed] = train_and_evaluate(
                seed, data_yaml, classes, work, weights, s, args.threads
            )
            log(f"model s{seed}: test mAP50 {infos[seed]['map50']:.3f}")
            complete = len(matches) == len(seeds)
            models = {f"s{k}": v for k, v in sorted(infos.items())}
            if not complete:
                # Progress only; the analysis runs once every model is in.
                partial = {"bench": "evaluation_noise", "complete": False, "models": models}
                atomic_write_text(results, json.dumps(partial, indent=1))
            else:
                log("analysing: bootstraps of every pair at every test size")
                doc = {
                    "bench": "evaluation_noise",
                    "dataset": dataset.name,
                    "complete": complete,
                    "settings": {
                        **s,
                        "tolerance": TOLERANCE,
                        "max_class_drop": MAX_CLASS_DROP,
                        "confidence": 0.95,
                        "recipe": "COCO yolov8n.pt fine-tuned, same data, seeds differ",
                    },
                    "classes": classes,
                    "models": models,
                    **analyse(matches, classes, s),
                    "elapsed_s_this_run": round(time.monotonic() - started, 1),
                }
                atomic_write_text(results, json.dumps(doc, indent=1))
    line = {
        k: doc.get(k)
        for k in (
            "bench",
            "complete",
            "halfwidth_map50",
            "false_promotion",
            "bootstrap_timing",
            "elapsed_s_this_run",
        )
    }
    line["halfwidth_map50"] = {n: v["mean"] for n, v in (doc.get("halfwidth_map50") or {}).items()}
    line["false_promotion"] = {
        n: {"old": v["old_gate_rate"], "new": v["new_gate_rate"], "comparisons": v["comparisons"]}
        for n, v in (doc.get("false_promotion") or {}).items()
    }
    line["models"] = len(infos)
    line["result_file"] = str(results)
    print(json.dumps(line), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
