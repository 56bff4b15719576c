"""Label efficiency on NEU-DET: how many labels does a strategy save against random sampling?

Runs the oracle replay (`loop.replay`: the same scoring, selection, push/pull, dataset-version and
training code as the real loop) for random and the compared strategies over several seeds, and a
full-pool ceiling, then reports the label savings per strategy:
``1 - (labels the strategy needs to reach random's final test mAP50) / (random's final labels)``
seed by seed (same initial set per seed), with mean, min and max over seeds; the same at 95 % of
the ceiling's test mAP50; the same with a labeler's correction actions as the cost; the work
the pre-annotations save against drawing every box; and each strategy's class mix.

Protocol (`FULL`): every round of every curve trains with the same recipe from the same
initialisation (the COCO-pretrained yolov8n checkpoint, ``init: pretrained``), so random's curve
shows what more data buys, not what more epochs buy. 224 px (NEU-DET images are 200 px). The
choice of epochs and validation is justified by ``bench/recipe_check.py`` (see the README).

Long (about 2.5 hours of both cores with the defaults): run it in the background; it saves the
replay state after every finished curve and resumes where it stopped::

    nohup .venv/bin/python bench/label_efficiency.py > bench/work/label_efficiency.log 2>&1 &

Writes ``bench/results/label_efficiency.json`` (+ ``.png``) after every curve (``complete`` says
whether all curves are in) and prints ONE JSON line at the end. ``--smoke``: a tiny configuration
(a 160-image subset, 64 px, 1-2 epochs, 1 round) that writes ``*_smoke`` files instead.

Dataset: ``--dataset``, else ``$DEFECT_LOOP_NEU_DET``, else ``../shared/datasets/neu-det``
relative to the repository root. Checkpoint: ``--weights``, else ``../shared/models/yolov8n.pt``
when present; without one the curves train from the ``yolov8n.yaml`` architecture (random
weights), and the result file says so (``start``).
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

from loop.config import SelectConfig, SplitConfig, TrainConfig  # noqa: E402
from loop.images import atomic_write_text  # noqa: E402
from loop.replay import ReplaySettings, run_replay  # noqa: E402
from loop.savings import label_savings  # noqa: E402

SHARED_WEIGHTS = REPO.parent / "shared" / "models" / "yolov8n.pt"
# Full run: see the module docstring and the README's Benchmarks section for the reasons.
FULL: dict[str, Any] = {
    "strategies": "random,calibrated_entropy,class_diversity",
    "base_strategy": "entropy",
    "seeds": "0,1,2",
    "initial": 100,
    "step": 100,
    "rounds": 6,
    "imgsz": 224,
    "epochs": 10,
    "min_iterations": 200,
    "batch": 16,
    "max_images": None,
}
SMOKE: dict[str, Any] = {
    "strategies": "random,entropy,hybrid",
    "base_strategy": "entropy",
    "seeds": "0,1",
    "initial": 24,
    "step": 12,
    "rounds": 1,
    "imgsz": 64,
    "epochs": 2,
    "min_iterations": 0,
    "batch": 8,
    "max_images": 160,
}


def neu_det_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("DEFECT_LOOP_NEU_DET")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "neu-det"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="NEU-DET (Pascal VOC) or any YOLO/VOC folder")
    p.add_argument("--smoke", action="store_true", help="tiny configuration, *_smoke outputs")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="checkpoint every training starts from (default: ../shared/models/yolov8n.pt)",
    )
    p.add_argument(
        "--init",
        choices=("pretrained", "champion"),
        default="pretrained",
        help="each round starts from the checkpoint (default) or fine-tunes the previous round",
    )
    p.add_argument("--finetune-epochs", type=int, default=None, help="epochs of --init champion")
    p.add_argument("--val-every-epoch", action="store_true", help="validate after every epoch")
    p.add_argument("--no-ceiling", action="store_true", help="skip the full-pool training")
    p.add_argument(
        "--name",
        default="label_efficiency",
        help="stem of the result files and the work folder (e.g. for an ablation)",
    )
    p.add_argument("--mlflow", action="store_true", help="also log to MLflow (sqlite in work)")
    p.add_argument("--fresh", action="store_true", help="discard finished curves and start over")
    p.add_argument("--work", type=Path, default=None, help="state folder (default bench/work/...)")
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results",
        help="folder of the result files",
    )
    return p.parse_args(argv)


def start_weights(args: argparse.Namespace) -> Path | None:
    """``--weights``, else the shared COCO checkpoint when it exists, else None (from scratch)."""
    if args.weights is not None:
        return Path(args.weights).resolve()
    return SHARED_WEIGHTS if SHARED_WEIGHTS.is_file() else None


def settings_from(args: argparse.Namespace, dataset: Path) -> ReplaySettings:
    base = SMOKE if args.smoke else FULL
    val: dict[str, Any] = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()
    }
    weights = start_weights(args)
    return ReplaySettings(
        dataset=dataset,
        strategies=tuple(s.strip() for s in str(val["strategies"]).split(",") if s.strip()),
        seeds=tuple(int(s) for s in str(val["seeds"]).split(",") if s.strip()),
        initial=int(val["initial"]),
        step=int(val["step"]),
        rounds=int(val["rounds"]),
        train=TrainConfig(
            model="yolov8n.yaml",
            weights=weights,
            init=args.init,
            imgsz=int(val["imgsz"]),
            epochs=int(val["epochs"]),
            min_iterations=int(val["min_iterations"]),
            finetune_epochs=args.finetune_epochs,
            batch=int(val["batch"]),
            threads=args.threads,
            val_every_epoch=bool(args.val_every_epoch),
        ),
        select=SelectConfig(
            strategy="entropy", reduction="max", base_strategy=str(val["base_strategy"])
        ),
        split=SplitConfig(val=0.15, test=0.15),
        max_images=None if val["max_images"] in (None, "None") else int(val["max_images"]),
        log_mlflow=args.mlflow,
        ceiling=not args.no_ceiling,
    )


def repo_relative(value: Any) -> Any:
    """``value`` with every absolute path string made relative to the repository root (the
    committed results must not name the machine that ran them)."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and Path(value).is_absolute():
        return os.path.relpath(value, REPO)
    return value


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def result_doc(doc: dict[str, Any], settings: ReplaySettings, elapsed: float) -> dict[str, Any]:
    """The benchmark's result file from the replay document (see the module docstring)."""
    summary = doc.get("summary") or {"strategies": {}, "best_strategy": None}
    done = {(c["strategy"], int(c["seed"])) for c in doc["curves"]}
    wanted = {(s, seed) for s in settings.strategies for seed in settings.seeds}
    # The same savings on mAP50-95 (box quality, not only hits), and what each strategy had
    # labeled by its last round: the class mix its selections produced.
    strict = (
        label_savings(doc["curves"], metric="test_map50_95")
        if any(c["strategy"] == "random" for c in doc["curves"])
        else {"strategies": {}}
    )
    ceiling = summary.get("ceiling") or {}
    effort = summary.get("effort") or {}
    strategies = {}
    for name, s in summary["strategies"].items():
        s95 = strict["strategies"].get(name, {})
        mine = [c for c in doc["curves"] if c["strategy"] == name and c["rounds"]]
        final = [c["rounds"][-1] for c in mine]
        cs = (ceiling.get("strategies") or {}).get(name, {})
        strategies[name] = {
            "savings_map50_95_mean": s95.get("savings_mean"),
            "savings_map50_95_min": s95.get("savings_min"),
            "savings_map50_95_max": s95.get("savings_max"),
            "final_labeled_boxes_mean": {
                cls: round(float(np.mean([r["labeled_boxes"].get(cls, 0) for r in final])), 1)
                for cls in doc.get("classes", [])
            }
            if final
            else {},
            "final_test_ap50_mean": {
                cls: _mean(
                    [r["test_per_class_ap50"][cls] for r in final if r.get("test_per_class_ap50")]
                )
                for cls in doc.get("classes", [])
            }
            if final
            else {},
            "savings_mean": s["savings_mean"],
            "savings_min": s["savings_min"],
            "savings_max": s["savings_max"],
            "savings_std": s["savings_std"],
            "savings_mean_over_rounds": s.get("savings_mean_over_rounds"),
            "savings_by_round": s.get("savings_by_round"),
            "savings_at_95pct_ceiling_mean": cs.get("savings_mean"),
            "savings_at_95pct_ceiling_min": cs.get("savings_min"),
            "savings_at_95pct_ceiling_max": cs.get("savings_max"),
            "savings_at_95pct_ceiling_per_seed": cs.get("per_seed"),
            "actions_savings_mean": s.get("actions_savings_mean"),
            "actions_savings_min": s.get("actions_savings_min"),
            "actions_savings_max": s.get("actions_savings_max"),
            "effort": effort.get(name),
            "per_seed": s["per_seed"],
            "curve": s["curve"],
            "rounds_per_seed": {
                str(c["seed"]): [
                    {
                        k: r.get(k)
                        for k in (
                            "round",
                            "labeled",
                            "test_map50",
                            "test_map50_95",
                            "labeled_boxes",
                            "selected_predicted_class",
                            "effort",
                            "actions_total",
                            "train_seconds",
                            "select_seconds",
                        )
                    }
                    for r in c["rounds"]
                ]
                for c in mine
            },
        }
    best95 = {
        n: v["savings_at_95pct_ceiling_mean"]
        for n, v in strategies.items()
        if n != "random" and v["savings_at_95pct_ceiling_mean"] is not None
    }
    return repo_relative(
        {
            "bench": "label_efficiency",
            "dataset": doc.get("dataset"),
            "n_images": doc.get("n_images"),
            "seeds": doc.get("seeds", []),
            "metric": "test_map50",
            "baseline": "random",
            "start": settings.train.describe_start(),
            "strategies": strategies,
            "best_strategy": summary.get("best_strategy"),
            "best_savings_mean": summary.get("best_savings_mean"),
            "ceiling": {k: v for k, v in ceiling.items() if k != "strategies"} or None,
            "best_savings_at_95pct_ceiling": max(best95.values()) if best95 else None,
            "complete": wanted <= done and (not settings.ceiling or bool(ceiling)),
            "curves_done": len(done & wanted),
            "curves_total": len(wanted),
            "settings": doc.get("settings"),
            "curve_wall_seconds": {
                f"{c['strategy']}/s{c['seed']}": c["wall_seconds"] for c in doc["curves"]
            },
            "ceiling_wall_seconds": (doc.get("ceiling") or {}).get("wall_seconds"),
            "elapsed_s_this_run": round(elapsed, 1),
        }
    )


