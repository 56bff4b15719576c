"""The root `defect-loop` app: the commands of one cycle (init, ingest, train, score, push, pull,
cycle, status, rejections, label-from-truth) and the registration of every command group.

The groups live in their own modules of this package (`loop.cli.datasets`, `loop.cli.deploy`,
...); what they share is in `loop.cli.common`. This package is the only part of `loop` that may
import `flows` (and with it Prefect): each command checks its preconditions, then runs a flow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loop.cli.common import (
    ConfigOpt,
    console,
    jsonable,
    load,
    prepare,
    print_consensus,
    print_cycle,
    require_writable,
    run,
    safe,
)
from loop.cli.datasets import datasets_app
from loop.cli.demo import demo
from loop.cli.deploy import deploy_app, monitor_app
from loop.cli.labelstudio import ls_app
from loop.cli.report import report
from loop.cli.review import review_labels
from loop.cli.serve import prefect_server_app, serve
from loop.cli.services import services_app
from loop.cli.sim import import_app, simulate
from loop.config import DEFAULT_CONFIG_NAME, TaskType, write_default_config
from loop.errors import ConfigError

app = typer.Typer(
    help="defect-loop: an active-learning labeling loop for surface-defect detection.\n\n"
    "A cycle pulls corrected labels from Label Studio, trains a YOLO model, scores the "
    "unlabeled pool by uncertainty and pushes the most valuable images back as pre-annotated tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def init(
    classes: Annotated[str, typer.Option(help="comma-separated class names, in id order")],
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    name: Annotated[str, typer.Option(help="project name")] = "defect-loop",
    weights: Annotated[
        Path | None,
        typer.Option(
            help="local .pt checkpoint the first training starts from (later rounds fine-tune the "
            "champion), e.g. Ultralytics' "
            "COCO-pretrained yolov8n.pt (its sha256 is pinned in the YAML); nothing is downloaded",
            envvar="DEFECT_LOOP_TRAIN__WEIGHTS",
        ),
    ] = None,
    task: Annotated[
        TaskType,
        typer.Option(help="detect (boxes) or segment (instance polygons); chosen once per project"),
    ] = "detect",
) -> None:
    """Write a starter project YAML."""
    names = [c.strip() for c in classes.split(",") if c.strip()]
    train = run(lambda: write_default_config(config, names, name, weights, task))
    console.print(f"wrote {config}; task: {task}; classes: {names}")
    if weights is None:
        console.print(
            "[yellow]no --weights given:[/] models will train from yolov8n.yaml with random "
            "weights, which needs far more labels and epochs to detect anything. Pass "
            "--weights /path/to/yolov8n.pt (a local copy of Ultralytics' COCO checkpoint) or set "
            "train.weights in the YAML."
        )
    else:
        console.print(
            f"training starts from {weights} (sha256 {train.weights_sha256}), "
            f"{train.epochs} epochs a round"
        )


@app.command()
def ingest(
    source: Annotated[Path, typer.Argument(help="folder (or file) of images")],
    labels: Annotated[
        Path | None, typer.Option(help="folder of YOLO .txt labels named like the images")
    ] = None,
    label_limit: Annotated[
        int | None, typer.Option(help="import only this many labels (seeded random)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for --label-limit")] = 0,
    pose: Annotated[
        bool,
        typer.Option(
            "--pose",
            help="with --labels: the files hold Ultralytics pose lines (cls cx cy w h, then "
            "x y v per keypoint in the order of the config's keypoints:), as `datasets export "
            "--pose` writes them",
        ),
    ] = False,
    masks: Annotated[
        bool,
        typer.Option(
            "--masks",
            help="import mask PNGs as labels: <stem>.png beside each image <stem>.<ext> "
            "(e.g. magnetic-tile); each connected region becomes one instance of the class of "
            "the image's top folder",
        ),
    ] = False,
    folder_class: Annotated[
        list[str] | None,
        typer.Option(
            help="with --masks: FOLDER=CLASS, the class of the masks under a top folder "
            "(repeat it; default: the class named like the folder)"
        ),
    ] = None,
    mask_threshold: Annotated[
        float, typer.Option(help="with --masks: a pixel is defect at this value or above")
    ] = 128,
    min_area: Annotated[
        int, typer.Option(min=1, help="with --masks: smaller regions (pixels) are dropped, listed")
    ] = 4,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Add images to the pool (bad files are skipped with a reason); optionally import labels
    (YOLO .txt with --labels, or mask PNGs with --masks)."""
    from loop.images import iter_image_files
    from loop.mask_import import pair_mask_files, parse_folder_classes
    from loop.project import Project

    def go() -> None:
        cfg = load(config)
        require_writable(cfg)
        if masks and (labels is not None or label_limit is not None):
            raise ConfigError("--masks imports the masks beside the images: drop --labels")
        if pose and labels is None:
            raise ConfigError("--pose reads the label files of --labels: pass --labels DIR")
        project = Project(cfg)
        project.on_wait = lambda holder: console.print(
            f"[yellow]waiting[/] for the workspace: {safe(holder)} is writing it"
        )
        files = list(iter_image_files(source)) if source.exists() else []
        total = len(pair_mask_files(files).images) if masks else len(files)
        with _progress() as prog:
            bar = prog.add_task("ingest", total=total)
            if masks:
                report, version = project.ingest_masks(
                    source,
                    parse_folder_classes(folder_class or [], cfg.classes),
                    mask_threshold,
                    min_area,
                    on_progress=lambda _p: prog.advance(bar),
                )
            else:
                report, version = project.ingest(
                    source,
                    labels,
                    label_limit,
                    seed,
                    on_progress=lambda _p: prog.advance(bar),
                    pose=pose,
                )
        console.print(f"ingest: {report.summary}; pool now {len(project.pool)} images")
        for what, problems in (
            ("skipped", report.rejected),
            ("label", report.label_problems),
            ("dropped", report.dropped_regions),
        ):
            for r in problems[:20]:
                console.print(f"  [yellow]{what}[/] {safe(r.source)}: {safe(r.reason)}")
            if len(problems) > 20:
                console.print(f"  ... {len(problems) - 20} more (see `defect-loop status`)")
        if version is not None:
            console.print(f"labels: dataset version {version.short} ({len(version)} images)")

    run(go)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@app.command()
