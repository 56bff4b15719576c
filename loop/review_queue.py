"""The review queue: production images the monitor found most novel or uncertain, which the
next push puts first so that labelers see a new pattern before anything else.

Stored in the monitor's SQLite database (``<workspace>/monitor/monitor.sqlite``, table
``queue``), keyed by image sha256: an image is queued at most once, ever, whatever restarts or
re-scans happen. An entry is ``queued`` until a push sends it to Label Studio (``pushed``, with
its task id). ``in_pool`` says whether the image is in the project's pool yet (the monitor adds
it there as soon as it can take the workspace lock; until then a private copy is ``held``).

Queue order: highest ``priority`` first (see `loop.windows.select_for_queue`), then older
windows, then sha256.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

DB_FILE = "monitor.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    sha256 TEXT PRIMARY KEY,
    priority REAL NOT NULL,
    window INTEGER NOT NULL,
    status TEXT NOT NULL,
    in_pool INTEGER NOT NULL,
    doc TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class QueueEntry:
    """One queued image. ``novelty``/``uncertainty``: the image's nearest-neighbour distance
    and uncertainty divided by the reference's thresholds (> 1: beyond them); ``priority`` is
    the larger of the two and ``reason`` says which. ``boxes``: the production model's boxes
    at or above the bundle's defect threshold, ``[x1, y1, x2, y2, class_id, confidence]`` in
    pixels. ``held``: the private copy kept until the image is in the pool."""

    sha256: str
    priority: float
    reason: str
    novelty: float
    uncertainty: float
    window: int
    bundle_version: str
    source: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    queued_at: str = ""
    held: str | None = None
    in_pool: bool = False
    status: str = "queued"
    task_id: int | None = None
    pushed_at: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @staticmethod
    def from_json(text: str) -> QueueEntry:
        return QueueEntry(**json.loads(text))


class _Scored(Protocol):
    @property
    def sha256(self) -> str: ...

    @property
    def score(self) -> float: ...


T = TypeVar("T", bound=_Scored)


def connect(monitor_dir: Path) -> sqlite3.Connection:
    """The monitor database (created on first use), WAL mode, waiting up to 60 s for a writer."""
    Path(monitor_dir).mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(Path(monitor_dir) / DB_FILE, timeout=60.0, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


@contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error): one writer at a time."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


class ReviewQueue:
    """The queue of one workspace (``monitor_dir`` = ``cfg.paths.monitor``). Reading a workspace
    that never ran the monitor creates nothing and gives an empty queue."""

    def __init__(self, monitor_dir: Path) -> None:
        self.monitor_dir = Path(monitor_dir)

    def _exists(self) -> bool:
        return (self.monitor_dir / DB_FILE).is_file()

    @contextmanager
    def _con(self) -> Iterator[sqlite3.Connection]:
        con = connect(self.monitor_dir)
        try:
            con.execute(_SCHEMA)
            yield con
        finally:
            con.close()

    def entries(self, status: str | None = None) -> list[QueueEntry]:
        """Entries in queue order (optionally only those with ``status``)."""
        if not self._exists():
            return []
        sql = "SELECT doc FROM queue"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        sql += " ORDER BY priority DESC, window ASC, sha256 ASC"
        with self._con() as con:
            return [QueueEntry.from_json(r[0]) for r in con.execute(sql, args)]

    def __contains__(self, sha: object) -> bool:
        if not self._exists():
            return False
        with self._con() as con:
            return (
                con.execute("SELECT 1 FROM queue WHERE sha256 = ?", (sha,)).fetchone() is not None
            )

    def __len__(self) -> int:
        if not self._exists():
            return 0
        with self._con() as con:
            return int(con.execute("SELECT COUNT(*) FROM queue").fetchone()[0])

    def add(
        self, entries: Iterable[QueueEntry], con: sqlite3.Connection | None = None
    ) -> list[QueueEntry]:
        """Queue ``entries``; an image already queued (by sha256, in any status) is left as it
        was. Returns the entries added. ``con``: run inside the caller's transaction."""
        now = datetime.now(UTC).isoformat(timespec="seconds")

        def insert(c: sqlite3.Connection) -> list[QueueEntry]:
            c.execute(_SCHEMA)
            added = []
            for e in entries:
                e = e if e.queued_at else replace(e, queued_at=now)
                cur = c.execute(
                    "INSERT OR IGNORE INTO queue (sha256, priority, window, status, in_pool, doc) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (e.sha256, e.priority, e.window, e.status, int(e.in_pool), e.to_json()),
                )
                if cur.rowcount == 1:
                    added.append(e)
            return added

        if con is not None:
            return insert(con)
        with self._con() as c, transaction(c):
            return insert(c)

    def update(self, entries: Sequence[QueueEntry]) -> None:
        """Store new field values of entries already queued (matched by sha256)."""
        if not entries:
            return
        with self._con() as con, transaction(con):
            for e in entries:
                con.execute(
                    "UPDATE queue SET priority = ?, window = ?, status = ?, in_pool = ?, doc = ? "
                    "WHERE sha256 = ?",
                    (e.priority, e.window, e.status, int(e.in_pool), e.to_json(), e.sha256),
                )

    def first(self, ranked: Sequence[T]) -> list[T]:
        """``ranked`` (dataclasses with ``sha256`` and ``score``, e.g. `ScoredImage`) with the
        queued images it contains moved to the front in queue order, their ``score`` raised
        above every other image's (the highest score + their count - their place), so that
        Label Studio's priority orderings also serve them first. The rest keep their order and
        scores. Images queued but absent from ``ranked`` (not in the pool yet, labeled, or in
        the frozen test split) are not added."""
        waiting = [e.sha256 for e in self.entries("queued")]
        if not waiting:
            return list(ranked)
        pos = {s: i for i, s in enumerate(waiting)}
        head = sorted((r for r in ranked if r.sha256 in pos), key=lambda r: pos[r.sha256])
        top = max([0.0, *(float(r.score) for r in ranked)])
        lead = [replace(r, score=top + len(head) - i) for i, r in enumerate(head)]  # type: ignore[type-var]
        return lead + [r for r in ranked if r.sha256 not in pos]

    def mark_pushed(self, task_ids: dict[str, int]) -> list[QueueEntry]:
        """Mark the queued images among ``task_ids`` (sha256 -> Label Studio task id) pushed."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        done = [
            replace(e, status="pushed", task_id=int(task_ids[e.sha256]), pushed_at=now)
            for e in self.entries("queued")
            if e.sha256 in task_ids
        ]
        self.update(done)
        return done
