"""`defect-loop deploy` and `defect-loop monitor`: ship the champion, watch the line.

Registered on the main app in `loop.cli.main` by ``app.add_typer(deploy_app, name="deploy")``
and ``app.add_typer(monitor_app, name="monitor")``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loop.cli.common import ConfigOpt, console, jsonable, load, prefect_env, run
from loop.config import DEFAULT_CONFIG_NAME
from loop.errors import DefectLoopError

deploy_app = typer.Typer(
    help="Bundle the champion for the line (ONNX, class map, thresholds, model card, monitoring "
    "reference), register it in MLflow and move the `production` alias to it. Without a "
    "subcommand: build and deploy the current champion.",
    invoke_without_command=True,
)
monitor_app = typer.Typer(
    help="Check production images with the production bundle: input and output drift, novelty, "
    "alerts; the most novel or uncertain images go first into the next push. Without a "
    "subcommand: check the images in --source (or monitor.watch_dir).",
    invoke_without_command=True,
)

ByOpt = Annotated[
    str | None, typer.Option("--by", help="who moves production (default: user@host)")
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why, recorded with the move")]


def _move_line(m: object) -> str:
    v = getattr(m, "version", "?")
    prev = getattr(m, "previous", None)
    return (
        f"production -> bundle v{v} (was {'v' + prev if prev else 'nothing'}), "
        f"{getattr(m, 'action', '')} by {getattr(m, 'moved_by', '')} at {getattr(m, 'moved_at', '')}"
    )


@deploy_app.callback()
def deploy(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="bundle folder [default: WORKSPACE/bundles/v<N>-<time>]"),
    ] = None,
    by: ByOpt = None,
    reason: ReasonOpt = "",
    no_production: Annotated[
        bool,
        typer.Option(
            "--no-production", help="build and register, but leave production where it is"
        ),
    ] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Build the champion's bundle, register it and make it production."""
    if ctx.invoked_subcommand is not None:
        return

    def go() -> None:
        from loop.deploy import current_user, deploy
        from loop.project import Project
        from loop.tracking import Tracker

        cfg = load(config)
        outcome = deploy(
            Project(cfg),
            Tracker(cfg),
            out_dir=out,
            moved_by=by or current_user(),
            reason=reason,
            activate=not no_production,
            progress=lambda m: console.print(f"[dim]{m}[/]"),
        )
        console.print(
            f"bundle {outcome.bundle_dir} (detector v{outcome.detector_version}, "
            f"sha256 {outcome.digest[:12]}) registered as bundle v{outcome.bundle_version}"
        )
        if outcome.production is not None:
            console.print(_move_line(outcome.production))
        else:
            console.print(
                f"production unchanged; move it with `defect-loop deploy promote {outcome.bundle_version}`"
            )

    run(go)


@deploy_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="bundle version to put in production")],
    by: ByOpt = None,
    reason: ReasonOpt = "",
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Move production to a registered bundle version."""

    def go() -> None:
        from loop.deploy import current_user
        from loop.tracking import Tracker

        move = Tracker(load(config)).move_production(
            version, by or current_user(), "promote", reason
        )
        console.print(_move_line(move))

    run(go)


@deploy_app.command("rollback")
def rollback(
    by: ByOpt = None, reason: ReasonOpt = "", config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)
) -> None:
    """Move production back to the version it had before the current one."""

    def go() -> None:
        from loop.deploy import current_user
        from loop.tracking import Tracker

        move = Tracker(load(config)).rollback_production(by or current_user(), reason)
        console.print(_move_line(move))

    run(go)


@deploy_app.command("history")
def history(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Every move of production: when, who, from, to, why."""

    def go() -> None:
        from loop.tracking import Tracker

        tracker = Tracker(load(config))
        moves = tracker.production_history()
        if not moves:
            console.print("nothing deployed yet: run `defect-loop deploy`")
            return
        table = Table("when (UTC)", "action", "to", "from", "by", "reason")
        for m in moves:
            table.add_row(
                m.moved_at,
                m.action,
                f"v{m.version}",
                f"v{m.previous}" if m.previous else "-",
                m.moved_by,
                m.reason,
            )
        console.print(table)
        console.print(f"production now: bundle v{tracker.production_version()}")

    run(go)


@deploy_app.command("verify")
def verify(bundle: Annotated[Path, typer.Argument(help="bundle folder")]) -> None:
    """Check a bundle's files against the sha256 in its model card."""

    def go() -> None:
        from loop.bundle import load_bundle

        b = load_bundle(bundle, verify=True)
        console.print(
            f"{bundle}: {len(b.card.get('files', {}))} files match the model card "
            f"(bundle sha256 {b.digest[:12]}, classes {b.classes}, {b.spec.imgsz} px)"
        )

    run(go)


@deploy_app.command("score")
def score_images(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    workdir: Annotated[
        Path | None,
        typer.Option(help="writable folder for the runtime's settings [default: a temporary one]"),
    ] = None,
) -> None:
    """Score images with a bundle alone (no project, no MLflow).

    Prints one JSON line per image with the boxes at or above the bundle's defect threshold.
    """

    def go() -> None:
        from loop.bundle import load_bundle

        b = load_bundle(bundle, verify=True)
        with tempfile.TemporaryDirectory(prefix="defect-loop-runtime-") as tmp:
            runtime = Path(tmp) if workdir is None else workdir.resolve()
            _score_lines(b, images, runtime)

    run(go)


