"""Pure helpers behind the orchestration: batching, the count trigger, the cycle lock, retries.

Nothing here imports Prefect; `flows/` wraps these in tasks, deployments and schedules.

- `batches`: split the scoring candidates into fixed-size, ordered batches (one task each).
- `count_new_annotations` / `count_trigger_decision`: has enough been labeled since the last
  training to start a cycle?
- `CycleLock`: one cycle per workspace at a time (an ``flock`` on ``<workspace>/cycle.lock``),
  with the ``wait`` or ``skip`` policy of ``schedule.concurrency``. `workspace_lock`: the same
  lock for any single command that writes the workspace (ingest, import, pull, push), re-entrant
  within the thread that already holds it (a flow holding it calls `Project` methods that take it).
- `is_transient`: which failures of a network task are worth a retry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from loop.errors import DefectLoopError, ServiceError

T = TypeVar("T")

LOCK_FILE_NAME = "cycle.lock"
CYCLE_STEPS = ("pull", "train", "score", "push")


class CycleStepError(DefectLoopError):
    """One step of a cycle failed; names the step and the cause. Nothing after it ran."""

    def __init__(self, step: str, cause: BaseException) -> None:
        detail = str(cause) or repr(cause)
        super().__init__(
            f"cycle step {step!r} failed: {type(cause).__name__}: {detail}. The steps after "
            f"{step!r} did not run; dataset versions are written atomically, so none is "
            "half-written. Fix the cause and start the cycle again."
        )
        self.step = step
        self.cause = cause


class CycleBusyError(DefectLoopError):
    """Another cycle held the workspace's cycle lock for longer than the wait allowed."""


# --------------------------------------------------------------------------------------------
# batching and merging
# --------------------------------------------------------------------------------------------


def batches(ids: Sequence[T], size: int) -> list[list[T]]:
    """``ids`` in order, cut into lists of ``size`` (the last one shorter). Empty in, empty out."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def merge_in_order(order: Sequence[str], parts: Iterable[Iterable[tuple[Any, ...]]]) -> list[Any]:
    """The rows of ``parts`` (``(id, ...)`` tuples) rearranged into the order of ``order``.

    Raises `DefectLoopError` when an id is missing, repeated or unknown, so a lost or doubled
    batch can never yield a silently different ranking.
    """
    by_id: dict[str, Any] = {}
    for part in parts:
        for row in part:
            key = row[0]
            if key in by_id:
                raise DefectLoopError(f"image {key[:12]} was scored twice; report this as a bug")
            by_id[key] = row
    missing = [k for k in order if k not in by_id]
    extra = set(by_id) - set(order)
    if missing or extra:
        raise DefectLoopError(
            f"scoring returned {len(by_id)} results for {len(order)} images "
            f"({len(missing)} missing, {len(extra)} unexpected); re-run the scoring"
        )
    return [by_id[k] for k in order]


# --------------------------------------------------------------------------------------------
# the count trigger
# --------------------------------------------------------------------------------------------


def annotated_pending(exported: Iterable[Mapping[str, Any]], pending: Mapping[str, int]) -> int:
    """How many pushed-but-not-pulled tasks (``pending``: sha256 -> task id) now carry at least
    one non-cancelled annotation, from Label Studio's JSON export of annotated tasks."""
    waiting = set(pending.values())
    shas = set(pending)
    n = 0
    for task in exported:
        data = task.get("data") or {}
        if int(task.get("id") or -1) not in waiting and data.get("sha256") not in shas:
            continue
        if any(not a.get("was_cancelled") for a in task.get("annotations") or []):
            n += 1
    return n


def changed_rows(current: Mapping[str, str], trained: Mapping[str, str] | None) -> int:
    """Labeled images whose label differs between two versions (``sha256 -> canonical row``):
    new images plus relabeled ones. ``trained`` None (never trained) counts every row."""
    if trained is None:
        return len(current)
    return sum(1 for sha, row in current.items() if trained.get(sha) != row)


@dataclass(frozen=True)
class TriggerDecision:
    """Whether the count trigger fires: ``count`` new annotations against ``threshold``."""

    fire: bool
    count: int
    threshold: int | None
    reason: str


def count_trigger_decision(
    new_annotations: int, threshold: int | None, cycle_running: bool = False
) -> TriggerDecision:
    """Fire when ``new_annotations >= threshold`` and no cycle runs (its own pull will see them)."""
    if threshold is None:
        return TriggerDecision(
            False, new_annotations, None, "schedule.count_trigger is not set: count trigger off"
        )
    if new_annotations < threshold:
        return TriggerDecision(
            False,
            new_annotations,
            threshold,
            f"{new_annotations} new annotations since the last training, fewer than {threshold}",
        )
    if cycle_running:
        return TriggerDecision(
            False,
            new_annotations,
            threshold,
            f"{new_annotations} new annotations, but a cycle is already running or queued",
        )
    return TriggerDecision(
        True,
        new_annotations,
        threshold,
        f"{new_annotations} new annotations since the last training (>= {threshold})",
    )


# --------------------------------------------------------------------------------------------
# one cycle at a time
# --------------------------------------------------------------------------------------------

Policy = Literal["wait", "skip"]


