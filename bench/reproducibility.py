"""Train the same dataset version twice, each in a fresh process, with the same config and seed;
compare the test metrics of the two models.

Prints one JSON line: per-metric absolute differences between the two runs and the wall time.
Usage: .venv/bin/python bench/reproducibility.py [--images 200] [--epochs 30] [--imgsz 160]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loop.config import ProjectConfig, TrainConfig
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset

FIELDS = ("map50", "map50_95", "precision", "recall")


def train_once(root: Path, data_yaml: Path, name: str, args: argparse.Namespace) -> dict:
    """One training + test evaluation; runs in its own process (see ``--one``)."""
    from loop.model import evaluate, train

    cfg = ProjectConfig(classes=list(SYNTH_CLASSES), workspace=root / "ws")
    tcfg = TrainConfig(imgsz=args.imgsz, epochs=args.epochs, batch=8, seed=args.seed)
    run = train(data_yaml, root / "runs", tcfg, cfg.paths.yolo_config, name=name)
    ev = evaluate(run.weights, data_yaml, "test", args.imgsz, cfg.paths.yolo_config, cfg.classes)
    return {
        **{f: getattr(ev, f) for f in FIELDS},
        "per_class_ap50_95": ev.per_class_ap50_95,
        "confusion_matrix": ev.confusion_matrix,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", nargs=3, metavar=("ROOT", "DATA_YAML", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        root, data_yaml, name = args.one
        print(json.dumps(train_once(Path(root), Path(data_yaml), name, args)))
        return
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_dataset(root / "data", args.images, seed=1, size=args.imgsz)
        cfg = ProjectConfig(classes=list(SYNTH_CLASSES), workspace=root / "ws")
        project = Project(cfg)
        _, version = project.ingest(root / "data" / "images", root / "data" / "labels")
        if version is None:
            raise SystemExit("no labels were imported")
        data_yaml = project.export(version)
        t0 = time.monotonic()
        runs = []
        for name in ("a", "b"):
            cmd = [sys.executable, __file__, "--one", str(root), str(data_yaml), name]
            for flag in ("images", "epochs", "imgsz", "seed"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        a, b = runs
        print(
            json.dumps(
                {
                    "bench": "reproducibility",
                    "processes": "one fresh process per training",
                    "images": args.images,
                    "epochs": args.epochs,
                    "imgsz": args.imgsz,
                    "test_map50": [a["map50"], b["map50"]],
                    "test_map50_95": [a["map50_95"], b["map50_95"]],
                    "abs_diff": {f: abs(a[f] - b[f]) for f in FIELDS},
                    "max_abs_diff_per_class_ap50_95": max(
                        abs(a["per_class_ap50_95"][c] - b["per_class_ap50_95"][c])
                        for c in SYNTH_CLASSES
                    ),
                    "confusion_matrix_equal": a["confusion_matrix"] == b["confusion_matrix"],
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
