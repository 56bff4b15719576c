"""Production monitoring: drift and novelty checks on windows of production images.

`Monitor` takes new images from a folder (or a batch), scores them with the production bundle
(`loop.bundle.Bundle`) in windows of ``monitor.window_size`` and compares every window with the
bundle's reference (held-out images of the champion's dataset) in `evaluate_window`:

- input drift: the model's embeddings (pooled feature maps, see `loop.model.add_embedding_output`;
  MMD with a permutation test on the first ``pca_dims`` principal axes of the pooled sample, in
  the reference's comparison space `loop.bundle.Reference.embed_space`) and four image
  statistics (brightness, contrast, sharpness, noise; Kolmogorov-Smirnov each);
- output drift: the highest box confidence and the uncertainty (highest box entropy) per image
  (Kolmogorov-Smirnov), the predicted class mix per image (chi-square, permutation p-value) and
  the rate of images with no defect (Fisher's exact test);
- novelty: how many images lie farther from every training image (embedding distance in the
  comparison space) than the reference's ``novelty_quantile`` of the same distance (exact
  negative hypergeometric tail).

A window alerts when any p-value is below ``alpha / 10`` (Bonferroni over the ten tests: at most
``alpha`` false alarms per window without drift); the tests of a window are in `loop.windows`. The ``queue_per_window`` most novel or uncertain
images of each window (`select_for_queue`) are added to the project's pool and to the review
queue (`loop.review_queue`), which the next push serves first.

Everything is kept in ``<workspace>/monitor/monitor.sqlite`` (files seen, images waiting for a
window, window records with their alerts, the queue), so a restart loses nothing, checks nothing
twice and queues nothing twice. Windows are logged to MLflow (one run per production bundle,
metrics at step = window index, alert tags); a window MLflow did not take is logged on the next
run. Nothing here imports Prefect: ``flows/monitor.py`` adds its events and states.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from loop.datasets import assign_split
from loop.drift import (
    FeatureSet,
)
from loop.errors import DeployError, ImageError
from loop.images import IMAGE_SUFFIXES, ImagePool, check_image, iter_image_files, sha256_file
from loop.review_queue import DB_FILE, QueueEntry, ReviewQueue, connect, transaction
from loop.scheduling import CycleLock
from loop.tracking import TAG
from loop.windows import WindowResult, check_power, evaluate_window

if TYPE_CHECKING:
    from loop.bundle import Bundle
    from loop.project import Project
    from loop.tracking import Tracker

log = logging.getLogger("defect_loop.monitor")


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (
        path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT, reason TEXT)""",
    """CREATE TABLE IF NOT EXISTS images (
        sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, seq INTEGER NOT NULL,
        status TEXT NOT NULL, window INTEGER)""",
    """CREATE TABLE IF NOT EXISTS windows (
        idx INTEGER PRIMARY KEY, bundle_version TEXT NOT NULL, created_at TEXT NOT NULL,
        alert INTEGER NOT NULL, logged INTEGER NOT NULL, doc TEXT NOT NULL)""",
)


# ============================================================================ the monitor


@dataclass(frozen=True)
class ScanResult:
    """What one scan of a folder found: ``new`` images now waiting for a window,
    ``duplicates`` (an image already seen, under any name), ``rejected`` (path, reason)."""

    new: int
    duplicates: int
    rejected: list[tuple[str, str]]


@dataclass(frozen=True)
class MonitorOutcome:
    """One monitor run: the windows checked now (oldest first), MLflow logging of earlier
    windows caught up, images still waiting for a full window, images queued now."""

    bundle_version: str
    scan: ScanResult | None
    windows: list[WindowResult]
    pending: int
    queued: int
    relogged: int = 0

    @property
    def alerts(self) -> list[WindowResult]:
        return [w for w in self.windows if w.alert]


@dataclass(frozen=True)
class PendingImage:
    sha256: str
    path: Path


