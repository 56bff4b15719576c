"""What the workspace remembers about its Label Studio tasks: what it pushed, what it rejected.

- `TaskLedger` (``<workspace>/labelstudio-tasks.json``): every task ``push`` created or reused,
  with the image sha256 and the image URL it was pushed with. ``pull`` takes an annotation only
  from a task of this ledger whose data still names the same image: a task created by hand, or
  whose ``data.sha256`` or ``data.image`` was edited afterwards, is rejected as tampered. Task
  data is writable by anyone with an API token; the ledger is not.
- `RejectionLog` (``<workspace>/rejected-tasks.json``): the tasks the last pulls could not use,
  with the reason, kept until the task changes (a later pull judges it again) or disappears.
  ``status``, ``defect-loop rejections`` and the lead report list them.

Both files are small JSON documents written atomically; only a holder of the workspace lock
writes them (see `loop.scheduling.workspace_lock`). Nothing here talks to Label Studio.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loop.errors import DatasetError
from loop.images import atomic_write_text

_FORMAT = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"{path} ({what}) is unreadable: {exc}; restore it from a backup or delete it"
        ) from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"{path} ({what}) is not a JSON object; restore or delete it")
    return doc


@dataclass(frozen=True)
class PushedTask:
    """One task the workspace pushed: Label Studio ``project_id``/``task_id``, the image
    ``sha256`` and the ``image`` URL of its task data (``/data/local-files/?d=...``).
    ``overlap``: the annotators it was pushed for (1, or ``quality.overlap_annotators`` when
    chosen for overlap by ``overlap_rule``, which is named there)."""

    project_id: int
    task_id: int
    sha256: str
    image: str
    pushed_at: str = ""
    overlap: int = 1
    overlap_rule: str = ""


class TaskLedger:
    """The tasks pushed by this workspace, keyed by (project id, task id)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        doc = _read(path, "the ledger of pushed Label Studio tasks")
        self.exists = bool(doc)
        self._tasks: dict[tuple[int, int], PushedTask] = {}
        for row in doc.get("tasks", []):
            t = PushedTask(**row)
            self._tasks[(t.project_id, t.task_id)] = t

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, project_id: int, task_id: int) -> PushedTask | None:
        return self._tasks.get((int(project_id), int(task_id)))

    def record(
        self,
        project_id: int,
        task_id: int,
        sha256: str,
        image: str,
        overlap: int = 1,
        overlap_rule: str = "",
    ) -> None:
        """Remember a pushed task (the first record of a task id wins: ids are never reused)."""
        key = (int(project_id), int(task_id))
        if key not in self._tasks:
            self._tasks[key] = PushedTask(
                key[0], key[1], sha256, image, _now(), int(overlap), overlap_rule
            )

    def tasks(self, project_id: int) -> list[PushedTask]:
        return [t for (pid, _), t in sorted(self._tasks.items()) if pid == int(project_id)]

    def save(self) -> None:
        rows = [asdict(t) for _, t in sorted(self._tasks.items())]
        atomic_write_text(self.path, json.dumps({"format": _FORMAT, "tasks": rows}, indent=1))
        self.exists = True


@dataclass(frozen=True)
class TaskRejection:
    """A task the last pulls could not use. ``first_seen``/``last_seen``: UTC ISO times of the
    pull that first rejected it (while unchanged) and of the latest pull that did."""

    project_id: int
    task_id: int
    reason: str
    first_seen: str
    last_seen: str

    def line(self) -> str:
        return f"Label Studio task {self.task_id}: {self.reason}"


class RejectionLog:
    """Open rejections, keyed by (project id, task id)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        doc = _read(path, "the list of rejected Label Studio tasks")
        self._open: dict[tuple[int, int], TaskRejection] = {}
        for row in doc.get("rejections", []):
            r = TaskRejection(**row)
            self._open[(r.project_id, r.task_id)] = r

    def __len__(self) -> int:
        return len(self._open)

    def open(self, project_id: int | None = None) -> list[TaskRejection]:
        """Open rejections by task id (of one project, or all)."""
        return [
            r
            for (pid, _), r in sorted(self._open.items())
            if project_id is None or pid == int(project_id)
        ]

    def update(
        self,
        project_id: int,
        found: Mapping[int, str],
        examined: Iterable[int] | None,
    ) -> None:
        """Apply one pull: ``found`` (task id -> reason) is what it rejected; ``examined`` the
        tasks it judged (None: every task of the project, a full pull). An examined task that is
        not in ``found`` is no longer rejected; tasks that were not examined keep their entry."""
        pid = int(project_id)
        now = _now()
        judged = None if examined is None else {int(t) for t in examined} | set(found)
        for key in list(self._open):
            if key[0] == pid and (judged is None or key[1] in judged) and key[1] not in found:
                del self._open[key]
        for tid, reason in found.items():
            old = self._open.get((pid, int(tid)))
            first = old.first_seen if old is not None and old.reason == reason else now
            self._open[(pid, int(tid))] = TaskRejection(pid, int(tid), reason, first, now)

    def forget(self, project_id: int, task_ids: Iterable[int]) -> None:
        """Drop the entries of tasks that no longer exist in Label Studio."""
        for tid in task_ids:
            self._open.pop((int(project_id), int(tid)), None)

    def save(self) -> None:
        rows = [asdict(r) for _, r in sorted(self._open.items())]
        doc = {"format": _FORMAT, "rejections": rows}
        atomic_write_text(self.path, json.dumps(doc, indent=1))
