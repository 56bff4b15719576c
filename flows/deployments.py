"""The deployments `defect-loop serve` serves, with the schedules from the config.

Every flow is deployed as ``<flow>/<project>`` (``<project>``: the config's ``name``, see
`loop.scheduling.deployment_name`) with ``config_path`` preset, so any of them can be run from
the Prefect CLI or UI, e.g. ``prefect deployment run 'cycle/defect-loop' --watch``.

- ``cycle/<project>``: on ``schedule.cycle_cron`` (in ``schedule.timezone``) when set.
- ``check-annotations/<project>``: every ``schedule.check_interval_s`` seconds when
  ``schedule.count_trigger`` is set (starts a cycle when enough annotations are new).
- ``ingest``, ``train``, ``score``, ``push``, ``pull`` (and ``report``, ``review-labels`` when
  `flows.report`, `flows.review` exist): no schedule, run on demand (``ingest`` needs
  ``--param source=/path/to/images``).
- ``monitor/<project>``: every ``monitor.interval_s`` seconds when ``monitor.watch_dir`` is set,
  else on demand (``--param source=/path/to/production/images``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from prefect.schedules import Cron, Interval
from prefect.types.entrypoint import EntrypointType

from flows.cycle import cycle_flow
from flows.ingest import ingest_flow
from flows.monitor import monitor_flow
from flows.score import score_flow
from flows.sync import pull_flow, push_flow
from flows.train import train_flow
from flows.triggers import check_annotations_flow
from loop.config import ProjectConfig, load_config
from loop.scheduling import deployment_name

TAGS = ["defect-loop"]


def _optional_flows() -> list[Any]:
    """Flows of modules other developers may add (served when present)."""
    out = []
    for module, attr in (("flows.report", "report_flow"), ("flows.review", "review_labels_flow")):
        try:
            fl = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            continue
        if fl is not None:
            out.append(fl)
    return out


def build_deployments(config_path: str | Path, cfg: ProjectConfig | None = None) -> list[Any]:
    """The `RunnerDeployment` of every flow for the project at ``config_path``."""
    path = Path(config_path).resolve()
    cfg = load_config(path) if cfg is None else cfg
    name = deployment_name(cfg.name)
    params = {"config_path": str(path)}
    sched = cfg.schedule
    common: dict[str, Any] = {
        "parameters": params,
        "tags": [*TAGS, name],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    cycle_schedules = (
        [Cron(sched.cycle_cron, timezone=sched.timezone)] if sched.cycle_cron is not None else []
    )
    check_schedules = [Interval(sched.check_interval_s)] if sched.count_trigger is not None else []
    deployments = [
        cycle_flow.to_deployment(
            name,
            schedules=cycle_schedules,
            description=f"pull -> train -> promote -> score -> push for {cfg.name}; one at a "
            f"time (a second run {'waits' if sched.concurrency == 'wait' else 'is skipped'})",
            **common,
        ),
        check_annotations_flow.to_deployment(
            name,
            schedules=check_schedules,
            description=(
                f"count trigger: start cycle/{name} at >= {sched.count_trigger} new annotations"
                if sched.count_trigger is not None
                else "count trigger (off: schedule.count_trigger is not set)"
            ),
            **common,
        ),
    ]
    for fl in (ingest_flow, train_flow, score_flow, push_flow, pull_flow, *_optional_flows()):
        deployments.append(fl.to_deployment(name, **common))
    mon = cfg.monitor
    deployments.append(
        monitor_flow.to_deployment(
            name,
            schedules=[Interval(mon.interval_s)] if mon.watch_dir is not None else [],
            description=(
                f"check new images in {mon.watch_dir} with the production bundle"
                if mon.watch_dir is not None
                else "check production images (on demand: --param source=/path; set "
                "monitor.watch_dir to poll a folder)"
            ),
            **common,
        )
    )
    return deployments


def serve_deployments(config_path: str | Path, limit: int | None = None) -> None:
    """Register the deployments on the Prefect server (PREFECT_API_URL) and run their flow
    runs here until interrupted. Schedules stay active when this process stops: runs that come
    due meanwhile wait for the next `serve`."""
    from prefect import serve

    serve(*build_deployments(config_path), limit=limit, pause_on_shutdown=False)
