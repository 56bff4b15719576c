"""Shared helpers for the flows: build the project objects from a config path; retry policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from loop.config import ProjectConfig, load_config
from loop.errors import DefectLoopError
from loop.project import Project
from loop.scheduling import CycleLock, Policy, is_transient
from loop.tracking import Tracker

# Retries only where they help: network I/O to Label Studio and MLflow, never training, and
# only for failures a retry can fix (see `loop.scheduling.is_transient`), with growing delays.
NETWORK_RETRIES = 2
NETWORK_RETRY_DELAYS = [2.0, 10.0]
NETWORK_RETRY_JITTER = 0.3


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a network task only for a transient failure."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return is_transient(exc)


# Keyword arguments of every task that talks to Label Studio or MLflow.
NETWORK_TASK: dict[str, Any] = {
    "retries": NETWORK_RETRIES,
    "retry_delay_seconds": NETWORK_RETRY_DELAYS,
    "retry_jitter_factor": NETWORK_RETRY_JITTER,
    "retry_condition_fn": retry_transient,
}


@dataclass
class Context:
    cfg: ProjectConfig
    project: Project
    tracker: Tracker


def open_context(config_path: str | Path) -> Context:
    cfg = load_config(Path(config_path))
    return Context(cfg, Project(cfg), Tracker(cfg))


def run_label(kind: str) -> str:
    """``"<kind> flow run <name>"`` of the current flow run, for lock holders and messages."""
    from prefect.runtime import flow_run

    return f"{kind} flow run {flow_run.name or flow_run.id or '?'}"


def acquire_workspace(cfg: ProjectConfig, policy: Policy, what: str) -> CycleLock | None:
    """Take the workspace's cycle lock (``wait`` or ``skip`` when another holds it).

    Every flow that writes the workspace (ingest, pull, train, push, cycle) holds it, so they
    never interleave their writes of ``state.json``. Returns None when skipped.
    """
    lock = CycleLock(cfg.workspace)
    if policy == "wait" and lock.is_locked():
        get_run_logger().info("the workspace is busy (%s): waiting for it", lock.holder_text())
    if lock.acquire(policy, cfg.schedule.wait_timeout_s, what):
        return lock
    return None


@contextmanager
def locked_context(config_path: str | Path, kind: str) -> Iterator[Context]:
    """Wait for the workspace lock, then load the project (so its state is fresh)."""
    cfg = load_config(Path(config_path))
    lock = acquire_workspace(cfg, "wait", run_label(kind))
    if lock is None:  # pragma: no cover - "wait" never skips
        raise DefectLoopError("could not lock the workspace")
    try:
        yield open_context(config_path)
    finally:
        lock.release()
