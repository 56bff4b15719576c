"""`monitor` flow: check new production images with the production bundle (`loop.monitor`).

One run scans the folder (``source``, default ``monitor.watch_dir``), checks every full window
of waiting images (``flush``: also the last partial one), records each window, queues its most
novel or uncertain images and logs it to MLflow. A window that alerts also emits the Prefect
event ``defect-loop.monitor.alert`` (resource ``defect-loop.project.<name>``; payload: window,
bundle version, fired tests, message), and the run ends in a COMPLETED state named
``Drift alert`` whose message lists the alerts; automations can act on either. Served by
`defect-loop serve` as ``monitor/<project>``, every ``monitor.interval_s`` seconds when
``monitor.watch_dir`` is set. Two monitor runs of one workspace never overlap: the second one
returns at once (state ``Skipped``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed

from flows.common import NETWORK_TASK, Context, open_context
from loop.bundle import load_bundle
from loop.errors import ConfigError, DeployError
from loop.monitor import Monitor, MonitorOutcome, ScanResult, monitor_lock
from loop.monitor import PendingImage as _Pending
from loop.tracking import ProductionBundle
from loop.windows import WindowResult

ALERT_EVENT = "defect-loop.monitor.alert"


@task(name="production-bundle", cache_policy=NONE, **NETWORK_TASK)
def production_task(ctx: Context) -> ProductionBundle:
    prod = ctx.tracker.production()
    if prod is None:
        raise DeployError("nothing is in production yet: run `defect-loop deploy` first")
    return prod


@task(name="catch-up-mlflow", cache_policy=NONE, **NETWORK_TASK)
def catch_up_task(monitor: Monitor, ctx: Context) -> int:
    """Log the windows whose MLflow logging failed on an earlier run."""
    old = monitor.unlogged()
    for w in old:
        monitor.log(ctx.tracker, w)
    return len(old)


@task(name="scan-images", cache_policy=NONE)
def scan_task(monitor: Monitor, source: Path) -> ScanResult:
    return monitor.scan(source)


@task(name="check-window", cache_policy=NONE, task_run_name="check-window-{index}")
def check_task(monitor: Monitor, images: list[_Pending], index: int) -> WindowResult:
    """Score, test and record one window (its queued images join the pool when it can)."""
    result, _ = monitor.check(images, index)
    monitor.commit(result, images)
    return result


@task(name="log-window", cache_policy=NONE, **NETWORK_TASK)
def log_task(monitor: Monitor, ctx: Context, result: WindowResult) -> str:
    # Safe to retry: metrics at the same step and the same tags are written again.
    return monitor.log(ctx.tracker, result)


def emit_alert(ctx: Context, result: WindowResult) -> None:
    """The Prefect event of an alerting window."""
    from prefect.events import emit_event

    emit_event(
        event=ALERT_EVENT,
        resource={
            "prefect.resource.id": f"defect-loop.project.{ctx.cfg.name}",
            "prefect.resource.name": ctx.cfg.name,
        },
        payload={
            "window": result.index,
            "bundle_version": result.bundle_version,
            "fired": list(result.fired),
            "p_values": {t.name: t.p_value for t in result.tests},
            "message": result.message,
        },
    )


def run_monitor(ctx: Context, source: str | None = None, flush: bool = False) -> Any:
    log = get_run_logger()
    folder = Path(source) if source else ctx.cfg.monitor.watch_dir
    if folder is None:
        raise ConfigError(
            "no folder to monitor: pass one (`defect-loop monitor --source DIR`) or set "
            "monitor.watch_dir in the config"
        )
    prod = production_task(ctx)
    monitor = Monitor(ctx.project, load_bundle(prod.path), prod.version)
    relogged = catch_up_task(monitor, ctx)
    monitor.ingest_queued()
    scan = scan_task(monitor, folder)
    log.info(
        "scan of %s: %d new images, %d seen before, %d rejected",
        folder,
        scan.new,
        scan.duplicates,
        len(scan.rejected),
    )
    results: list[WindowResult] = []
    queued_before = len(monitor.queue)
    for images in monitor.ready_windows(flush):
        result = check_task(monitor, images, monitor.next_index())
        log_task(monitor, ctx, result)
        if result.alert:
            log.warning(result.message)
            emit_alert(ctx, result)
        else:
            log.info("window %d: no drift (smallest p %.3g)", result.index, result.metrics["min_p"])
        results.append(result)
    outcome = MonitorOutcome(
        prod.version,
        scan,
        results,
        len(monitor.pending()),
        len(monitor.queue) - queued_before,
        relogged,
    )
    if outcome.alerts:
        text = " | ".join(w.message for w in outcome.alerts)
        return Completed(name="Drift alert", message=text[:4000], data=outcome)
    return outcome


@flow(name="monitor", log_prints=True)
def monitor_flow(config_path: str, source: str | None = None, flush: bool = False) -> Any:
    """Check new production images with the production bundle; returns a `MonitorOutcome`
    (in a state named ``Drift alert`` when a window alerted, ``Skipped`` when another monitor
    of the workspace is running)."""
    ctx = open_context(config_path)
    with monitor_lock(ctx.cfg.paths.monitor) as got:
        if not got:
            reason = "skipped: another monitor of this workspace is running"
            get_run_logger().warning(reason)
            return Completed(name="Skipped", message=reason)
        return run_monitor(ctx, source, flush)
