"""Train the same dataset version twice with the same config and seed; compare test metrics.

Prints one JSON line: per-metric absolute differences between the two runs and the wall time.
Usage: .venv/bin/python bench/reproducibility.py [--images 200] [--epochs 30] [--imgsz 160]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loop.config import ProjectConfig, TrainConfig
from loop.model import evaluate, train
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_dataset(root / "data", args.images, seed=1, size=args.imgsz)
        cfg = ProjectConfig(classes=list(SYNTH_CLASSES), workspace=root / "ws")
        project = Project(cfg)
        _, version = project.ingest(root / "data" / "images", root / "data" / "labels")
        if version is None:
            raise SystemExit("no labels were imported")
        data_yaml = project.export(version)
        tcfg = TrainConfig(imgsz=args.imgsz, epochs=args.epochs, batch=8, seed=args.seed)
        runs = []
        t0 = time.monotonic()
        for name in ("a", "b"):
            run = train(data_yaml, root / "runs", tcfg, cfg.yolo_config_dir, name=name)
            runs.append(
                evaluate(
                    run.weights,
                    data_yaml,
                    "test",
                    args.imgsz,
                    cfg.yolo_config_dir,
                    list(cfg.classes),
                )
            )
        a, b = runs
        diffs = {
            f: abs(getattr(a, f) - getattr(b, f))
            for f in ("map50", "map50_95", "precision", "recall")
        }
        per_class = max(abs(a.per_class_ap50_95[c] - b.per_class_ap50_95[c]) for c in cfg.classes)
        print(
            json.dumps(
                {
                    "bench": "reproducibility",
                    "images": args.images,
                    "epochs": args.epochs,
                    "imgsz": args.imgsz,
                    "test_map50": a.map50,
                    "test_map50_95": a.map50_95,
                    "abs_diff": diffs,
                    "max_abs_diff_per_class_ap50_95": per_class,
                    "confusion_matrix_equal": a.confusion_matrix == b.confusion_matrix,
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
