"""`defect-loop review-labels`: the labeled images whose labels are most likely wrong.

Registered on the main app by ``app.command("review-labels")(review_labels)`` in
`loop.cli.main`. Cross-fits ``--folds`` models on the current dataset version's train and val
images (`loop.crossfit.project_cross_fit`), so that every image is predicted by a model that
never saw it, and ranks the images with cleanlab (`loop.label_errors.find_label_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loop.cli.common import ConfigOpt, console, load, require_writable, run, safe
from loop.config import DEFAULT_CONFIG_NAME
from loop.errors import ConfigError


def review_labels(
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="print the suspects (and write --out) without creating Label Studio review "
            "tasks; required for now",
        ),
    ] = False,
    folds: Annotated[
        int, typer.Option("--folds", min=2, help="cross-fitting folds: one model trains per fold")
    ] = 5,
    top: Annotated[int, typer.Option("--top", min=1, help="suspects to print")] = 20,
    seed: Annotated[
        int | None, typer.Option("--seed", help="fold assignment seed [default: train.seed]")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="write every image's scores as JSON to this file"),
    ] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
) -> None:
    """Rank the labeled train and val images by how likely their labels are wrong.

    Trains --folds models (each on all but one fold, like a round's training) and predicts each
    fold with the model that did not see it; cleanlab's object-detection scores then point at
    missing boxes (overlooked), wrong classes (swap) and misplaced boxes (badloc). Lower quality
    = more suspect. Takes about --folds trainings of time.
    """
    from loop.crossfit import project_cross_fit
    from loop.images import atomic_write_text
    from loop.label_errors import find_label_errors, label_checks, suspects_to_json
    from loop.project import Project

    def go() -> None:
        if not dry_run:
            raise ConfigError(
                "review-labels cannot push review tasks to Label Studio yet; run it with "
                "--dry-run to print the suspects"
            )
        cfg = load(config)
        require_writable(cfg)
        project = Project(cfg)
        project.on_wait = lambda holder: console.print(
            f"[yellow]waiting[/] for the workspace: {safe(holder)} is writing it"
        )
        version, oos = project_cross_fit(
            project, folds, seed, progress=lambda m: console.print(f"cross-fit: {m}")
        )
        predictions = {sha: o.predictions for sha, o in oos.items()}
        suspects = find_label_errors(label_checks(version, predictions), len(cfg.classes))
        rows = [
            {**row, "source": project.pool.get(row["sha256"]).source}
            for row in suspects_to_json(suspects, version)
        ]
        shown_conf = cfg.select.preannotation_conf
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
        )
        by_sha = version.by_sha()
        for row in rows[:top]:
            labels = by_sha[row["sha256"]].boxes
            pred = predictions[row["sha256"]].with_min_confidence(shown_conf)
            table.add_row(
                str(row["rank"]),
                row["sha256"][:12],
                safe(Path(row["source"]).name),
                row["split"],
                f"{row['quality']:.3f}",
                f"{row['issue']} {row[row['issue']]:.3f}",
                "yes" if row["flagged"] else "",
                str(len(labels)),
                str(len(pred)),
            )
        console.print(table)
        console.print(
            "quality and subtype scores lie in [0, 1]; low = likely wrong. Subtypes: overlooked "
            "(a confident model box has no label), swap (the model sees another class), badloc "
            "(the model places the box elsewhere)"
        )
        flagged = sum(1 for r in rows if r["flagged"])
        console.print(
            f"{len(rows)} images of version {version.short} checked with {folds}-fold "
            f"cross-fitting; cleanlab flags {flagged}; model boxes shown at confidence >= "
            f"{shown_conf:g}"
        )
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps({"version": version.digest, "suspects": rows}))
            console.print(f"scores: {out}")

    run(go)
