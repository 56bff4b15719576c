"""The `defect-loop` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loop.cli_common import ConfigOpt, console, jsonable, load, prefect_env, prepare, run, safe
from loop.config import DEFAULT_CONFIG_NAME, ProjectConfig, write_default_config
from loop.errors import DefectLoopError

app = typer.Typer(
    help="defect-loop: an active-learning labeling loop for surface-defect detection.\n\n"
    "A cycle pulls corrected labels from Label Studio, trains a YOLO model, scores the "
    "unlabeled pool by uncertainty and pushes the most valuable images back as pre-annotated tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
services_app = typer.Typer(help="Start, stop and inspect the local Label Studio server.")
app.add_typer(services_app, name="services")
# Shared with the command modules; the underscore names are kept for `loop.demo`.
_load, _run, _prefect_env, _jsonable = load, run, prefect_env, jsonable


@app.command()
def init(
    classes: Annotated[str, typer.Option(help="comma-separated class names, in id order")],
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    name: Annotated[str, typer.Option(help="project name")] = "defect-loop",
    weights: Annotated[
        Path | None,
        typer.Option(
            help="local .pt checkpoint every training starts from, e.g. Ultralytics' "
            "COCO-pretrained yolov8n.pt (its sha256 is pinned in the YAML); nothing is downloaded",
            envvar="DEFECT_LOOP_TRAIN__WEIGHTS",
        ),
    ] = None,
) -> None:
    """Write a starter project YAML."""
    names = [c.strip() for c in classes.split(",") if c.strip()]
    train = _run(lambda: write_default_config(config, names, name, weights))
    console.print(f"wrote {config}; classes: {names}")
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
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Add images to the pool (bad files are skipped with a reason); optionally import labels."""
    from loop.images import iter_image_files
    from loop.project import Project

    def go() -> None:
        from loop.cli_common import require_writable

        cfg = _load(config)
        require_writable(cfg)
        project = Project(cfg)
        project.on_wait = lambda holder: console.print(
            f"[yellow]waiting[/] for the workspace: {safe(holder)} is writing it"
        )
        total = sum(1 for _ in iter_image_files(source)) if source.exists() else 0
        with _progress() as prog:
            bar = prog.add_task("ingest", total=total)
            report, version = project.ingest(
                source, labels, label_limit, seed, on_progress=lambda _p: prog.advance(bar)
            )
        console.print(f"ingest: {report.summary}; pool now {len(project.pool)} images")
        for what, problems in (("skipped", report.rejected), ("label", report.label_problems)):
            for r in problems[:20]:
                console.print(f"  [yellow]{what}[/] {safe(r.source)}: {safe(r.reason)}")
            if len(problems) > 20:
                console.print(f"  ... {len(problems) - 20} more (see `defect-loop status`)")
        if version is not None:
            console.print(f"labels: dataset version {version.short} ({len(version)} images)")

    _run(go)


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
        prepare(_load(config), mlflow=True)
        from flows.train import train_flow

        out = train_flow(str(config))
        console.print_json(json.dumps(_jsonable(out)))

    _run(go)


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
        prepare(_load(config), mlflow=True)
        from flows.score import score_flow

        ranked = score_flow(str(config))
        table = Table("rank", "image", "priority", "boxes shown")
        for i, s in enumerate(ranked[:top], start=1):
            table.add_row(str(i), s.sha256[:12], f"{s.score:.4f}", str(len(s.detections)))
        console.print(table)

    _run(go)


