"""`defect-loop simulate` (oracle replay) and `defect-loop import voc` (Pascal VOC folders).

Registered on the main app in `loop.cli.main` by ``app.command("simulate")(simulate)`` and
``app.add_typer(import_app, name="import")``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from loop.cli.common import ConfigOpt, console, run
from loop.config import (
    DEFAULT_CONFIG_NAME,
    TASK_TYPES,
    SelectConfig,
    SplitConfig,
    TrainConfig,
    load_config,
)
from loop.errors import ConfigError

import_app = typer.Typer(
    help="Import labeled datasets from other annotation formats.", no_args_is_help=True
)


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} must list at least one value")
    return items


@import_app.command("voc")
def import_voc(
    directory: Annotated[
        Path, typer.Argument(help="Pascal VOC folder: annotations/ (or Annotations/) + images/")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="write a YOLO folder (images/, labels/, classes.txt) here instead"),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(help="class order for --out, comma-separated (default: sorted names)"),
    ] = None,
    label_limit: Annotated[
        int | None, typer.Option(help="import only this many labels (seeded random)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for --label-limit")] = 0,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Import a Pascal VOC dataset: into the project (pool + a dataset version) or, with --out,
    as a YOLO folder. Annotations match images by file stem; classes come from <name>;
    <difficult> boxes are kept."""
    from loop.formats.voc import read_voc_folder, write_yolo_folder

    def go() -> None:
        folder = read_voc_folder(directory)
        counts = folder.boxes_per_class()
        console.print(
            f"VOC {directory}: {len(folder.items)} annotated images, {folder.n_boxes} boxes "
            f"({folder.n_difficult} difficult, kept) in {len(folder.classes)} classes: "
            + ", ".join(f"{c} {n}" for c, n in counts.items())
        )
        for what, paths in (
            ("annotations without an image", folder.missing_image),
            ("images without an annotation", folder.unannotated),
            ("annotations whose <size> differs from the image (image wins)", folder.size_mismatch),
        ):
            if paths:
                names = ", ".join(p.name for p in paths[:5])
                more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
                console.print(f"  [yellow]{len(paths)} {what}[/]: {names}{more}")
        if out is not None:
            order = _csv(classes, "classes") if classes else folder.classes
            write_yolo_folder(folder, out, order)
            console.print(f"wrote YOLO folder {out} (classes: {order})")
            return
        from loop.project import Project

        cfg = load_config(config)
        project = Project(cfg)
        with tempfile.TemporaryDirectory(prefix="defect-loop-voc-") as tmp:
            # Labels as YOLO text under the project's class ids; unknown names raise here.
            yolo = write_yolo_folder(folder, Path(tmp), list(cfg.classes))
            report, version = project.ingest(
                folder.images_dir, yolo / "labels", label_limit=label_limit, seed=seed
            )
        console.print(f"ingest: {report.summary}; pool now {len(project.pool)} images")
        if version is not None:
            console.print(f"labels: dataset version {version.short} ({len(version)} images)")

    run(go)


