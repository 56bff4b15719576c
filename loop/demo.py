"""`defect-loop demo`: a synthetic project, a local Label Studio and one (or three) cycles."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from loop.config import load_config
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset

DEMO_SEED = 7


def write_demo_config(path: Path, port: int) -> None:
    doc = {
        "name": "demo",
        "classes": list(SYNTH_CLASSES),
        "workspace": "workspace",
        "guidelines": (
            "Draw a tight box around every scratch, pit, crack and patch. "
            "Correct the model's suggested boxes: move or resize them, fix the class, delete wrong "
            "ones and add missed defects. If there is no defect, submit with no regions: that "
            "marks a defect-free image."
        ),
        "labelstudio": {"url": f"http://127.0.0.1:{port}"},
        "train": {
            "model": "yolov8n.yaml",
            "imgsz": 160,
            "epochs": 40,
            "finetune_epochs": 15,
            "batch": 8,
        },
        "select": {"strategy": "entropy", "reduction": "max", "batch_size": 24},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_demo(
    directory: Path, *, auto: bool, n_images: int, n_seed: int, port: int, console: Any
) -> None:
    """Everything `make demo` does. Re-running reuses what exists (data, labels, server)."""
    from loop.cli import _prefect_env, _print_cycle, _service
    from loop.simulate import answer_open_tasks, truth_from_yolo_dir

    t0 = time.monotonic()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    synth = directory / "synthetic"
    if not (synth / "classes.txt").exists():
        console.print(f"generating {n_images} synthetic defect images in {synth}")
        write_dataset(synth, n_images, seed=DEMO_SEED, size=160)
    cfg_path = directory / "defect-loop.yaml"
    if not cfg_path.exists():
        write_demo_config(cfg_path, port)
    cfg = load_config(cfg_path)
    svc, creds = _service(cfg)
    console.print("starting Label Studio (the first start installs it and migrates: ~1-2 min)")
    svc.ensure_installed()
    svc.start(timeout_s=300)
    os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = creds.api_token
    cfg = load_config(cfg_path)
    project = Project(cfg)
    if project.current_version() is None:
        report, version = project.ingest(
            synth / "images", synth / "labels", label_limit=n_seed, seed=DEMO_SEED
        )
        console.print(f"ingest: {report.summary}; seed labels: {version and len(version)} images")
    _prefect_env(cfg)
    from flows.cycle import cycle_flow

    console.print("cycle 1: train -> score -> push")
    out = cycle_flow(str(cfg_path), pull=True)
    _print_cycle(out)
    if auto:
        for i in (2, 3):
            project = Project(load_config(cfg_path))
            gw = project.gateway()
            pid = project.ensure_ls_project(gw)
            truth = truth_from_yolo_dir(project.pool, synth / "labels", len(cfg.classes))
            n = answer_open_tasks(gw, pid, truth, list(cfg.classes))
            console.print(f"simulated labeler answered {n} tasks")
            console.print(f"cycle {i}: pull -> train -> score -> push")
            out = cycle_flow(str(cfg_path), pull=True)
            _print_cycle(out)
    project = Project(load_config(cfg_path))
    queued = len(project.state.pending)
    console.rule("defect-loop demo ready")
    console.print(f"Label Studio:  {svc.url}  (login {creds.username} / {creds.password})")
    console.print(
        f"Project:       {cfg.ls_project_title}  ({queued} tasks queued, most valuable first)"
    )
    report_files = getattr(out, "report", None)
    if report_files is not None:
        console.print(f"Report:        {report_files[0]}  (also in MLflow: run artifacts report/)")
    console.print(
        f"MLflow:        {cfg.mlflow_uri}  (mlflow ui --backend-store-uri {cfg.mlflow_uri})"
    )
    console.print(f"Took {time.monotonic() - t0:.0f}s. Next:")
    console.print(
        f"  correct the tasks in Label Studio, then: .venv/bin/defect-loop cycle -c {cfg_path}"
    )
    console.print(
        f"  stop Label Studio:                     .venv/bin/defect-loop services down -c {cfg_path}"
    )
