"""Label efficiency on NEU-DET: how many labels does a strategy save against random sampling?

Runs the oracle replay (`loop.replay`, the same selection / dataset-version / training code as
the real loop) for random and the compared strategies over several seeds, then reports the label
savings per strategy: ``1 - (labels the strategy needs to reach random's final test mAP50) /
(random's labels at that point)``, seed by seed (same initial set per seed), with mean, min and
max over seeds.

Long (about 2-2.5 hours of both cores with the defaults, see `FULL`): run it in the background;
it saves the replay state after every finished curve and resumes where it stopped::

    nohup .venv/bin/python bench/label_efficiency.py > bench/work/label_efficiency.log 2>&1 &

Writes ``bench/results/label_efficiency.json`` (+ ``.png``) after every curve (``complete`` says
whether all curves are in) and prints ONE JSON line at the end. ``--smoke``: a tiny configuration
(a 160-image subset, 64 px, 1-2 epochs, 1 round, 2 seeds) that writes ``*_smoke`` files instead.

Dataset: ``--dataset``, else ``$DEFECT_LOOP_NEU_DET``, else ``../shared/datasets/neu-det``
relative to the repository root.
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

from loop.config import SelectConfig, SplitConfig, TrainConfig  # noqa: E402
from loop.images import atomic_write_text  # noqa: E402
from loop.replay import ReplaySettings, label_savings, run_replay  # noqa: E402

# Full run: 1,800 NEU-DET images (288 fixed test images), 150 initial + 5 x 100 selected,
# 160 px (NEU-DET is 200 px), 40 epochs from scratch in round 0 (shared by the strategies of a
# seed), then 10-epoch fine-tunes from the previous round. Measured on the 2-core box (shared,
# load 2-3.5): ~34 ms per image-epoch, hybrid selection ~20-30 s a round -> ~2.3 h in all.
FULL: dict[str, Any] = {
    "strategies": "random,entropy,hybrid",
    "seeds": "0,1,2",
    "initial": 150,
    "step": 100,
    "rounds": 5,
    "imgsz": 160,
    "epochs": 40,
    "finetune_epochs": 10,
    "batch": 16,
    "max_images": None,
}
SMOKE: dict[str, Any] = {
    "strategies": "random,entropy,hybrid",
    "seeds": "0,1",
    "initial": 24,
    "step": 12,
    "rounds": 1,
    "imgsz": 64,
    "epochs": 2,
    "finetune_epochs": 1,
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
    p.add_argument("--scratch", action="store_true", help="train from scratch every round")
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


def settings_from(args: argparse.Namespace, dataset: Path) -> ReplaySettings:
    base = SMOKE if args.smoke else FULL
    val: dict[str, Any] = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()
    }
    return ReplaySettings(
        dataset=dataset,
        strategies=tuple(s.strip() for s in str(val["strategies"]).split(",") if s.strip()),
        seeds=tuple(int(s) for s in str(val["seeds"]).split(",") if s.strip()),
        initial=int(val["initial"]),
        step=int(val["step"]),
        rounds=int(val["rounds"]),
        train=TrainConfig(
            model="yolov8n.yaml",
            imgsz=int(val["imgsz"]),
            epochs=int(val["epochs"]),
            finetune_epochs=int(val["finetune_epochs"]),
            batch=int(val["batch"]),
            threads=args.threads,
            warm_start=not args.scratch,
        ),
        select=SelectConfig(strategy="entropy", reduction="max"),
        split=SplitConfig(val=0.15, test=0.15),
        max_images=None if val["max_images"] in (None, "None") else int(val["max_images"]),
        log_mlflow=args.mlflow,
    )


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
    strategies = {}
    for name, s in summary["strategies"].items():
        s95 = strict["strategies"].get(name, {})
        final = [c["rounds"][-1] for c in doc["curves"] if c["strategy"] == name and c["rounds"]]
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
            "savings_mean": s["savings_mean"],
            "savings_min": s["savings_min"],
            "savings_max": s["savings_max"],
            "savings_std": s["savings_std"],
            "savings_mean_over_rounds": s.get("savings_mean_over_rounds"),
            "savings_by_round": s.get("savings_by_round"),
            "per_seed": s["per_seed"],
            "curve": s["curve"],
        }
    return {
        "bench": "label_efficiency",
        "dataset": doc.get("dataset"),
        "n_images": doc.get("n_images"),
        "seeds": doc.get("seeds", []),
        "metric": "test_map50",
        "baseline": "random",
        "strategies": strategies,
        "best_strategy": summary.get("best_strategy"),
        "best_savings_mean": summary.get("best_savings_mean"),
        "complete": wanted <= done,
        "curves_done": len(done & wanted),
        "curves_total": len(wanted),
        "settings": doc.get("settings"),
        "curve_wall_seconds": {
            f"{c['strategy']}/s{c['seed']}": c["wall_seconds"] for c in doc["curves"]
        },
        "elapsed_s_this_run": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = sys.stdout
    dataset = neu_det_path(args.dataset)
    suffix = "_smoke" if args.smoke else ""
    results = args.results.resolve() / f"label_efficiency{suffix}.json"
    png = results.with_suffix(".png")
    work = args.work or REPO / "bench" / "work" / f"label_efficiency{suffix}"
    if not dataset.is_dir():
        error = {"bench": "label_efficiency", "error": f"dataset not found: {dataset}"}
        print(json.dumps(error), file=out)
        return 2
    settings = settings_from(args, dataset)
    started = time.monotonic()

    def on_save(doc: dict[str, Any]) -> None:
        res = result_doc(doc, settings, time.monotonic() - started)
        res["png"] = png.name  # beside this file
        atomic_write_text(results, json.dumps(res, indent=1))

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # Training and MLflow may print; stdout carries only the final JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        doc = run_replay(
            settings,
            work / "replay.json",
            work_dir=work,
            png=png,
            resume=not args.fresh,
            log=log,
            on_save=on_save,
        )
    res = result_doc(doc, settings, time.monotonic() - started)
    line: dict[str, Any] = {
        k: res[k]
        for k in (
            "bench",
            "dataset",
            "seeds",
            "best_strategy",
            "best_savings_mean",
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
        }
        for n, s in res["strategies"].items()
    }
    line["final_map50"] = {
        n: (s["curve"][-1]["map50_mean"] if s["curve"] else None)
        for n, s in res["strategies"].items()
    }
    line["result_file"] = str(results)
    print(json.dumps(line), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
