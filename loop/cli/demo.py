"""`defect-loop demo`: a synthetic project, a local Label Studio and one (or three) cycles."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from loop.cli.common import console, labelstudio_service, prefect_env, print_cycle, run
from loop.config import TrainConfig, load_config
from loop.project import Project
from loop.synth import SYNTH_CLASSES, write_dataset

DEMO_SEED = 7
# The demo (and only the demo) looks for the COCO checkpoint where this workplace keeps it:
# ../shared/models beside the repository. Users name their own checkpoint in train.weights.
SHARED_WEIGHTS = Path(__file__).resolve().parents[3] / "shared" / "models" / "yolov8n.pt"


def demo_weights(given: Path | None) -> Path | None:
    """``given`` (which must exist), else the shared COCO checkpoint when present, else None."""
    if given is not None:
        return Path(given).expanduser().resolve()
    return SHARED_WEIGHTS if SHARED_WEIGHTS.is_file() else None


def write_demo_config(path: Path, port: int, weights: Path | None = None) -> None:
    """The demo project's YAML. With ``weights`` every round fine-tunes that checkpoint (its
    sha256 pinned) for 20 epochs; without, yolov8n.yaml trains from random weights (40 epochs,
    then 15-epoch fine-tunes of the champion)."""
    start = None if weights is None else TrainConfig(weights=weights).start_checkpoint()
    if start is not None:
        train: dict[str, Any] = {
            "model": "yolov8n.yaml",
            "weights": str(start.path),
            "weights_sha256": start.sha256,
            "init": "pretrained",
            "imgsz": 160,
            "epochs": 20,
            "batch": 8,
        }
    else:
        train = {
            "model": "yolov8n.yaml",
            "init": "champion",
            "imgsz": 160,
            "epochs": 40,
            "finetune_epochs": 15,
            "batch": 8,
        }
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
        "train": train,
        "select": {"strategy": "entropy", "reduction": "max", "batch_size": 24},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_demo(
    directory: Path,
    *,
    auto: bool,
    n_images: int,
    n_seed: int,
    port: int,
    console: Any,
    weights: Path | None = None,
) -> None:
    """Everything `make demo` does. Re-running reuses what exists (data, labels, server)."""
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
        start = demo_weights(weights)
        if start is None:
            console.print(
                f"[yellow]no checkpoint at {SHARED_WEIGHTS}[/] (and no --weights): the demo "
                "trains yolov8n.yaml from random weights, which shows mAP 0 for its first "
                "~10 epochs. Pass --weights /path/to/yolov8n.pt to start from COCO."
            )
        else:
            console.print(f"models start from the COCO-pretrained checkpoint {start}")
        write_demo_config(cfg_path, port, start)
    cfg = load_config(cfg_path)
    svc, creds = labelstudio_service(cfg)
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
    prefect_env(cfg)
    from flows.cycle import cycle_flow

    console.print("cycle 1: train -> score -> push")
    out = cycle_flow(str(cfg_path), pull=True)
    print_cycle(out)
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
            print_cycle(out)
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


def demo(
    auto: Annotated[
        bool, typer.Option(help="a simulated labeler answers; run two full cycles unattended")
    ] = False,
    directory: Annotated[Path, typer.Option("--dir", help="where the demo project lives")] = Path(
        "demo"
    ),
    images: Annotated[int, typer.Option(help="synthetic images to generate")] = 300,
    seed_labels: Annotated[int, typer.Option(help="images labeled before the first cycle")] = 120,
    port: Annotated[int, typer.Option(help="Label Studio port")] = 8080,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="checkpoint to start from (default: ../shared/models/yolov8n.pt beside the "
            "repository, when present)"
        ),
    ] = None,
) -> None:
    """Generate a synthetic defect dataset, start Label Studio and run the loop on it."""
    run(
        lambda: run_demo(
            directory,
            auto=auto,
            n_images=images,
            n_seed=seed_labels,
            port=port,
            console=console,
            weights=weights,
        )
    )
