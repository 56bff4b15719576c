"""`defect-loop datasets ...`: list, show, diff and export the project's dataset versions;
``add-test`` grows the test split with labeled images.

Registered on the main app by ``app.add_typer(datasets_app, name="datasets")`` in
`loop.cli.main`.
Reads only the workspace's dataset store (no MLflow, no Label Studio); ``add-test`` also adds
images to the pool and writes a new version.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from loop.cli.common import ConfigOpt, run
from loop.config import DEFAULT_CONFIG_NAME, load_config
from loop.dataset_diff import diff_versions
from loop.datasets import SPLITS, DatasetStore, export_yolo
from loop.errors import DatasetError

datasets_app = typer.Typer(
    help="Inspect and export dataset versions (immutable, content-addressed label sets).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
VersionArg = Annotated[str, typer.Argument(help="digest or a unique prefix (>= 6 hex characters)")]


def _store(config: Path) -> tuple[Any, DatasetStore]:
    from loop.project import Project

    project = Project(load_config(config))
    return project, project.store


def _short(digest: object) -> str:
    return str(digest)[:12] if digest else "-"


def _splits(counts: Any) -> str:
    return "/".join(str(counts.get(s, 0)) for s in SPLITS)


@datasets_app.command("list")
def list_versions(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME), as_json: JsonOpt = False) -> None:
    """List dataset versions, oldest first; `*` marks the project's current version."""

    def go() -> None:
        project, store = _store(config)
        metas = store.list()
        current = project.state.current_version
        if as_json:
            typer.echo(json.dumps([{**m, "current": m["digest"] == current} for m in metas]))
            return
        if not metas:
            typer.echo("no dataset versions yet: `defect-loop ingest DIR --labels LABELS`")
            return
        typer.echo(f"  {'digest':<12}  {'created':<25}  {'parent':<12}  {'images':>6}  splits")
        for m in metas:
            mark = "*" if m["digest"] == current else " "
            typer.echo(
                f"{mark} {_short(m['digest']):<12}  {m['created_at']:<25}  "
                f"{_short(m.get('parent')):<12}  {m['n_images']:>6}  "
                f"{_splits(m['splits'])} (train/val/test)"
            )

    run(go)


@datasets_app.command()
def show(
    version: VersionArg,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    as_json: JsonOpt = False,
) -> None:
    """Show one version: digest, parent, classes, splits, boxes (and polygons) per class,
    provenance."""

    def go() -> None:
        _, store = _store(config)
        v = store.load(version)
        defect_free = sum(1 for r in v.rows if len(r.boxes) == 0)
        sources = Counter(r.provenance.get("source", "?") for r in v.rows)
        info: dict[str, Any] = {
            "digest": v.digest,
            "parent": v.parent,
            "created_at": v.created_at,
            "classes": list(v.classes),
            "n_images": len(v),
            "defect_free_images": defect_free,
            "splits": v.split_counts(),
            "class_counts": v.class_counts(),
            "test_split_digest": v.split_digest("test"),
            "label_sources": dict(sorted(sources.items())),
            "path": str(store.path(v.digest)),
        }
        masks = v.mask_counts() if v.has_polygons else None
        if masks is not None:
            info["mask_counts"] = masks
        if v.has_keypoints:
            info["keypoint_counts"] = v.keypoint_counts()
        if as_json:
            typer.echo(json.dumps(info, indent=1))
            return
        typer.echo(f"digest:      {v.digest}")
        typer.echo(f"parent:      {v.parent or '-'}")
        typer.echo(f"created:     {v.created_at}")
        typer.echo(f"images:      {len(v)} ({defect_free} defect-free)")
        splits = v.split_counts()
        typer.echo("splits:      " + ", ".join(f"{s} {splits[s]}" for s in SPLITS))
        typer.echo(f"test split:  {info['test_split_digest'][:12]}")
        typer.echo("sources:     " + ", ".join(f"{k} {n}" for k, n in sorted(sources.items())))
        typer.echo(f"stored in:   {info['path']}")
        counts = v.class_counts()
        width = max([5, *(len(c) for c in v.classes)])
        if masks is None:
            typer.echo(f"\n{'class':<{width}}  {'boxes':>7}")
            for c in v.classes:
                typer.echo(f"{c:<{width}}  {counts[c]:>7}")
            typer.echo(f"{'total':<{width}}  {sum(counts.values()):>7}")
        else:
            typer.echo(f"\n{'class':<{width}}  {'boxes':>7}  {'masks':>7}")
            for c in v.classes:
                typer.echo(f"{c:<{width}}  {counts[c]:>7}  {masks[c]:>7}")
            typer.echo(f"{'total':<{width}}  {sum(counts.values()):>7}  {sum(masks.values()):>7}")
        if v.has_keypoints:
            kps = v.keypoint_counts()
            typer.echo("keypoints:   " + ", ".join(f"{c} {kps[c]}" for c in v.classes))

    run(go)