def _score_lines(b: Any, images: list[Path], runtime: Path) -> None:
    """One JSON line per image: its boxes at or above the bundle's defect threshold."""
    for path, (det, _) in zip(images, b.score(images, runtime), strict=True):
        shown = det.with_min_confidence(b.spec.defect_conf)
        conf = [] if shown.confidence is None else shown.confidence.tolist()
        boxes = [
            {"xyxy": [round(v, 2) for v in xyxy], "class": b.classes[c], "confidence": round(s, 4)}
            for xyxy, c, s in zip(shown.xyxy.tolist(), shown.class_id.tolist(), conf, strict=True)
        ]
        typer.echo(json.dumps({"image": str(path), "boxes": boxes}))


# ---------------------------------------------------------------------------------------- monitor


def _print_outcome(out: object) -> None:
    windows = getattr(out, "windows", None)
    if windows is None:  # skipped
        console.print(f"[yellow]{getattr(out, 'message', out)}[/]")
        return
    scan = getattr(out, "scan", None)
    if scan is not None:
        console.print(
            f"scan: {scan.new} new images, {scan.duplicates} seen before, {len(scan.rejected)} rejected"
        )
        for path, why in scan.rejected[:10]:
            console.print(f"  [yellow]skipped[/] {path}: {why}")
    for w in windows:
        if w.alert:
            console.print(f"[bold red]ALERT[/] {w.message}")
        else:
            console.print(
                f"window {w.index}: {w.n_images} images, no drift (smallest p "
                f"{w.metrics['min_p']:.3g}, novelty {100 * w.metrics['novelty_rate']:.1f}%)"
            )
    console.print(
        f"{len(windows)} windows checked, {len(getattr(out, 'alerts', []))} alerts, "
        f"{getattr(out, 'queued', 0)} images queued for labeling, {getattr(out, 'pending', 0)} "
        "waiting for a full window"
    )


@monitor_app.callback()
def monitor(
    ctx: typer.Context,
    source: Annotated[
        Path | None,
        typer.Option("--source", help="folder of production images [default: monitor.watch_dir]"),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="keep polling the folder until interrupted")
    ] = False,
    interval: Annotated[
        float | None, typer.Option(help="seconds between polls [default: monitor.interval_s]")
    ] = None,
    flush: Annotated[
        bool,
        typer.Option(
            "--flush", help="also check the last partial window (>= monitor.min_flush images)"
        ),
    ] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Check new production images in windows; alert on drift; queue new patterns."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = load(config)
    prefect_env(cfg)

    def once() -> None:
        from flows.monitor import monitor_flow

        state: Any = monitor_flow(
            str(config), None if source is None else str(source), flush, return_state=True
        )
        out = state.result()  # raises what failed the run
        _print_outcome(out if out is not None else state)

    def go() -> None:
        if not watch:
            once()
            return
        pause = interval if interval is not None else cfg.monitor.interval_s
        console.print(f"watching every {pause:g} s; Ctrl-C stops")
        try:
            while True:
                try:
                    once()
                except DefectLoopError as exc:
                    # Keep watching: the next poll retries (nothing was lost, see `monitor status`).
                    console.print(f"[bold red]error:[/] {exc}; retrying in {pause:g} s")
                time.sleep(pause)
        except KeyboardInterrupt:
            console.print("stopped")

    run(go)


@monitor_app.command("status")
def monitor_status_cmd(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Images waiting, windows checked, alerts, the review queue."""

    def go() -> None:
        from loop.monitor import monitor_status

        console.print_json(json.dumps(jsonable(monitor_status(load(config).paths.monitor))))

    run(go)


@monitor_app.command("alerts")
def monitor_alerts(
    last: Annotated[int, typer.Option(help="how many of the newest alerts")] = 20,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """The newest alerts with the tests that fired."""

    def go() -> None:
        from loop.monitor import read_windows

        alerts = [w for w in read_windows(load(config).paths.monitor) if w.alert]
        if not alerts:
            console.print("no alerts")
        for w in alerts[-last:]:
            console.print(f"{w.created_at}  {w.message}")

    run(go)


@monitor_app.command("queue")
def monitor_queue(
    all_: Annotated[bool, typer.Option("--all", help="also pushed and dropped entries")] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Images queued for labeling, in the order the next push serves them."""

    def go() -> None:
        from loop.review_queue import ReviewQueue

        entries = ReviewQueue(load(config).paths.monitor).entries(None if all_ else "queued")
        table = Table("image", "priority", "reason", "window", "status", "in pool", "source")
        for e in entries:
            table.add_row(
                e.sha256[:12],
                f"{e.priority:.2f}",
                e.reason,
                str(e.window),
                e.status,
                "yes" if e.in_pool else "not yet",
                e.source,
            )
        console.print(table)

    run(go)