def run_bench(
    settings: ReplaySettings,
    *,
    results: Path,
    work: Path,
    fresh: bool,
    result_doc: Callable[[dict[str, Any], ReplaySettings, float], dict[str, Any]],
    replay_png: Path | None,
    plot: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the replay in ``work`` and write ``results`` (the bench's result document
    from ``result_doc``) after every finished curve; ``plot`` draws the bench's own figure then
    (``replay_png``: the replay's standard figure instead, or None). Returns the final result
    document. The replay's progress goes to stderr; so does anything training prints, as stdout
    carries only the bench's JSON line."""
    started = time.monotonic()
    if settings.train.weights is None:
        print(
            f"no checkpoint at {SHARED_WEIGHTS} and no --weights: every curve trains "
            f"{settings.train.model} from random weights (slower to learn; not the committed "
            "protocol)",
            file=sys.stderr,
        )
    else:
        print(f"every training starts from {settings.train.weights}", file=sys.stderr)
    png_name = results.with_suffix(".png").name

    def on_save(doc: dict[str, Any]) -> None:
        res = result_doc(doc, settings, time.monotonic() - started)
        res["png"] = png_name  # beside this file
        atomic_write_text(results, json.dumps(res, indent=1))
        if plot is not None and doc["curves"]:
            plot(doc)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with contextlib.redirect_stdout(sys.stderr):
        doc = run_replay(
            settings,
            work / "replay.json",
            work_dir=work,
            png=replay_png,
            resume=not fresh,
            log=log,
            on_save=on_save,
        )
    return result_doc(doc, settings, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = sys.stdout
    dataset = neu_det_path(args.dataset)
    suffix = "_smoke" if args.smoke else ""
    results = args.results.resolve() / f"{args.name}{suffix}.json"
    work = args.work or REPO / "bench" / "work" / f"{args.name}{suffix}"
    if not dataset.is_dir():
        error = {"bench": "label_efficiency", "error": f"dataset not found: {dataset}"}
        print(json.dumps(error), file=out)
        return 2
    settings = settings_from(args, dataset)
    res = run_bench(
        settings,
        results=results,
        work=work,
        fresh=args.fresh,
        result_doc=result_doc,
        replay_png=results.with_suffix(".png"),
    )
    line: dict[str, Any] = {
        k: res[k]
        for k in (
            "bench",
            "dataset",
            "seeds",
            "best_strategy",
            "best_savings_mean",
            "best_savings_at_95pct_ceiling",
            "start",
            "complete",
            "curves_done",
            "curves_total",
            "elapsed_s_this_run",
        )
    }
    line["strategies"] = {
        n: {
            "savings_mean": s["savings_mean"],
            "savings_min": s["savings_min"],
            "savings_max": s["savings_max"],
            "savings_mean_over_rounds": s["savings_mean_over_rounds"],
            "savings_at_95pct_ceiling_mean": s["savings_at_95pct_ceiling_mean"],
            "actions_savings_mean": s["actions_savings_mean"],
            "preannotation_savings": (s["effort"] or {}).get("preannotation_savings"),
        }
        for n, s in res["strategies"].items()
    }
    line["ceiling_map50"] = (res["ceiling"] or {}).get("test_map50")
    line["final_map50"] = {
        n: (s["curve"][-1]["map50_mean"] if s["curve"] else None)
        for n, s in res["strategies"].items()
    }
    line["result_file"] = os.path.relpath(results, REPO)
    print(json.dumps(line), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