class CycleLock:
    """An exclusive lock on ``<workspace>/cycle.lock`` held for the whole cycle.

    `fcntl.flock` on an open file: released by the kernel when the holder exits, however it
    dies, so a crashed cycle never blocks the next. Works across processes and threads on one
    host and on a shared volume that supports ``flock`` (local disks, Docker volumes). The file
    records who holds it (host, pid, what, since) for the messages of waiting or skipped cycles.

    ``acquire(policy, timeout_s)`` returns True when the lock is held; with ``skip`` it returns
    False at once when another holder has it; with ``wait`` it polls until free and raises
    `CycleBusyError` after ``timeout_s`` seconds.
    """

    def __init__(self, workspace: Path, poll_s: float = 1.0) -> None:
        self.path = Path(workspace) / LOCK_FILE_NAME
        self.poll_s = poll_s
        self._fd: int | None = None

    @property
    def _key(self) -> str:
        return str(self.path.resolve())

    def _register(self) -> None:
        with _HELD_GUARD:
            _HELD[self._key] = threading.get_ident()

    def _unregister(self) -> None:
        with _HELD_GUARD:
            if _HELD.get(self._key) == threading.get_ident():
                del _HELD[self._key]

    def _try(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise ServiceError(
                f"cannot lock {self.path} ({exc}); the workspace must be on a file system that "
                "supports flock (a local disk or a Docker volume, not every network share)"
            ) from exc
        self._fd = fd
        return True

    def acquire(self, policy: Policy, timeout_s: float, what: str = "cycle") -> bool:
        if self._fd is not None:
            raise DefectLoopError(f"{self.path} is already held by this object")
        if policy not in ("wait", "skip"):
            raise ValueError(f"policy must be 'wait' or 'skip', got {policy!r}")
        deadline = time.monotonic() + timeout_s
        while not self._try():
            if policy == "skip":
                return False
            if time.monotonic() >= deadline:
                raise CycleBusyError(
                    f"waited {timeout_s:.0f} s for the running cycle ({self.holder_text()}) to "
                    "finish; it still holds the lock. Wait longer (schedule.wait_timeout_s), or "
                    "use schedule.concurrency: skip"
                )
            time.sleep(self.poll_s)
        fd = self._fd
        if fd is not None:
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "what": what,
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self._register()
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._unregister()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def is_locked(self) -> bool:
        """True when anyone (another process, thread or this object) holds the lock now."""
        if self._fd is not None:
            return True
        if not self.path.exists():
            return False
        if self._try():
            self.release()
            return False
        return True

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (empty when unreadable or free)."""
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def holder_text(self) -> str:
        h = self.holder()
        if not h:
            return f"holder of {self.path}"
        return (
            f"{h.get('what', 'cycle')} pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
        )

    def __enter__(self) -> CycleLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# Lock files (resolved paths) held in this process -> the thread that holds each. Lets a command
# that already holds a workspace's lock call code that takes it again (`workspace_lock`).
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


def held_by_this_thread(workspace: Path) -> bool:
    """True when this thread holds ``workspace``'s lock (through any `CycleLock`)."""
    key = str((Path(workspace) / LOCK_FILE_NAME).resolve())
    with _HELD_GUARD:
        return _HELD.get(key) == threading.get_ident()


@contextlib.contextmanager
def workspace_lock(
    workspace: Path,
    what: str,
    timeout_s: float,
    on_wait: Callable[[str], None] | None = None,
    poll_s: float = 0.2,
) -> Iterator[bool]:
    """Hold ``workspace``'s cycle lock (waiting up to ``timeout_s`` for its holder) while the
    block runs: the one-writer-at-a-time rule of every command that writes the workspace.

    Yields True when this call took the lock, False when this thread already held it (re-entry:
    nothing is taken or released). ``on_wait(holder)`` is called once when it has to wait.
    Raises `CycleBusyError` after ``timeout_s`` seconds.
    """
    if held_by_this_thread(workspace):
        yield False
        return
    lock = CycleLock(workspace, poll_s=poll_s)
    if on_wait is not None and lock.is_locked():
        on_wait(lock.holder_text())
    lock.acquire("wait", timeout_s, what)
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def cycle_guard(
    workspace: Path, policy: Policy, timeout_s: float, what: str = "cycle"
) -> Iterator[bool]:
    """``with cycle_guard(ws, "skip", t) as acquired:``; run the cycle only when ``acquired``."""
    lock = CycleLock(workspace)
    acquired = lock.acquire(policy, timeout_s, what)
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()


# --------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------

# MLflow REST error codes that may succeed when asked again.
_TRANSIENT_MLFLOW_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"}
)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures a retry may fix: services unreachable, timeouts, dropped connections,
    HTTP 5xx-like MLflow errors. False for our own named errors (bad config, missing model, a
    refused request, bad labels) and for anything else: retrying those only delays the message.
    """
    if exc is None:
        return False
    if isinstance(exc, ServiceError):
        return True
    if isinstance(exc, DefectLoopError):
        return False
    import httpx

    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return True
    code = getattr(exc, "error_code", None)
    if isinstance(code, str) and type(exc).__name__ == "MlflowException":
        return code in _TRANSIENT_MLFLOW_CODES
    names = {c.__name__ for c in type(exc).__mro__}
    # requests' ConnectionError/Timeout (what MLflow's REST client raises underneath).
    return bool(names & {"ConnectionError", "Timeout", "ProtocolError"})


# --------------------------------------------------------------------------------------------
# deployments
# --------------------------------------------------------------------------------------------

DEPLOYED_FLOWS = ("cycle", "check-annotations", "ingest", "train", "score", "push", "pull")


def deployment_name(project_name: str) -> str:
    """The name every deployment of a project gets (``cycle/<this>``): the project name with
    characters Prefect or a shell would trip on replaced by ``-``."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in project_name.strip())
    cleaned = cleaned.strip("-")
    if not cleaned:
        raise ValueError(f"project name {project_name!r} gives an empty deployment name")
    return cleaned
