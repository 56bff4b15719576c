"""Shared helpers for the flows: build the project objects from a config path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loop.config import ProjectConfig, load_config
from loop.project import Project
from loop.tracking import Tracker

# Retries only where they help: network I/O to Label Studio and MLflow, never training.
NETWORK_RETRIES = 2
NETWORK_RETRY_DELAYS = [2.0, 10.0]


@dataclass
class Context:
    cfg: ProjectConfig
    project: Project
    tracker: Tracker


def open_context(config_path: str | Path) -> Context:
    cfg = load_config(Path(config_path))
    return Context(cfg, Project(cfg), Tracker(cfg))
