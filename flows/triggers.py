"""`check-annotations` flow: the count trigger.

Counts the annotations made since the last training (labeled images the trained dataset version
lacks or labels differently, plus annotated Label Studio tasks not pulled yet) and, when there
are at least ``schedule.count_trigger`` and no cycle is running or queued, starts a run of the
``cycle/<project>`` deployment. `defect-loop serve` runs it every ``schedule.check_interval_s``
seconds; a webhook receiver can run it on each annotation event
(``run_deployment("check-annotations/<project>", timeout=0)``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.common import NETWORK_TASK, Context, open_context
from loop.errors import DatasetError, ServiceError
from loop.scheduling import (
    CycleLock,
    TriggerDecision,
    annotated_pending,
    changed_rows,
    count_trigger_decision,
    deployment_name,
)

# A cycle run scheduled to start within this window counts as queued (cron runs further ahead
# do not).
_QUEUED_WINDOW = timedelta(minutes=2)


@task(name="count-new-annotations", cache_policy=NONE, **NETWORK_TASK)
def count_new_annotations_task(ctx: Context) -> int:
    """Annotations since the last training: pulled-but-untrained rows plus annotated pending
    Label Studio tasks (one export call)."""
    classes = list(ctx.cfg.classes)
    version = ctx.project.current_version()
    current = {} if version is None else {r.sha256: r.canonical(classes) for r in version.rows}
    trained = None
    digest = ctx.tracker.last_trained_digest()
    if digest is not None:
        try:
            old = ctx.project.store.load(digest)
            trained = {r.sha256: r.canonical(classes) for r in old.rows}
        except DatasetError:
            get_run_logger().warning(
                "the last trained dataset version %s is not in this workspace: counting every "
                "labeled image as new",
                digest[:12],
            )
    n = changed_rows(current, trained)
    state = ctx.project.state
    if state.pending and state.ls_project_id is not None:
        exported = ctx.project.gateway().export_tasks(state.ls_project_id)
        n += annotated_pending(exported, state.pending)
    return n


def cycle_queued(name: str) -> bool:
    """True when the ``cycle/<name>`` deployment has a run running, pending or due now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(f"cycle/{name}")
        except ObjectNotFound:
            return False
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
                    )
                )
            ),
        )
    due = datetime.now(UTC) + _QUEUED_WINDOW
    for run in runs:
        if run.state is not None and run.state.type != StateType.SCHEDULED:
            return True
        start = run.expected_start_time or run.next_scheduled_start_time
        if start is None or start <= due:
            return True
    return False


def start_cycle(name: str, config_path: str, reason: str) -> str:
    """Create a run of ``cycle/<name>`` (does not wait for it); returns its id."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run: Any = run_deployment(
            name=f"cycle/{name}",
            parameters={"config_path": config_path},
            timeout=0,
            tags=["count-trigger"],
            as_subflow=False,
        )
    except ObjectNotFound as exc:
        raise ServiceError(
            f"the count trigger fired ({reason}) but the deployment 'cycle/{name}' does not "
            "exist on this Prefect server: run `defect-loop serve` against it"
        ) from exc
    return str(run.id)


@flow(name="check-annotations", log_prints=True)
def check_annotations_flow(config_path: str) -> TriggerDecision:
    """Start a cycle when at least ``schedule.count_trigger`` annotations are new."""
    ctx = open_context(config_path)
    log = get_run_logger()
    threshold = ctx.cfg.schedule.count_trigger
    if threshold is None:
        decision = count_trigger_decision(0, None)
        log.info(decision.reason)
        return decision
    n = count_new_annotations_task(ctx)
    name = deployment_name(ctx.cfg.name)
    busy = CycleLock(ctx.cfg.workspace).is_locked() or cycle_queued(name)
    decision = count_trigger_decision(n, threshold, cycle_running=busy)
    log.info("count trigger: %s", decision.reason)
    if decision.fire:
        run_id = start_cycle(name, config_path, decision.reason)
        log.info("started cycle/%s run %s", name, run_id)
    return decision


def request_check(project_name: str) -> str:
    """Start a run of ``check-annotations/<project>`` without waiting (e.g. from a webhook
    receiver's callback, `loop.webhooks.WebhookReceiver`); returns the run id. Needs
    PREFECT_API_URL pointing at the server `defect-loop serve` registered the deployments on."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = deployment_name(project_name)
    try:
        run: Any = run_deployment(
            name=f"check-annotations/{name}", timeout=0, tags=["webhook"], as_subflow=False
        )
    except ObjectNotFound as exc:
        raise ServiceError(
            f"the deployment 'check-annotations/{name}' does not exist on this Prefect server: "
            "run `defect-loop serve` against it (and set PREFECT_API_URL here)"
        ) from exc
    return str(run.id)