def read_windows(monitor_dir: Path) -> list[WindowResult]:
    """Every window record of a workspace, oldest first (none when the monitor never ran)."""
    if not (Path(monitor_dir) / DB_FILE).is_file():
        return []
    con = connect(monitor_dir)
    try:
        for stmt in _SCHEMA:
            con.execute(stmt)
        return [
            WindowResult.from_json(r[0])
            for r in con.execute("SELECT doc FROM windows ORDER BY idx")
        ]
    finally:
        con.close()


class Monitor:
    """The monitor of one project with one bundle (``bundle_version``: its version in the
    bundle registered model, or any label). Every method persists what it did before it
    returns."""

    def __init__(self, project: Project, bundle: Bundle, bundle_version: str) -> None:
        self.project = project
        self.cfg = project.cfg
        self.mcfg = project.cfg.monitor
        self.bundle = bundle
        self.bundle_version = str(bundle_version)
        self.dir = project.cfg.paths.monitor
        self.queue = ReviewQueue(self.dir)
        if list(bundle.classes) != list(project.cfg.classes):
            raise DeployError(
                f"the bundle's classes {bundle.classes} are not the project's "
                f"{list(project.cfg.classes)}; deploy the current champion again"
            )
        check_power(self.mcfg)
        with self._con():
            pass  # creates the schema

    @contextmanager
    def _con(self) -> Iterator[sqlite3.Connection]:
        con = connect(self.dir)
        try:
            for stmt in _SCHEMA:
                con.execute(stmt)
            yield con
        finally:
            con.close()

    # ------------------------------------------------------------------ intake
    def scan(self, source: Path, on_file: Callable[[Path], None] | None = None) -> ScanResult:
        """Register the image files below ``source`` not seen before (by path, size and
        modification time; then by content): each new image waits for a window. Unreadable
        files are recorded with the reason and never retried unless they change."""
        source = Path(source)
        if not source.exists():
            raise ImageError(f"{source} does not exist; pass the folder production images land in")
        new = dup = 0
        rejected: list[tuple[str, str]] = []
        with self._con() as con:
            known = {
                r[0]: (r[1], r[2]) for r in con.execute("SELECT path, size, mtime_ns FROM files")
            }
            seq = int(con.execute("SELECT COALESCE(MAX(seq), 0) FROM images").fetchone()[0])
            for path in iter_image_files(source):
                if on_file is not None:
                    on_file(path)
                key = str(path.resolve())
                try:
                    st = path.stat()
                except OSError:
                    continue  # vanished while scanning
                if known.get(key) == (st.st_size, st.st_mtime_ns):
                    continue
                reason = None
                sha = None
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    reason = f"not an image file ({path.suffix or 'no suffix'})"
                else:
                    try:
                        check_image(path, self.cfg.ingest)
                        sha = sha256_file(path)
                    except (ImageError, OSError) as exc:
                        reason = str(exc)
                with transaction(con):
                    con.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                        (key, st.st_size, st.st_mtime_ns, sha, reason),
                    )
                    if sha is not None:
                        seq += 1
                        cur = con.execute(
                            "INSERT OR IGNORE INTO images VALUES (?, ?, ?, 'pending', NULL)",
                            (sha, key, seq),
                        )
                        if cur.rowcount == 1:
                            new += 1
                        else:
                            dup += 1
                if reason is not None:
                    rejected.append((key, reason))
        return ScanResult(new, dup, rejected)

    def add(self, paths: Sequence[Path]) -> ScanResult:
        """Register a batch of files (see `scan`)."""
        totals = ScanResult(0, 0, [])
        for p in paths:
            r = self.scan(Path(p))
            totals = ScanResult(
                totals.new + r.new, totals.duplicates + r.duplicates, totals.rejected + r.rejected
            )
        return totals

    def pending(self) -> list[PendingImage]:
        """Images waiting for a window, in arrival order."""
        with self._con() as con:
            rows = con.execute(
                "SELECT sha256, path FROM images WHERE status = 'pending' ORDER BY seq"
            )
            return [PendingImage(s, Path(p)) for s, p in rows]

    def next_index(self) -> int:
        with self._con() as con:
            return int(con.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM windows").fetchone()[0])

    def ready_windows(self, flush: bool = False) -> list[list[PendingImage]]:
        """The full windows waiting (and, with ``flush``, the last partial one when it holds at
        least ``monitor.min_flush`` images). Images whose file disappeared are dropped
        (status ``missing``)."""
        present: list[PendingImage] = []
        gone: list[PendingImage] = []
        for img in self.pending():
            (present if img.path.is_file() else gone).append(img)
        if gone:
            with self._con() as con, transaction(con):
                con.executemany(
                    "UPDATE images SET status = 'missing' WHERE sha256 = ?",
                    [(g.sha256,) for g in gone],
                )
            log.warning("%d waiting images disappeared before they were checked", len(gone))
        size = self.mcfg.window_size
        out = [present[i : i + size] for i in range(0, len(present), size)]
        if out and len(out[-1]) < size and not (flush and len(out[-1]) >= self.mcfg.min_flush):
            out.pop()
        return out

    # ------------------------------------------------------------------ one window
    def _eligible(self, shas: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Which images may be queued: not labeled yet, not waiting in Label Studio, not in the
        frozen test split (the loop never selects test images)."""
        version = self.project.current_version()
        labeled = set() if version is None else {r.sha256 for r in version.rows}
        pending = set(self.project.state.pending)
        return np.array(
            [
                s not in labeled and s not in pending and assign_split(s, self.cfg.split) != "test"
                for s in shas
            ],
            dtype=bool,
        )

    def check(
        self, images: Sequence[PendingImage], index: int | None = None
    ) -> tuple[WindowResult, FeatureSet]:
        """Score ``images`` with the bundle and test them as window ``index`` (default: the
        next). Writes nothing."""
        idx = self.next_index() if index is None else index
        feats = self.bundle.features(
            [i.path for i in images],
            [i.sha256 for i in images],
            self.cfg.paths.yolo_config,
            threads=self.cfg.train.threads,
        )
        result = evaluate_window(
            self.bundle.reference(),
            feats,
            self.mcfg,
            idx,
            self.bundle.classes,
            self.bundle_version,
            self._eligible(feats.sha256),
        )
        return result, feats

    def commit(self, result: WindowResult, images: Sequence[PendingImage]) -> list[QueueEntry]:
        """Record ``result``: its candidates are copied aside and queued (an image already
        queued is skipped), its images marked done and the window stored, in one transaction;
        then the queued images go into the pool when the workspace is free. Committing the
        same window twice changes nothing. Returns the entries queued now."""
        by_sha = {i.sha256: i for i in images}
        cand = [c for c in result.candidates if c.sha256 in by_sha and c.sha256 not in self.queue]
        boxes = self._boxes([by_sha[c.sha256].path for c in cand])
        entries = []
        held_dir = self.dir / "held"
        for c, (det_boxes, wh) in zip(cand, boxes, strict=True):
            src = by_sha[c.sha256].path
            held = held_dir / f"{c.sha256}{src.suffix.lower()}"
            held.parent.mkdir(parents=True, exist_ok=True)
            if not held.is_file():
                tmp = held.with_name(held.name + ".part")
                shutil.copyfile(src, tmp)
                tmp.replace(held)
            entries.append(
                QueueEntry(
                    sha256=c.sha256,
                    priority=c.priority,
                    reason=c.reason,
                    novelty=c.novelty,
                    uncertainty=c.uncertainty,
                    window=result.index,
                    bundle_version=self.bundle_version,
                    source=str(src),
                    width=wh[0],
                    height=wh[1],
                    boxes=det_boxes,
                    held=str(held),
                )
            )
        with self._con() as con, transaction(con):
            exists = con.execute("SELECT 1 FROM windows WHERE idx = ?", (result.index,)).fetchone()
            added = [] if exists else self.queue.add(entries, con)
            if not exists:
                con.execute(
                    "INSERT INTO windows VALUES (?, ?, ?, ?, 0, ?)",
                    (
                        result.index,
                        result.bundle_version,
                        result.created_at,
                        int(result.alert),
                        result.to_json(),
                    ),
                )
                con.executemany(
                    "UPDATE images SET status = 'done', window = ? WHERE sha256 = ?",
                    [(result.index, i.sha256) for i in images],
                )
        if result.alert:
            log.warning(result.message)
        self.ingest_queued()
        return added

    def _boxes(self, paths: Sequence[Path]) -> list[tuple[list[list[float]], tuple[int, int]]]:
        """The bundle's defect boxes of ``paths`` (for the queue's thumbnails) and image sizes."""
        if not paths:
            return []
        out = []
        thr = self.bundle.spec.defect_conf
        for det, _ in self.bundle.score(
            list(paths), self.cfg.paths.yolo_config, threads=self.cfg.train.threads
        ):
            shown = det.with_min_confidence(thr)
            conf = shown.confidence if shown.confidence is not None else np.ones(len(shown))
            rows = [
                [*(round(float(v), 2) for v in xyxy), int(c), round(float(s), 4)]
                for xyxy, c, s in zip(shown.xyxy, shown.class_id, conf, strict=True)
            ]
            out.append((rows, (int(det.image_wh[0]), int(det.image_wh[1]))))
        return out

    def ingest_queued(self) -> int:
        """Put queued images that are not in the pool yet into it, when the workspace lock is
        free (a cycle holds it while it trains, scores and pushes: they wait for the next run).
        Returns how many were added."""
        todo = [e for e in self.queue.entries("queued") if not e.in_pool]
        if not todo:
            return 0
        lock = CycleLock(self.cfg.workspace)
        if not lock.acquire("skip", 0, "monitor: queue images into the pool"):
            log.info(
                "workspace busy (%s): %d queued images join the pool on a later run",
                lock.holder_text(),
                len(todo),
            )
            return 0
        try:
            # A fresh pool: an ingest may have run since this project was loaded.
            pool = ImagePool(self.cfg.paths.images, self.cfg.paths.pool)
            changed = []
            for e in todo:
                held = Path(e.held) if e.held else None
                if e.sha256 not in pool:
                    reason = "its private copy is gone"
                    if held is not None and held.is_file():
                        report = pool.ingest([held], self.cfg.ingest)
                        reason = report.rejected[0].reason if report.rejected else ""
                    if e.sha256 not in pool:
                        log.warning("queued image %s dropped: %s", e.sha256[:12], reason)
                        changed.append(replace(e, status="dropped"))
                        continue
                changed.append(replace(e, in_pool=True, held=None))
            self.queue.update(changed)
            for e in todo:
                if e.held:
                    Path(e.held).unlink(missing_ok=True)
            self.project.pool = pool
            return sum(e.in_pool for e in changed)
        finally:
            lock.release()

    # ------------------------------------------------------------------ MLflow
    def log(self, tracker: Tracker, result: WindowResult) -> str:
        """Log ``result`` to the bundle's monitor run (metrics at step = window index; on alert
        the tags ``defect_loop.alert`` (latest), ``defect_loop.alert.w<index>`` and
        ``defect_loop.alert_count``) and mark it logged. Returns the run id."""
        run_id = tracker.monitor_run(self.bundle_version, self.bundle.digest)
        tracker.log_metrics(run_id, result.metrics, step=result.index)
        if result.alert:
            with self._con() as con:
                count = int(
                    con.execute(
                        "SELECT COUNT(*) FROM windows WHERE alert = 1 AND bundle_version = ?",
                        (result.bundle_version,),
                    ).fetchone()[0]
                )
            tracker.log_tags(
                run_id,
                {
                    TAG + "alert": result.message[:5000],
                    f"{TAG}alert.w{result.index}": result.message[:5000],
                    TAG + "alert_count": str(max(count, 1)),
                },
            )
        with self._con() as con, transaction(con):
            con.execute("UPDATE windows SET logged = 1 WHERE idx = ?", (result.index,))
        return run_id

    def unlogged(self) -> list[WindowResult]:
        """Windows recorded but not yet logged to MLflow (their logging failed)."""
        with self._con() as con:
            rows = con.execute("SELECT doc FROM windows WHERE logged = 0 ORDER BY idx")
            return [WindowResult.from_json(r[0]) for r in rows]

    # ------------------------------------------------------------------ status and a whole run
    def windows(self) -> list[WindowResult]:
        return read_windows(self.dir)

    def status(self) -> dict[str, Any]:
        return {"bundle_version": self.bundle_version, **monitor_status(self.dir)}

    def run(
        self,
        source: Path | None,
        tracker: Tracker | None = None,
        flush: bool = False,
        on_window: Callable[[WindowResult], None] | None = None,
    ) -> MonitorOutcome:
        """Scan ``source`` (None: only what is already waiting), check every ready window,
        commit it and log it to MLflow (with ``tracker``); first catch up on windows whose
        MLflow logging failed before. ``on_window`` sees each result (alerts, progress)."""
        relogged = 0
        if tracker is not None:
            for old in self.unlogged():
                self.log(tracker, old)
                relogged += 1
        self.ingest_queued()
        scan = self.scan(source) if source is not None else None
        results = []
        queued = 0
        for images in self.ready_windows(flush):
            result, _ = self.check(images)
            queued += len(self.commit(result, images))
            if tracker is not None:
                self.log(tracker, result)
            if on_window is not None:
                on_window(result)
            results.append(result)
        return MonitorOutcome(
            self.bundle_version, scan, results, len(self.pending()), queued, relogged
        )


def monitor_status(monitor_dir: Path) -> dict[str, Any]:
    """Counts of a workspace's monitor: images by status (pending, done, missing), rejected
    files, windows, alerts, queue entries (queued, pushed, not in the pool yet), last window."""
    if not (Path(monitor_dir) / DB_FILE).is_file():
        return {"images": {}, "rejected_files": 0, "windows": 0, "alerts": 0, "queue": {}}
    con = connect(monitor_dir)
    try:
        for stmt in _SCHEMA:
            con.execute(stmt)
        counts = dict(con.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        n_windows, n_alerts = con.execute(
            "SELECT COUNT(*), COALESCE(SUM(alert), 0) FROM windows"
        ).fetchone()
        rejected = con.execute("SELECT COUNT(*) FROM files WHERE reason IS NOT NULL").fetchone()[0]
        last = con.execute(
            "SELECT idx, created_at, alert FROM windows ORDER BY idx DESC LIMIT 1"
        ).fetchone()
    finally:
        con.close()
    entries = ReviewQueue(monitor_dir).entries()
    return {
        "images": {str(k): int(v) for k, v in counts.items()},
        "rejected_files": int(rejected),
        "windows": int(n_windows),
        "alerts": int(n_alerts),
        "last_window": None
        if last is None
        else {"index": int(last[0]), "at": last[1], "alert": bool(last[2])},
        "queue": {
            "queued": sum(e.status == "queued" for e in entries),
            "pushed": sum(e.status == "pushed" for e in entries),
            "dropped": sum(e.status == "dropped" for e in entries),
            "not_in_pool_yet": sum(e.status == "queued" and not e.in_pool for e in entries),
        },
    }


@contextmanager
def monitor_lock(monitor_dir: Path) -> Iterator[bool]:
    """The monitor's own lock (``<monitor_dir>/cycle.lock``): yields False when another monitor
    of the workspace is running (then do nothing), True while this one holds it."""
    lock = CycleLock(monitor_dir)
    got = lock.acquire("skip", 0, "monitor")
    try:
        yield got
    finally:
        if got:
            lock.release()
