"""`defect-loop review-labels`: the labeled images whose labels are most likely wrong, pushed
back to Label Studio as review tasks.

Registered on the main app by ``app.command("review-labels")(review_labels)`` in
`loop.cli.main`. Cross-fits ``--folds`` models on the current dataset version's train and val
images (`loop.crossfit.project_cross_fit`, cached per version and settings), so that every
image is predicted by a model that never saw it, ranks the images with cleanlab
(`loop.label_errors.find_label_errors`) and pushes the ``--top`` suspects as review tasks
(`loop.review_tasks.push_review_tasks`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loop.cli.common import (
    ConfigOpt,
    check_labelstudio,
    console,
    load,
    require_writable,
    run,
    safe,
)
from loop.config import DEFAULT_CONFIG_NAME

if TYPE_CHECKING:
    from loop.labelstudio.review import ReviewPushSummary
    from loop.review_tasks import Suspects

_FOLD_DONE = re.compile(r"^fold (\d+)/(\d+): (predicting|cached)")


@contextmanager
def fold_progress(folds: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over the folds (each message also printed as a ``cross-fit:`` line);
    yields the callback for `loop.crossfit.cross_fit`."""
    with Progress(
        TextColumn("cross-fitting"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} folds"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=folds)

        def report(message: str) -> None:
            bar.console.print(f"cross-fit: {safe(message)}")
            bar.update(task, description=safe(message))
            done = _FOLD_DONE.match(message)
            if done is not None:
                bar.update(task, completed=int(done.group(1)) - (done.group(3) == "predicting"))

        yield report
        bar.update(task, completed=folds)


def print_suspects(suspects: Suspects, top: int, shown_conf: float) -> None:
    """The ``top`` suspects as a table, with what the scores mean."""
    from loop.label_errors import disagreeing_boxes

    table = Table(
        "rank",
        "sha256",
        "image",
        "split",
        "quality",
        "lowest subtype",
        "flagged",
        "labels",
        "model boxes",
        "disagreeing",
    )
    by_sha = suspects.version.by_sha()
    for row in suspects.rows[:top]:
        labels = by_sha[row["sha256"]].boxes
        pred = suspects.predictions[row["sha256"]]
        table.add_row(
            str(row["rank"]),
            row["sha256"][:12],
            safe(Path(row["source"]).name),
            row["split"],
            f"{row['quality']:.3f}",
            f"{row['issue']} {row[row['issue']]:.3f}",
            "yes" if row["flagged"] else "",
            str(len(labels)),
            str(len(pred.with_min_confidence(shown_conf))),
            str(len(disagreeing_boxes(labels, pred, shown_conf))),
        )
    console.print(table)
    console.print(
        "quality and subtype scores lie in [0, 1]; low = likely wrong. Subtypes: overlooked "
        "(a confident model box has no label), swap (the model sees another class), badloc "
        "(the model places the box elsewhere)"
    )
    flagged = sum(1 for r in suspects.rows if r["flagged"])
    console.print(
        f"{len(suspects.rows)} images of version {suspects.version.short} checked with "
        f"{suspects.folds}-fold cross-fitting; cleanlab flags {flagged}; model boxes shown at "
        f"confidence >= {shown_conf:g}"
    )


def print_review_push(summary: ReviewPushSummary, url: str) -> None:
    console.print(
        f"review tasks: {summary.flagged} existing tasks marked, {summary.created} created "
        f"(images without a task), {len(summary.seeded)} given their current label as an "
        f"annotation, {summary.failed} failed"
    )
    for sha, why in sorted(summary.failures.items()):
        console.print(f"  [yellow]not pushed[/] {sha[:12]}: {safe(why)}")
    console.print(
        f'review them in Label Studio: {url} (view "Label review", most suspect first). Edit '
        'the annotation (the current label) against the "review:crossfit" prediction and '
        "click Update; `defect-loop pull` then makes a new dataset version"
    )


def review_labels(
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="only print the suspects (and write --out); create no Label Studio task",
        ),
    ] = False,
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds",
            min=2,
            help="cross-fitting folds: one model trains per fold \\[default: label_review.folds, "
            "5]",
        ),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            min=1,
            help="suspects to push (and print) \\[default: label_review.top_k, 20]",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="fold assignment seed \\[default: label_review.seed, else train.seed]"
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="cross-fit again even when this version's predictions are cached",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="write every image's scores as JSON to this file"),
    ] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Find the labeled train and val images whose labels are most likely wrong, and push the
    top ones to Label Studio as review tasks.

    Cost: --folds trainings (each like one round's training from the start checkpoint, on all
    but one fold), then one prediction pass over the labeled images. The fold predictions are
    cached per dataset version and settings (<workspace>/crossfit/), so running it again on the
    same version trains nothing.

    Each image is predicted by the fold model that did not see it, and cleanlab's
    object-detection scores point at missing boxes (overlooked), wrong classes (swap) and
    misplaced boxes (badloc). The --top most suspect images become review tasks: the current
    label as the task's annotation (a labeler's, or the imported label), the model's
    disagreeing boxes beside it as a "review:crossfit" prediction, listed in the Data Manager
    view "Label review". Correct the annotation there; the next `defect-loop pull` makes a new
    dataset version. What was pushed is kept in <workspace>/label-review.json.
    """
    from loop.project import Project
    from loop.review_tasks import find_suspects, push_review_tasks, review_url, shown_conf

    def go() -> None:
        cfg = load(config)
        require_writable(cfg)
        k = cfg.label_review.folds if folds is None else folds
        n_top = cfg.label_review.top_k if top is None else top
        project = Project(cfg)
        if not dry_run:
            # Before hours of training: the push at the end needs Label Studio and a token.
            check_labelstudio(cfg)
            project.ls_token()
        project.on_wait = lambda holder: console.print(
            f"[yellow]waiting[/] for the workspace: {safe(holder)} is writing it"
        )
        with fold_progress(k) as progress:
            suspects = find_suspects(project, k, seed, progress, use_cache=not no_cache)
        conf = shown_conf(project)
        print_suspects(suspects, n_top, conf)
        if out is not None:
            from loop.images import atomic_write_text

            out.parent.mkdir(parents=True, exist_ok=True)
            doc: dict[str, Any] = {"version": suspects.version.digest, "suspects": suspects.rows}
            atomic_write_text(out, json.dumps(doc))
            console.print(f"scores: {out}")
        if dry_run:
            return
        with project.gateway() as gw:
            summary = push_review_tasks(
                project, gw, suspects, n_top, progress=None if cfg.labelstudio.progress else False
            )
        pid = project.state.ls_project_id
        url = review_url(cfg.labelstudio.url, int(pid or 0), summary.view_id)
        print_review_push(summary, url)

    run(go)


def _one_line_paragraphs(text: str) -> str:
    """``text`` (a docstring) with each paragraph on one line: Typer keeps the line breaks of
    every paragraph after the first, which would break the help's lines mid-sentence."""
    import inspect

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


review_labels.__doc__ = _one_line_paragraphs(review_labels.__doc__ or "")