@app.command()
def push(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Score the pool and push the top batch to Label Studio with pre-annotations."""

    def go() -> None:
        prepare(_load(config), labelstudio=True, mlflow=True)
        from flows.sync import push_flow

        summary = push_flow(str(config))
        console.print(
            f"push: {summary.created} created, {summary.skipped} skipped, {summary.failed} failed"
        )

    _run(go)


@app.command()
def pull(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Pull submitted annotations from Label Studio into a new dataset version.

    Tasks that cannot be used (malformed, tampered, unknown label, ...) are listed with the
    reason, and stay listed (`defect-loop rejections`, `status`) until they change."""

    def go() -> None:
        prepare(_load(config), labelstudio=True)
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

    _run(go)


@app.command()
def cycle(
    no_pull: Annotated[
        bool, typer.Option("--no-pull", help="skip pulling from Label Studio")
    ] = False,
    force_train: Annotated[
        bool, typer.Option(help="train even if the labels did not change")
    ] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """One cycle: pull -> train -> promote -> score -> push."""

    def go() -> None:
        prepare(_load(config), labelstudio=True, mlflow=True)
        from flows.cycle import cycle_flow

        out = cycle_flow(str(config), pull=not no_pull, force_train=force_train)
        _print_cycle(out)

    _run(go)


def _print_cycle(out: Any) -> None:
    if getattr(out, "skipped", None):
        console.print(f"[yellow]{out.skipped}[/]")
        return
    if out.pull is not None:
        console.print(
            f"pull: {out.pull.labeled} labeled, new version {out.pull.new_version or 'none'}, "
            f"{out.pull.open_rejections} tasks rejected (`defect-loop rejections`)"
        )
    if out.train is not None:
        t = out.train
        console.print(
            f"train: model v{t.model_version} val mAP50 {t.val_map50:.3f} "
            f"test mAP50 {_fmt(t.test_map50)} mAP50-95 {_fmt(t.test_map50_95)}; "
            f"{'promoted' if t.promoted else 'not promoted'} ({t.reason})"
        )
    s = out.push
    console.print(
        f"push: {s.created} created, {s.refreshed} refreshed, {s.skipped} skipped, "
        f"{s.failed} failed"
    )
    if getattr(out, "report", None):
        console.print(f"report: {out.report[0]}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@app.command()
def status(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Pool, labels, round, pending tasks, the test split (size, interval width, warnings),
    skipped files and rejected Label Studio tasks."""
    from loop.project import Project

    def go() -> None:
        console.print_json(json.dumps(Project(_load(config)).status()))

    _run(go)


@app.command()
def rejections(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """List the Label Studio tasks that pulls rejected and that have not changed since, with
    the reason and a link: fix or delete them in Label Studio, and the next pull judges them
    again."""
    from loop.project import Project

    def go() -> None:
        cfg = _load(config)
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

    _run(go)


def _service(cfg: ProjectConfig) -> Any:
    from urllib.parse import urlparse

    from loop.services import LabelStudioService, load_or_create_credentials

    url = urlparse(cfg.labelstudio.url)
    if url.hostname not in {"127.0.0.1", "localhost"}:
        raise DefectLoopError(
            f"labelstudio.url {cfg.labelstudio.url} is not local: `services` only manages a "
            "Label Studio on 127.0.0.1; manage a remote one yourself"
        )
    data_dir = cfg.workspace / "labelstudio"
    creds = load_or_create_credentials(
        data_dir / "credentials.json", username=cfg.labelstudio.username
    )
    return LabelStudioService(
        data_dir=data_dir,
        document_root=cfg.workspace,
        port=url.port or 8080,
        username=creds.username,
        password=creds.password,
        api_token=creds.api_token,
    ), creds


@services_app.command("up")
def services_up(
    timeout: Annotated[float, typer.Option(help="seconds to wait for /health")] = 240.0,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Install (first time, ~1 min) and start Label Studio on 127.0.0.1."""

    def go() -> None:
        svc, creds = _service(_load(config))
        svc.ensure_installed()
        t0 = time.monotonic()
        svc.start(timeout_s=timeout)
        console.print(
            f"Label Studio up at {svc.url} in {time.monotonic() - t0:.1f}s "
            f"(login {creds.username} / password in {svc.data_dir / 'credentials.json'})"
        )

    _run(go)


@services_app.command("down")
def services_down(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Stop the local Label Studio."""

    def go() -> None:
        svc, _ = _service(_load(config))
        svc.stop()
        console.print("Label Studio stopped")

    _run(go)


@services_app.command("status")
def services_status(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Is the local Label Studio running and healthy?"""

    def go() -> None:
        svc, _ = _service(_load(config))
        console.print_json(json.dumps(_jsonable(svc.status())))

    _run(go)


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
        project = Project(_load(config))
        gw = project.gateway()
        pid = project.ensure_ls_project(gw)
        gt = truth_from_yolo_dir(project.pool, truth, len(project.cfg.classes))
        n = answer_open_tasks(gw, pid, gt, list(project.cfg.classes), limit=limit)
        console.print(f"simulated labeler answered {n} tasks")

    _run(go)


@app.command()
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
    from loop.demo import run_demo

    _run(
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


def _register_subcommands() -> None:
    # Sub-apps live in their own modules; they import helpers from this one, hence the late import.
    from loop.cli_datasets import datasets_app
    from loop.cli_deploy import deploy_app, monitor_app
    from loop.cli_ls import ls_app
    from loop.cli_report import report
    from loop.cli_serve import prefect_server_app, serve
    from loop.cli_sim import import_app, simulate

    app.add_typer(datasets_app, name="datasets")
    app.command("report")(report)
    app.add_typer(ls_app, name="labelstudio")
    app.command("serve")(serve)
    app.add_typer(prefect_server_app, name="prefect-server")
    app.command("simulate")(simulate)
    app.add_typer(import_app, name="import")
    app.add_typer(deploy_app, name="deploy")
    app.add_typer(monitor_app, name="monitor")


_register_subcommands()


def main() -> None:  # pragma: no cover - console script entry
    app()
