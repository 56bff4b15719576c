"""What the report writes: the HTML and Markdown files of a round (also logged to its MLflow
training run), and ``next_batch.json``, the batch a push just sent, for the next report."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loop.errors import ServiceError
from loop.images import atomic_write_text
from loop.report.collect import collect_report_data
from loop.report.data import REPORT_ARTIFACT_DIR
from loop.report.html import render_html
from loop.report.markdown import render_markdown

if TYPE_CHECKING:
    from loop.project import Project, ScoredImage
    from loop.tracking import Tracker


def report_paths(out_dir: Path, rnd: int | None) -> tuple[Path, Path]:
    """Where `write_report` puts the HTML and Markdown files of round ``rnd``."""
    stem = f"report-round-{rnd}" if rnd is not None else "report-no-model"
    return out_dir / f"{stem}.html", out_dir / f"{stem}.md"


def write_report(
    project: Project, tracker: Tracker, out_dir: Path | None = None, round: int | None = None
) -> tuple[Path, Path]:
    """Collect, render and write the report of ``round`` (default: newest) into ``out_dir``
    (default ``<workspace>/reports``); log both files to the round's training run under
    ``report/``. Returns (html path, markdown path). Raises `ModelError` for an unknown round and
    `ServiceError` when MLflow refuses the artifacts (the files are written by then)."""
    data = collect_report_data(project, tracker, round)
    data = replace(data, rejections=tuple(r.line() for r in project.rejections()))
    out = Path(out_dir) if out_dir is not None else project.cfg.paths.reports
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path = report_paths(out, data.round)
    atomic_write_text(html_path, render_html(data))
    atomic_write_text(md_path, render_markdown(data, html_path.name))
    if data.run_id is not None:
        try:
            tracker.log_files(data.run_id, (html_path, md_path), REPORT_ARTIFACT_DIR)
        except ServiceError as exc:
            raise ServiceError(
                f"report written to {html_path} and {md_path}, but logging it to MLflow run "
                f"{data.run_id} failed: {exc.__cause__}; check the tracking server and rerun "
                "`defect-loop report`"
            ) from exc.__cause__
    return html_path, md_path


def write_next_batch(
    project: Project, ranked: Sequence[ScoredImage], size: int | None = None
) -> Path:
    """Record the batch just pushed (the top ``size`` of ``ranked``, default
    ``select.batch_size``: what `Project.push` sends) as ``<workspace>/next_batch.json`` for the
    report: strategy, size, predicted class mix (boxes shown to labelers: without the classes
    below the pre-annotation usefulness bar, listed as ``hidden_classes``), round."""
    from loop.quality import preannotation_filter, read_quality

    sel = project.cfg.select
    top = list(ranked[: sel.batch_size if size is None else size])
    names = list(project.cfg.classes)
    # What labelers see: `Project.push` leaves out the champion's useless classes.
    rec = read_quality(project.cfg)
    hidden, shown = (
        ([], None) if rec is None else preannotation_filter(project.cfg, rec.model_version)
    )
    mix: Counter[str] = Counter()
    empty = 0
    for s in top:
        det = s.detections if shown is None else shown(s.detections)
        ids = [int(c) for c in det.class_id]
        if not ids:
            empty += 1
        mix.update(names[c] if 0 <= c < len(names) else str(c) for c in ids)
    doc = {
        "strategy": sel.strategy,
        "reduction": sel.reduction,
        "size": len(top),
        "class_mix": {c: mix[c] for c in names if mix[c]}
        | {c: n for c, n in mix.items() if c not in names},
        "images_without_boxes": empty,
        "hidden_classes": hidden,
        "round": project.state.round,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = project.cfg.paths.next_batch
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path