@datasets_app.command()
def diff(
    a: Annotated[str, typer.Argument(help="older version (digest prefix)")],
    b: Annotated[str, typer.Argument(help="newer version (digest prefix)")],
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    as_json: JsonOpt = False,
) -> None:
    """What changed from A to B: images added/removed/relabeled, boxes per class, and (with
    polygons) masks per class and the images whose masks changed."""

    def go() -> None:
        _, store = _store(config)
        d = diff_versions(store.load(a), store.load(b))
        typer.echo(json.dumps(d.to_dict(), indent=1) if as_json else d.to_text().rstrip("\n"))

    run(go)


@datasets_app.command()
def export(
    version: VersionArg,
    out_dir: Annotated[Path, typer.Argument(help="new or empty folder for the YOLO dataset")],
    pose: Annotated[
        bool,
        typer.Option(
            "--pose",
            help="write Ultralytics pose lines (boxes + the config's keypoints) instead",
        ),
    ] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Write a version as a YOLO folder (<split>/images, <split>/labels, data.yaml).

    Detect projects get box lines (cls cx cy w h); segment projects Ultralytics segmentation
    lines (cls x1 y1 x2 y2 ..., normalised; a box without a polygon as its rectangle).
    With --pose: Ultralytics pose lines (cls cx cy w h x1 y1 v1 ... xK yK vK) in the slot order
    of the config's `keypoints:`, a keypoint not labeled as 0 0 0; every class must list its
    keypoints (K is the longest list; data.yaml gets kpt_shape and kpt_names).

    Images are hard-linked from the pool and named by sha256; exporting the same version twice
    gives byte-identical files apart from the absolute paths in data.yaml.
    """

    def go() -> None:
        project, store = _store(config)
        v = store.load(version)
        dest = out_dir.resolve()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise DatasetError(
                f"{out_dir} exists and is not an empty folder; "
                "export into a new folder so no stale labels mix in"
            )
        data_yaml = export_yolo(
            v,
            project.cfg.paths.images,
            dest,
            project.cfg.task,
            pose=project.cfg.keypoints if pose else None,
        )
        splits = v.split_counts()
        typer.echo(
            f"exported {v.short}: "
            + ", ".join(f"{s} {splits[s]}" for s in SPLITS)
            + f" images -> {data_yaml}"
        )

    run(go)


@datasets_app.command("add-test")
def add_test(
    source: Annotated[Path, typer.Argument(help="folder (or file) of labeled images")],
    labels: Annotated[
        Path, typer.Option(help="folder of YOLO .txt labels named like the images (required)")
    ],
    limit: Annotated[
        int | None, typer.Option(help="import only this many of the eligible images (seeded)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for --limit")] = 0,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Grow the TEST split with labeled images the loop never touched.

    The images join the pool and their labels go into the test split of a new dataset version,
    whatever their hash says. Refused (and listed): images already labeled for training or
    validation, images waiting in Label Studio (chosen by the loop's selection), images without
    a label file (an empty file is a defect-free image). Pascal VOC: convert first with
    `defect-loop import voc DIR --out YOLO_DIR`. The next training measures every model,
    champion included, on the grown split.
    """
    from loop.scheduling import CycleLock
    from loop.testsplit import add_test_images

    def go() -> None:
        project, _ = _store(config)
        lock = CycleLock(project.cfg.workspace)
        if not lock.acquire("skip", 0.0, "datasets add-test"):
            raise DatasetError(
                f"a cycle is running ({lock.holder_text()}); run add-test when it has finished"
            )
        try:
            report = add_test_images(project, source, labels, limit, seed)
        finally:
            lock.release()
        typer.echo(f"add-test: {report.summary}")
        for src, reason in report.skipped[:20]:
            typer.echo(f"  skipped {src}: {reason}")
        if len(report.skipped) > 20:
            typer.echo(f"  ... {len(report.skipped) - 20} more")
        if report.version is not None:
            splits = report.version.split_counts()
            typer.echo(
                f"dataset version {report.version.short}: test split now {splits['test']} "
                "images; the next `defect-loop train` measures the models on it"
            )

    run(go)
