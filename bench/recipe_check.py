"""Recipe check for the label-efficiency benchmark: how test mAP50 and training time depend on
the epochs and on per-epoch validation, at a few labeled-set sizes, on NEU-DET.

It trains exactly as one replay round does (`loop.replay`: the same seeded random labeled set,
hash-based train/val split, export, `Project.fit` from the COCO-pretrained checkpoint, test
evaluation), once per (labeled images, epochs, validation) cell, and prints ONE JSON line; the
table also goes to ``bench/results/recipe_check.json``. Resumable: finished cells are kept in
``bench/work/recipe_check/cells.json``.

    .venv/bin/python bench/recipe_check.py --sizes 100,400 --epochs 10,20,30
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loop.config import SplitConfig, TrainConfig  # noqa: E402
from loop.datasets import assign_split  # noqa: E402
from loop.images import atomic_write_text  # noqa: E402
from loop.model import prepare_ultralytics  # noqa: E402
from loop.replay import (  # noqa: E402
    ReplaySettings,
    _label,
    _labeled_stats,
    _Newest,
    _seeded_project,
)
from loop.replay_dataset import initial_set, prepare_dataset  # noqa: E402

SHARED_WEIGHTS = REPO.parent / "shared" / "models" / "yolov8n.pt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=None)
    p.add_argument("--sizes", default="100,400", help="labeled images (train + val)")
    p.add_argument("--epochs", default="10,20,30")
    p.add_argument("--val", default="final,every", help="validation: final and/or every epoch")
    p.add_argument("--imgsz", type=int, default=224)
    p.add_argument(
        "--min-iterations", default="0", help="comma-separated train.min_iterations values"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=SHARED_WEIGHTS)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "recipe_check")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    env = os.environ.get("DEFECT_LOOP_NEU_DET")
    dataset = args.dataset or (Path(env) if env else REPO.parent / "shared/datasets/neu-det")
    if not dataset.is_dir() or not Path(args.weights).is_file():
        print(json.dumps({"bench": "recipe_check", "error": "dataset or weights missing"}))
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    cells_path = args.work / "cells.json"
    cells: dict[str, Any] = json.loads(cells_path.read_text()) if cells_path.is_file() else {}
    ds = prepare_dataset(dataset, args.work / "dataset")
    prepare_ultralytics(args.work / "ultralytics", 2)
    with contextlib.redirect_stdout(sys.stderr):
        for n in (int(x) for x in args.sizes.split(",")):
            for epochs, val, floor in itertools.product(
                (int(x) for x in args.epochs.split(",")),
                args.val.split(","),
                (int(x) for x in args.min_iterations.split(",")),
            ):
                key = f"n{n}-e{epochs}-{val}" + (f"-min{floor}" if floor else "")
                if key in cells:
                    continue
                train = TrainConfig(
                    weights=args.weights,
                    imgsz=args.imgsz,
                    epochs=epochs,
                    batch=16,
                    min_iterations=floor,
                    val_every_epoch=val == "every",
                )
                settings = ReplaySettings(
                    dataset=dataset, train=train, split=SplitConfig(val=0.15, test=0.15)
                )
                project, truth, test, rest = _seeded_project(
                    ds, key, args.seed, settings, args.work / "cell"
                )
                chosen = initial_set(
                    rest,
                    functools.partial(assign_split, ratios=project.cfg.split),
                    n,
                    args.seed,
                )
                _label(project, truth, test + chosen)
                t0 = time.monotonic()
                fit = project.fit(_Newest())
                stats = _labeled_stats(fit.version)
                cells[key] = {
                    "labeled": stats["labeled"],
                    "epochs": len(fit.result.epochs),
                    "min_iterations": floor,
                    "validation": val,
                    "seconds": round(time.monotonic() - t0, 1),
                    "test_map50": fit.test.map50,
                    "test_map50_95": fit.test.map50_95,
                    "test_per_class_ap50": fit.test.per_class_ap50,
                }
                atomic_write_text(cells_path, json.dumps(cells, indent=1))
                print(f"{key}: {cells[key]}", file=sys.stderr, flush=True)
    doc = {
        "bench": "recipe_check",
        "dataset": os.path.relpath(dataset, REPO),
        "weights": os.path.relpath(args.weights, REPO),
        "imgsz": args.imgsz,
        "seed": args.seed,
        "cells": cells,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "recipe_check.json", json.dumps(doc, indent=1))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