def train(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Train on the current dataset version, evaluate on the test split, log to MLflow."""

    def go() -> None:
        prepare(load(config), mlflow=True)
        from flows.train import train_flow

        out = train_flow(str(config))
        console.print_json(json.dumps(jsonable(out)))

    run(go)


@app.command()
def score(
    top: Annotated[int, typer.Option(help="rows to print")] = 20,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Rank the unlabeled pool with the champion model (prints the top).

    The model runs through `scoring.backend` (torch, onnx or onnx-int8), e.g.
    DEFECT_LOOP_SCORING__BACKEND=onnx-int8 defect-loop score. The priority column is the
    strategy's score for a scorer (entropy, margin, ...); for a set selector (diversity, hybrid,
    class_quota, class_diversity) it is rank-based: 1 for its first pick.
    """

    def go() -> None:
        prepare(load(config), mlflow=True)
        from flows.score import score_flow

        ranked = score_flow(str(config))
        table = Table("rank", "image", "priority", "boxes shown")
        for i, s in enumerate(ranked[:top], start=1):
            table.add_row(str(i), s.sha256[:12], f"{s.score:.4f}", str(len(s.detections)))
        console.print(table)

    run(go)


@app.command()
def push(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Score the pool and push the top batch to Label Studio with pre-annotations."""

    def go() -> None:
        prepare(load(config), labelstudio=True, mlflow=True)
        from flows.sync import push_flow

        summary = push_flow(str(config))
        console.print(
            f"push: {summary.created} created, {summary.skipped} skipped, {summary.failed} failed"
            + (f", {len(summary.overlap)} for several annotators" if summary.overlap else "")
        )

    run(go)


@app.command()
def pull(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Pull submitted annotations from Label Studio into a new dataset version.

    Tasks that cannot be used (malformed, tampered, unknown label, ...) are listed with the
    reason, and stay listed (`defect-loop rejections`, `status`) until they change."""

    def go() -> None:
        prepare(load(config), labelstudio=True)
        from flows.sync import pull_flow

        out = pull_flow(str(config))
        earlier = out.open_rejections - len(out.rejected)
        console.print(
            f"pull: {out.labeled} labeled images, new version {out.new_version or 'none'}, "
            f"{len(out.rejected)} left for review"
            + (f" ({earlier} more from earlier pulls: `defect-loop rejections`)" if earlier else "")
        )
        for r in out.rejected:
            console.print(f"  [yellow]review[/] {safe(r)}")
        print_consensus(out)

    run(go)


@app.command()
def cycle(
    no_pull: Annotated[
        bool, typer.Option("--no-pull", help="skip pulling from Label Studio")
    ] = False,
    force_train: Annotated[
        bool, typer.Option(help="train even if the labels did not change")
    ] = False,
    review_labels: Annotated[
        bool,
        typer.Option(
            "--review-labels",
            help="end with `review-labels`: push the suspect labels of the current version as "
            "review tasks (costs label_review.folds trainings per new version; also "
            "label_review.every_cycle)",
        ),
    ] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """One cycle: pull -> train -> promote -> score -> push (-> review-labels)."""

    def go() -> None:
        prepare(load(config), labelstudio=True, mlflow=True)
        from flows.cycle import cycle_flow

        out = cycle_flow(
            str(config), pull=not no_pull, force_train=force_train, review_labels=review_labels
        )
        print_cycle(out)

    run(go)


@app.command()
def status(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Pool, labels, round, pending tasks, the test split (size, interval width, warnings),
    skipped files and rejected Label Studio tasks."""
    from loop.project import Project

    def go() -> None:
        console.print_json(json.dumps(Project(load(config)).status()))

    run(go)


@app.command()
def rejections(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """List the Label Studio tasks that pulls rejected and that have not changed since, with
    the reason and a link: fix or delete them in Label Studio, and the next pull judges them
    again."""
    from loop.project import Project

    def go() -> None:
        cfg = load(config)
        rows = Project(cfg).rejections()
        if not rows:
            console.print("no rejected Label Studio tasks")
            return
        base = cfg.labelstudio.url.rstrip("/")
        table = Table("task", "since", "reason", "open in Label Studio")
        for r in rows:
            link = f"{base}/projects/{r.project_id}/data?task={r.task_id}"
            table.add_row(str(r.task_id), r.first_seen, safe(r.reason), safe(link))
        console.print(table)
        console.print(f"{len(rows)} rejected tasks")

    run(go)


@app.command("label-from-truth")
def label_from_truth(
    truth: Annotated[Path, typer.Argument(help="folder of YOLO .txt ground-truth labels")],
    limit: Annotated[int | None, typer.Option(help="answer at most this many tasks")] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Simulated labeler: answer open Label Studio tasks from ground truth (demo and tests)."""
    from loop.project import Project
    from loop.simulate import answer_open_tasks, truth_from_yolo_dir

    def go() -> None:
        project = Project(load(config))
        gw = project.gateway()
        pid = project.ensure_ls_project(gw)
        gt = truth_from_yolo_dir(project.pool, truth, len(project.cfg.classes))
        n = answer_open_tasks(gw, pid, gt, list(project.cfg.classes), limit=limit)
        console.print(f"simulated labeler answered {n} tasks")

    run(go)


app.add_typer(services_app, name="services")
app.command("demo")(demo)
app.add_typer(datasets_app, name="datasets")
app.command("report")(report)
app.command("review-labels")(review_labels)
app.add_typer(ls_app, name="labelstudio")
app.command("serve")(serve)
app.add_typer(prefect_server_app, name="prefect-server")
app.command("simulate")(simulate)
app.add_typer(import_app, name="import")
app.add_typer(deploy_app, name="deploy")
app.add_typer(monitor_app, name="monitor")