def _mask_classes(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    """``["FOLDER=CLASS", ...]`` -> ``((folder, class), ...)`` in the order given (the class
    order); `loop.mask_import.parse_folder_classes` checks the pairs."""
    from loop.mask_import import parse_folder_classes

    classes = list(dict.fromkeys(p.partition("=")[2].strip() for p in pairs))
    return tuple(parse_folder_classes(pairs, classes).items())


def simulate(
    dataset: Annotated[
        Path, typer.Argument(help="fully labeled dataset: YOLO folder or Pascal VOC folder")
    ],
    strategies: Annotated[
        str, typer.Option(help="comma-separated strategy names")
    ] = "random,entropy,hybrid",
    initial: Annotated[int, typer.Option(help="random labeled images before round 1")] = 100,
    step: Annotated[int, typer.Option(help="images labeled per round")] = 100,
    rounds: Annotated[int, typer.Option(help="select -> label -> train rounds")] = 5,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    weights: Annotated[
        Path | None,
        typer.Option(help="local .pt checkpoint every training starts from (e.g. yolov8n.pt)"),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="'pretrained': every round starts from --weights (or --model); "
            "'champion': fine-tune the previous round"
        ),
    ] = None,
    imgsz: Annotated[int | None, typer.Option(help="training/inference size (px)")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs of a training")] = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="epochs of a fine-tune (--init champion)")
    ] = None,
    min_iterations: Annotated[
        int | None, typer.Option(help="optimizer steps a small label set trains at least")
    ] = None,
    model: Annotated[str | None, typer.Option(help="architecture YAML, e.g. yolov8n.yaml")] = None,
    batch: Annotated[int | None, typer.Option(help="training batch size")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    max_images: Annotated[
        int | None, typer.Option(help="use a seeded random subset of the dataset")
    ] = None,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("replay"),
    mlflow: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="log to MLflow (sqlite in --out)")
    ] = True,
    resume: Annotated[
        bool, typer.Option("--resume/--fresh", help="keep finished curves of the same settings")
    ] = True,
    keep_work: Annotated[bool, typer.Option(help="keep each curve's workspace")] = False,
    task: Annotated[
        str | None,
        typer.Option(
            help="'detect' (boxes, the default) or 'segment' (instance masks: DATASET is a mask-PNG "
            "folder, e.g. magnetic-tile; polygon labels, the segmentation model, savings on mask "
            "mAP50); default: the --config's task"
        ),
    ] = None,
    folder_class: Annotated[
        list[str] | None,
        typer.Option(
            help="with --task segment: FOLDER=CLASS, the class of the masks under a top folder of "
            "DATASET (repeat it, one per defect folder; classes in the order given; folders "
            "not named, e.g. MT_Free, hold defect-free images)"
        ),
    ] = None,
    mask_threshold: Annotated[
        float, typer.Option(help="with --task segment: a pixel is defect at this value or above")
    ] = 128,
    min_area: Annotated[
        int,
        typer.Option(min=1, help="with --task segment: smaller mask regions (pixels) are dropped"),
    ] = 4,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="take train/select/split defaults from this YAML"),
    ] = None,
) -> None:
    """Oracle replay: run the loop on a fully labeled dataset with ground truth as the labeler
    and compare strategies by learning curves (writes replay.json and replay.png in --out).

    Boxes: DATASET is a YOLO or Pascal VOC folder. Masks (--task segment): DATASET is a folder of
    images with a <stem>.png mask beside each, classes from --folder-class, e.g.
    `defect-loop simulate magnetic-tile --task segment --folder-class MT_Crack=crack ...`."""
    from loop.replay import ReplaySettings, run_replay

    def go() -> None:
        if config is not None:
            cfg = load_config(config)
            train, select, split = cfg.train, cfg.select, cfg.split
            kind = task or cfg.task
        else:
            train = TrainConfig(imgsz=224, epochs=15, min_iterations=300)
            select, split = SelectConfig(), SplitConfig()
            kind = task or "detect"
        task_type = next((t for t in TASK_TYPES if t == kind), None)
        if task_type is None:
            raise ConfigError(f"--task must be one of {list(TASK_TYPES)}, got {kind!r}")
        mask_classes = _mask_classes(folder_class or [])
        if task_type == "segment" and not mask_classes:
            raise ConfigError(
                "--task segment replays a mask-PNG folder: name each defect folder's class with "
                "--folder-class FOLDER=CLASS (e.g. --folder-class MT_Crack=crack)"
            )
        if task_type != "segment" and mask_classes:
            raise ConfigError("--folder-class maps mask folders: add --task segment")
        overrides = {
            "weights": None if weights is None else weights.expanduser().resolve(),
            "init": init,
            "imgsz": imgsz,
            "epochs": epochs,
            "finetune_epochs": finetune_epochs,
            "min_iterations": min_iterations,
            "model": model,
            "batch": batch,
            "threads": threads,
        }
        try:
            train = TrainConfig(
                **{**train.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
            )
        except ValidationError as exc:
            raise ConfigError(f"invalid training options:\n{exc}") from None
        start = train.start_checkpoint()
        console.print(
            f"every training starts from {start.path}"
            if start is not None
            else f"[yellow]no --weights:[/] every training starts from {train.model} "
            "(random weights)"
        )
        try:
            seed_list = tuple(int(s) for s in _csv(seeds, "seeds"))
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        settings = ReplaySettings(
            dataset=dataset,
            strategies=tuple(_csv(strategies, "strategies")),
            seeds=seed_list,
            initial=initial,
            step=step,
            rounds=rounds,
            train=train,
            select=select,
            split=split,
            max_images=max_images,
            log_mlflow=mlflow,
            keep_work=keep_work,
            task=task_type,
            mask_classes=mask_classes,
            mask_threshold=mask_threshold,
            mask_min_area=min_area,
        )
        doc = run_replay(
            settings,
            out / "replay.json",
            png=out / "replay.png",
            resume=resume,
            log=lambda m: console.print(m),
        )
        summary = doc.get("summary")
        console.print(f"wrote {out / 'replay.json'} and {out / 'replay.png'}")
        if summary:
            for name, s in summary["strategies"].items():
                mean = s["savings_mean"]
                console.print(
                    f"  {name}: label savings vs random "
                    + ("n/a" if mean is None else f"{mean:+.1%} (min {s['savings_min']:+.1%})")
                )

    run(go)
