"""The two steps that cross into the labeling backend: push images to label, pull labels back.

`Project.push` and `Project.pull` call these; the backend is a `loop.labeling.LabelingBackend`
(Label Studio's gateway, or the oracle of the replay). Push records every task it creates in the
task ledger (`loop.ledger`), pull takes an annotation only from a task of that ledger that still
names the same image, and writes the next dataset version with the correction analytics of the
labels that showed a prediction. Both hold the workspace lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.annotation_log import AnnotationRecord, TaskOutcome, append_outcomes
from loop.consensus import Decision, choose_overlap, decide
from loop.datasets import DatasetVersion, LabeledImage, Split, assign_split
from loop.errors import ConfigError, DatasetError, LabelStudioError, ServiceError
from loop.labeling import LabelingBackend, PulledLabel, PullResult, PushItem, PushSummary
from loop.ledger import RejectionLog, TaskLedger
from loop.quality import preannotation_filter
from loop.review_queue import ReviewQueue
from loop.review_tasks import SeedAnnotations

if TYPE_CHECKING:
    from loop.project import Project, ScoredImage


@dataclass(frozen=True)
class PullOutcome:
    """``labeled``: labels taken; ``rejected``: "Label Studio task <id>: <reason>" lines of the
    tasks this pull rejected that were not already open for that reason (``open_rejections``
    counts them all; `Project.rejections` lists them);
    ``unlabeled``: sha256 of images whose Label Studio annotations were deleted (their labels
    were dropped from the new version; they wait in Label Studio again); ``skipped``: tasks only
    skipped by labelers; ``corrections``: correction metrics (`loop.corrections.correction_metrics`)
    of the new version, for MLflow; ``cursor``: where the next incremental pull starts."""

    labeled: int
    rejected: list[str]
    new_version: str | None
    parent: str | None
    unlabeled: list[str] = field(default_factory=list)
    skipped: int = 0
    corrections: dict[str, float] = field(default_factory=dict)
    cursor: str | None = None
    open_rejections: int = 0  # tasks still rejected after this pull (this one's and earlier)
    # Consensus (`loop.consensus`): tasks merged from agreeing annotators; tasks waiting for
    # their overlap; the review queue after this pull (tasks whose annotators disagree) and
    # the address of its Label Studio view; notes on annotations left out (unusable).
    merged: int = 0
    waiting: int = 0
    review: int = 0
    review_new: int = 0
    review_url: str | None = None
    notes: list[str] = field(default_factory=list)


def push(
    project: Project, gw: LabelingBackend, ranked: list[ScoredImage], model_version: str
) -> PushSummary:
    """Push the top ``select.batch_size`` new images of ``ranked`` as pre-annotated tasks,
    best first; images of ``ranked`` already waiting in Label Studio get a prediction of
    ``model_version`` (and their new priority) when it is a new model version. Images the
    production monitor queued (`loop.review_queue`) lead the batch, with priorities above
    the rest. Boxes of classes below ``advice.preannotation_min_ap50`` are left out of the
    suggestions (`loop.quality.preannotation_filter`). Returns the gateway's `PushSummary`
    (created, refreshed, skipped, failed).

    Every task pushed (or found waiting) is recorded with its image sha256 and URL in the
    task ledger (`loop.ledger.TaskLedger`), which `pull` checks annotations against; that
    holds for the tasks of a push interrupted half-way, too. Images of the frozen test split
    are never sent (``failed``). Holds the workspace lock."""
    with project.writing("push"):
        pid = project.ensure_ls_project(gw)
        ledger = _ledger(project, pid)
        rows = _current_rows(project)
        frozen = [s.sha256 for s in ranked if _split_of(project, s.sha256, rows) == "test"]
        usable = [s for s in ranked if s.sha256 not in set(frozen)]
        fresh = [s for s in usable if s.sha256 not in project.state.pending]
        waiting = [s for s in usable if s.sha256 in project.state.pending]
        # Images the production monitor queued lead the push (loop.review_queue).
        queue = ReviewQueue(project.cfg.paths.monitor)
        fresh = queue.first(fresh)
        batch = fresh[: project.cfg.select.batch_size]
        chosen = batch + waiting
        overlap = _choose_overlap(project, gw, pid, batch)
        rule = project.cfg.quality.overlap_rule
        # Suggestions of classes the champion does not detect usefully cost labelers time.
        _, shown = preannotation_filter(project.cfg, model_version)
        items = [
            PushItem(
                sha256=s.sha256,
                image_url=project.image_url(s.sha256),
                detections=shown(s.detections),
                priority=s.score,
                overlap=overlap.get(s.sha256, 1),
            )
            for s in chosen
        ]
        urls = {it.sha256: it.image_url for it in items}

        def remember(task_ids: dict[str, int]) -> None:
            for sha, tid in task_ids.items():
                n = overlap.get(sha, 1)
                ledger.record(pid, tid, sha, urls[sha], n, rule if n > 1 else "")
            ledger.save()
            queue.mark_pushed(task_ids)
            project.state.pending.update(task_ids)
            project.save_state()

        try:
            summary = gw.push(
                pid,
                items,
                model_version=model_version,
                class_names=list(project.cfg.classes),
                batch_size=project.cfg.labelstudio.batch_size,
                progress=None if project.cfg.labelstudio.progress else False,
            )
        except (ServiceError, LabelStudioError) as exc:
            partial = getattr(exc, "partial", None)
            if partial is not None and partial.task_ids:
                remember(partial.task_ids)  # what arrived before the failure
            raise
        remember(summary.task_ids)
        summary.batch = [s.sha256 for s in batch if s.sha256 in summary.task_ids]
        summary.overlap = {
            sha: n
            for sha, n in overlap.items()
            if (t := ledger.get(pid, summary.task_ids.get(sha, -1))) is not None and t.overlap > 1
        }
        for sha in frozen:
            summary.failed += 1
            summary.failures[sha] = (
                "in the frozen test split: test images are never sent for labeling"
            )
        project.state.last_model_version = model_version
        project.save_state()
        return summary


def _choose_overlap(
    project: Project, gw: LabelingBackend, pid: int, batch: list[ScoredImage]
) -> dict[str, int]:
    """sha256 -> annotators for the images of ``batch`` (the new tasks of a push, in rank
    order) chosen for overlap by ``quality.overlap_rule`` (`loop.consensus.choose_overlap`;
    ``random`` draws from a generator seeded by ``quality.seed`` and the round). With overlap
    on, the Label Studio project is checked and set for it first."""
    q = project.cfg.quality
    if q.overlap_share <= 0 or not batch:
        return {}
    ensure = getattr(gw, "ensure_overlap_settings", None)  # stand-in backends have no settings
    if ensure is not None:
        ensure(pid, q.overlap_first)
    rng = np.random.default_rng([int(q.seed), int(project.state.round)])
    mask = choose_overlap([s.score for s in batch], q.overlap_share, q.overlap_rule, rng)
    return {s.sha256: q.overlap_annotators for s, m in zip(batch, mask, strict=True) if m}


def _ledger(project: Project, pid: int) -> TaskLedger:
    """The ledger of pushed tasks. A workspace from before the ledger starts it from what it
    knows it pushed: the tasks waiting in ``state.pending`` and those its labels came from."""
    ledger = TaskLedger(project.cfg.paths.ledger)
    if ledger.exists:
        return ledger
    known = {tid: sha for sha, tid in project.state.pending.items()}
    known.update(_ls_labeled_tasks(project, project.current_version(), pid))
    for tid, sha in sorted(known.items()):
        if sha in project.pool:
            try:
                ledger.record(pid, tid, sha, project.image_url(sha))
            except ConfigError:
                continue
    ledger.save()
    return ledger


def _current_rows(project: Project) -> dict[str, LabeledImage]:
    version = project.current_version()
    return {} if version is None else version.by_sha()


def _split_of(project: Project, sha: str, rows: dict[str, LabeledImage]) -> Split:
    """The image's split: its row's (frozen when labeled), else the one its hash gives."""
    row = rows.get(sha)
    return row.split if row is not None else assign_split(sha, project.cfg.split)


def _ls_labeled_tasks(project: Project, version: DatasetVersion | None, pid: int) -> dict[int, str]:
    """Task id -> sha256 of the rows of ``version`` that came from Label Studio project
    ``pid`` (rows from before the project id was recorded count as this project's)."""
    out: dict[int, str] = {}
    if version is None:
        return out
    for r in version.rows:
        prov = r.provenance
        if prov.get("source") != "labelstudio" or not str(prov.get("task_id", "")).isdigit():
            continue
        if str(prov.get("project_id", pid)) != str(pid):
            continue
        out[int(prov["task_id"])] = r.sha256
    return out


def _next_version(
    project: Project, current: DatasetVersion | None, rows: list[LabeledImage], drop: set[str]
) -> DatasetVersion | None:
    """``current`` with ``rows`` added or replaced and the ``drop`` images removed (None when
    there is no version and no row). An image keeps its split (the test split is frozen); classes
    appended to the config extend the version's class list."""
    classes = tuple(project.cfg.classes)
    if current is None:
        return DatasetVersion.create(classes, rows) if rows else None
    if classes[: len(current.classes)] != current.classes:
        raise DatasetError(
            f"the config's classes {list(classes)} do not extend the dataset's "
            f"{list(current.classes)}; class ids are fixed: restore the class list"
        )
    merged = {r.sha256: r for r in current.rows if r.sha256 not in drop}
    for r in rows:
        old = merged.get(r.sha256)
        merged[r.sha256] = r if old is None or old.split == r.split else replace(r, split=old.split)
    return DatasetVersion.create(classes, merged.values(), parent=current.digest)


def pull(project: Project, gw: LabelingBackend) -> PullOutcome:
    """Bring Label Studio's changes back as a new dataset version (none when nothing changed).

    Incremental: only tasks updated since the stored cursor are read. New or changed
    annotations add or replace labels; images whose annotations were all deleted lose their
    label and wait in Label Studio again. A task that cannot be used is rejected with its id
    and the reason, and never blocks the others: a malformed annotation (any field), an
    unknown label, a rotated or zero-area box, more than ``labelstudio.max_regions``
    regions, bad coordinates, an unsafe image path; a task this workspace never pushed, or
    whose ``data.sha256`` or ``data.image`` no longer matches what was pushed (tampered,
    see `loop.ledger`); an image of the frozen test split (only an explicit import changes
    test labels). Rejections are kept in ``<workspace>/rejected-tasks.json`` until the task
    changes or is deleted (`rejections`). The correction analytics of the pulled labels that
    showed a prediction are written to ``<workspace>/datasets/<digest>/corrections.json``
    of the new version. Holds the workspace lock.
    """
    with project.writing("pull"):
        return _pull(project, gw)


def _pull(project: Project, gw: LabelingBackend) -> PullOutcome:
    from loop.corrections import (
        CorrectionInput,
        build_corrections,
        correction_metrics,
        write_corrections,
    )

    pid = project.ensure_ls_project(gw)
    classes = list(project.cfg.classes)
    scope = f"{pid}:{','.join(classes)}"
    since = project.state.pull_cursor if project.state.pull_cursor_scope == scope else None
    current = project.current_version()
    result = gw.pull(
        pid,
        classes,
        since=since,
        known_labeled=_ls_labeled_tasks(project, current, pid),
        document_root=project.cfg.ls_document_root,
        max_regions=project.cfg.labelstudio.max_regions,
        polygons=project.cfg.task == "segment",
        keypoints=project.cfg.keypoints or None,
    )
    found: dict[int, str] = {r.task_id: r.reason for r in result.rejected}
    ledger = _ledger(project, pid)
    current_rows = {} if current is None else current.by_sha()
    rows: list[LabeledImage] = []
    inputs: list[CorrectionInput] = []
    q = project.cfg.quality
    # Polygons cannot be averaged: agreeing annotators of a segment project give the latest label.
    merge_rule = "latest" if project.cfg.task == "segment" else q.merge_rule
    judged: list[tuple[PulledLabel, Decision]] = []
    notes: list[str] = []
    waiting = 0
    seeds = SeedAnnotations.load(project, pid)
    for lab in result.labels:
        problem = _identity_problem(project, pid, lab, ledger, current_rows)
        if problem is not None:
            found[lab.task_id] = problem
            continue
        if seeds.unchanged(lab, current_rows):
            continue  # a label review task's current label that nobody edited (loop.review_tasks)
        for name, why in sorted(lab.unusable.items()):
            notes.append(
                f"Label Studio task {lab.task_id}: {name}'s annotation was left out of the "
                f"consensus and the annotation log ({why})"
            )
        pushed = ledger.get(pid, lab.task_id)
        decision = decide(
            _records(lab),
            required=1 if pushed is None else pushed.overlap,
            threshold=q.agreement_threshold,
            match_iou=q.match_iou,
            merge_rule=merge_rule,
        )
        if decision.status == "waiting":
            waiting += 1
            continue
        judged.append((lab, decision))
        if decision.status == "review" or decision.reference is None:
            continue
        entry = project.pool.get(lab.sha256)
        prov = {
            "source": "labelstudio",
            "project_id": str(pid),
            "task_id": str(lab.task_id),
            "annotation_id": str(lab.annotation_id),
            "annotator": str(lab.annotator),
            "round": str(project.state.round),
        }
        if decision.status != "single":  # single: provenance as before consensus existed
            prov["consensus"] = decision.status
        if lab.prediction_model_version:
            prov["model_version"] = str(lab.prediction_model_version)
        if lab.lead_time is not None:
            prov["lead_time_s"] = f"{lab.lead_time:.3f}"
        if len(lab.annotators) > 1:
            prov["annotators"] = ",".join(lab.annotators)
        if decision.agreement is not None:
            prov["agreement"] = f"{decision.agreement:.4f}"
        # The chosen annotation keeps its polygons; fused boxes are boxes only.
        taken = decision.chosen is not None and decision.chosen.annotation_id == lab.annotation_id
        boxes = lab.detections if taken else decision.reference
        rows.append(
            LabeledImage(
                entry.sha256,
                entry.path,
                entry.width,
                entry.height,
                _split_of(project, entry.sha256, current_rows),
                boxes,
                prov,
                lab.polygons if taken else (),
                lab.keypoints if taken else (),
            )
        )
        if lab.prediction is not None:
            inputs.append(
                CorrectionInput(
                    lab.sha256,
                    lab.task_id,
                    lab.prediction,
                    lab.detections,
                    lab.lead_time,
                    # segment projects: pairs of polygon instances are compared by mask IoU
                    predicted_rings=lab.prediction_polygons,
                    final_rings=lab.polygons,
                )
            )
    # The review queue: tasks whose annotators disagree. Their images get no label (an earlier
    # one is dropped: it is disputed) until a lead's ground truth resolves them.
    review_now = {lab.sha256: lab.task_id for lab, d in judged if d.status == "review"}
    labeled_now = {r.sha256 for r in rows}
    left = {s for s in project.state.review if s in labeled_now or s in result.unlabeled_sha256}
    for sha in left:
        project.state.review.pop(sha, None)
    review_new = sum(1 for sha in review_now if sha not in project.state.review)
    project.state.review.update(review_now)
    disputed = {
        s for s in review_now if s in current_rows and _split_of(project, s, current_rows) != "test"
    }
    deleted = {
        s
        for s in result.unlabeled_sha256
        if s not in labeled_now and _split_of(project, s, current_rows) != "test"
    }
    drop = deleted | disputed
    for r in rows:
        project.state.pending.pop(r.sha256, None)
    for tid, sha in zip(result.unlabeled_task_ids, result.unlabeled_sha256, strict=True):
        if sha in deleted:
            project.state.pending[sha] = tid  # back in the labeling queue
    project.state.pull_cursor = result.cursor
    project.state.pull_cursor_scope = scope
    earlier, open_now = _record_rejections(project, gw, pid, found, result)
    # This pull's news: a task judged again for the same reason is not listed twice.
    rejected = [
        f"Label Studio task {tid}: {reason}"
        for tid, reason in sorted(found.items())
        if earlier.get(tid) != reason
    ]

    def outcome(new_version: str | None, parent: str | None, metrics: Any) -> PullOutcome:
        return PullOutcome(
            len(rows),
            rejected,
            new_version,
            parent,
            unlabeled=sorted(deleted),
            skipped=len(result.skipped_task_ids),
            corrections=metrics,
            cursor=result.cursor,
            open_rejections=open_now,
            merged=sum(1 for _, d in judged if d.status == "merged"),
            waiting=waiting,
            review=len(project.state.review),
            review_new=review_new,
            review_url=review_url,
            notes=notes,
        )

    # The view is updated once the pull is saved: a failure there loses nothing, and the next
    # pull (the queue not empty) tries again.
    queue_changed = bool(review_now or left)
    version = _next_version(project, current, rows, drop) if rows or drop else current
    # The log is appended BEFORE the state (and its cursor) is saved: a crash in between makes
    # the next pull judge these tasks again and log them twice (the newest line wins), never
    # lose an annotator's work. Versions are content-addressed, so the digest is the same.
    if version is None or (current is not None and version.digest == current.digest):
        _log_outcomes(project, judged, project.state.current_version)
        project.save_state()
        review_url = _update_review_view(project, gw, pid, queue_changed)
        return outcome(None, project.state.current_version, {})
    _log_outcomes(project, judged, version.digest)
    project.set_version(version)
    report = build_corrections(inputs, classes)
    write_corrections(project.cfg.paths.corrections(version.digest), report)
    review_url = _update_review_view(project, gw, pid, queue_changed)
    return outcome(version.digest, version.parent, correction_metrics(report))


def _records(lab: PulledLabel) -> tuple[AnnotationRecord, ...]:
    """Every annotator's latest usable annotation of the task (a stand-in backend that
    reports only the chosen one: that one)."""
    if lab.annotations:
        return lab.annotations
    return (
        AnnotationRecord(
            annotator=str(lab.annotator),
            annotation_id=int(lab.annotation_id),
            boxes=lab.detections,
            lead_time=lab.lead_time,
            updated_at=lab.updated_at,
            ground_truth=lab.ground_truth,
            polygons=lab.polygons,
            keypoints=lab.keypoints,
        ),
    )


def _update_review_view(
    project: Project, gw: LabelingBackend, pid: int, changed: bool
) -> str | None:
    """Bring the Label Studio view "defect-loop: review queue" in line with the queue (when
    it changed, or is not empty) and return its address (None: empty and unchanged, or a
    backend without views)."""
    ensure = getattr(gw, "ensure_review_view", None)
    url_of = getattr(gw, "view_url", None)
    if ensure is None or url_of is None or not (changed or project.state.review):
        return None
    view = ensure(pid, sorted(project.state.review.values()))
    return str(url_of(pid, view))


def _log_outcomes(
    project: Project, judged: list[tuple[PulledLabel, Decision]], digest: str | None
) -> None:
    """Append one `loop.annotation_log.TaskOutcome` per judged task, with every annotator's
    latest annotation and the version its reference went into (`review`: none)."""
    now = datetime.now(UTC)
    outcomes = [
        TaskOutcome(
            task_id=lab.task_id,
            sha256=lab.sha256,
            pulled_at=now,
            status=d.status,  # type: ignore[arg-type]  # "waiting" is never judged
            annotations=_records(lab),
            reference=d.reference if d.status != "review" else None,
            version=digest if d.status != "review" else None,
            agreement=d.agreement,
        )
        for lab, d in judged
    ]
    append_outcomes(project.cfg.paths.annotation_log, outcomes, list(project.cfg.classes))


def _identity_problem(
    project: Project, pid: int, lab: PulledLabel, ledger: TaskLedger, rows: dict[str, LabeledImage]
) -> str | None:
    """Why the pulled label ``lab`` (a `PulledLabel`) must not be used, or None: its task
    must be one this workspace pushed, still naming the same image (sha256 and URL), the
    image must be in the pool at the annotated size, and not in the frozen test split."""
    pushed = ledger.get(pid, lab.task_id)
    if pushed is None:
        if lab.sha256 not in project.pool:
            return (
                f"image {lab.sha256[:12]} is not in this project's pool (imported by hand?); "
                "delete the task or ingest the image"
            )
        return (
            f"tampered or foreign task: defect-loop never pushed this task (its data names "
            f"image {lab.sha256[:12]}), so its annotation is not used; delete it in Label "
            "Studio (`defect-loop push` creates the tasks to label)"
        )
    if pushed.sha256 != lab.sha256:
        return (
            f"tampered task data: the task was pushed for image {pushed.sha256[:12]} but its "
            f"data.sha256 now names {lab.sha256[:12]}, so its annotation is not used; restore "
            "data.sha256 or delete the task"
        )
    # (None: a stand-in gateway that does not report task data, e.g. the oracle replay's;
    # Label Studio's gateway always does, or rejects the task for a missing image URL.)
    if lab.image_url is not None and lab.image_url != pushed.image:
        return (
            f"tampered task data: the task was pushed showing {pushed.image!r} but its "
            f"data.image is now {lab.image_url!r}, so its annotation is not used; restore "
            "data.image or delete the task"
        )
    if lab.sha256 not in project.pool:
        return f"image {lab.sha256[:12]} is no longer in this project's pool"
    entry = project.pool.get(lab.sha256)
    if tuple(lab.detections.image_wh) != (entry.width, entry.height):
        w, h = lab.detections.image_wh
        return (
            f"the annotation was drawn on a {w}x{h} image but image {lab.sha256[:12]} is "
            f"{entry.width}x{entry.height} px; re-annotate the task"
        )
    if _split_of(project, lab.sha256, rows) == "test":
        return (
            f"image {lab.sha256[:12]} is in the frozen test split: only an explicit import "
            "(`defect-loop ingest --labels`) changes test labels, so the annotation is not "
            "used; delete the task"
        )
    return None


def _record_rejections(
    project: Project, gw: LabelingBackend, pid: int, found: dict[int, str], result: PullResult
) -> tuple[dict[int, str], int]:
    """Keep the rejections of this pull with the earlier ones whose tasks did not change
    (nor disappear). Returns the open rejections before this pull (task id -> reason) and
    how many are open now."""
    log = RejectionLog(project.cfg.paths.rejections)
    earlier = {r.task_id: r.reason for r in log.open(pid)}
    log.update(pid, found, None if result.full else result.examined_task_ids)
    stale = [r.task_id for r in log.open(pid) if r.task_id not in found]
    list_tasks = getattr(gw, "task_ids", None)  # stand-in gateways may not list tasks
    if stale and list_tasks is not None:
        alive = list_tasks(pid)
        log.forget(pid, [t for t in stale if t not in alive])
    log.save()
    return earlier, len(log.open(pid))
