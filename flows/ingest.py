"""`ingest` flow: add a folder of images to the pool, optionally with YOLO labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import Context, locked_context
from loop.errors import printable


@dataclass(frozen=True)
class IngestSummary:
    """``rejected``: ``"<file>: <reason>"`` per skipped file; ``dataset_version``: the digest of
    the version the imported labels produced (None without labels)."""

    added: int
    duplicates: int
    rejected: list[str]
    pool_size: int
    dataset_version: str | None


@task(name="ingest-images", cache_policy=NONE)
def ingest_task(
    ctx: Context, source: Path, labels_dir: Path | None, label_limit: int | None, seed: int
) -> IngestSummary:
    report, version = ctx.project.ingest(source, labels_dir, label_limit, seed)
    return IngestSummary(
        len(report.added),
        len(report.duplicates),
        [f"{r.source}: {r.reason}" for r in report.rejected],
        len(ctx.project.pool),
        None if version is None else version.digest,
    )


@flow(name="ingest", log_prints=True)
def ingest_flow(
    config_path: str,
    source: str,
    labels_dir: str | None = None,
    label_limit: int | None = None,
    seed: int = 0,
) -> IngestSummary:
    """Add the images below ``source`` (bad files are skipped with a reason); with
    ``labels_dir`` (YOLO .txt named like the images) import those labels as a new version."""
    with locked_context(config_path, "ingest") as ctx:
        out = ingest_task(
            ctx, Path(source), None if labels_dir is None else Path(labels_dir), label_limit, seed
        )
    log = get_run_logger()
    log.info(
        "ingest: %d added, %d duplicates, %d rejected; pool %d images; dataset version %s",
        out.added,
        out.duplicates,
        len(out.rejected),
        out.pool_size,
        out.dataset_version or "unchanged",
    )
    for r in out.rejected[:20]:
        log.warning("skipped %s", printable(r))
    return out
