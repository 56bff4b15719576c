"""Reading one round of a project into a `ReportData`: MLflow training runs (through
`loop.tracking.Tracker`), dataset versions, the correction analytics, the optional inputs and
the production monitor's records. Missing optional inputs leave their fields empty; malformed
ones are skipped with a line in ``notes``."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.datasets import META_FILE
from loop.errors import (
    DatasetError,
    ImageError,
    LabelQualityError,
    ModelError,
    UnknownLabelError,
)
from loop.report.data import (
    CORRECTION_KINDS,
    MAX_DISAGREEMENTS,
    MAX_NOVEL,
    Box,
    ClassCorrections,
    ClassRow,
    Confusion,
    Disagreement,
    Effort,
    LabelQualityData,
    NextBatch,
    NovelImage,
    ProductionData,
    ReportData,
    RoundPoint,
    WindowPoint,
)
from loop.tracking import CONFUSION_ARTIFACT, TAG, TrainingRun, class_metric

if TYPE_CHECKING:
    from loop.datasets import DatasetVersion
    from loop.project import Project
    from loop.tracking import Tracker


def _load_version(
    project: Project, tracker: Tracker, run: TrainingRun, notes: list[str]
) -> DatasetVersion | None:
    """The run's dataset version: from the local store, else from the run's artifacts."""
    try:
        return project.store.load(run.digest)
    except DatasetError:
        pass
    loader = getattr(tracker, "load_dataset_version", None)
    if loader is not None:
        try:
            version: DatasetVersion = loader(run.run_id, project.store)
            return version
        except DatasetError as exc:
            notes.append(f"dataset version of round {run.round} unavailable: {exc}")
            return None
    notes.append(f"dataset version {run.digest[:12]} of round {run.round} is not in the store")
    return None


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} at {path.parent} is not readable JSON ({exc}); skipped")
        return None


def _box(item: Any, classes: Sequence[str], with_score: bool) -> Box:
    vals = list(item)
    if len(vals) < 5:
        raise ValueError(f"box {item!r} needs x1, y1, x2, y2, class")
    c = vals[4]
    if isinstance(c, int | float) and not isinstance(c, bool):
        idx = int(c)
        name = classes[idx] if 0 <= idx < len(classes) else str(idx)
    else:
        name = str(c)
    score = float(vals[5]) if with_score and len(vals) > 5 and vals[5] is not None else None
    x1, y1, x2, y2 = (float(v) for v in vals[:4])
    return Box(x1, y1, x2, y2, name, score)


@dataclass
class _Corrections:
    per_class: dict[str, ClassCorrections] = field(default_factory=dict)
    lead_times: list[float] = field(default_factory=list)
    tasks: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0


def _merge_corrections(acc: _Corrections, doc: Any, classes: Sequence[str]) -> None:
    """Add one corrections.json document to ``acc``; raises ValueError on a wrong shape."""
    if not isinstance(doc, dict):
        raise ValueError("the top level must be an object")
    per_class = doc.get("per_class", {}) or {}
    if not isinstance(per_class, dict):
        raise ValueError("per_class must map class names to counts")
    for cls, counts in per_class.items():
        if not isinstance(counts, dict):
            raise ValueError(f"per_class[{cls!r}] must be an object of counts")
        add = ClassCorrections(*(int(counts.get(k, 0) or 0) for k in CORRECTION_KINDS))
        name = classes[int(cls)] if str(cls).isdigit() and int(cls) < len(classes) else str(cls)
        acc.per_class[name] = acc.per_class.get(name, ClassCorrections()) + add
    acc.lead_times += [float(x) for x in doc.get("lead_times", []) or [] if x is not None]
    acc.tasks += int(doc.get("tasks", 0) or 0)
    images = doc.get("images", []) or []
    if not isinstance(images, list):
        raise ValueError("images must be a list")
    acc.images += [i for i in images if isinstance(i, dict)]
    acc.files += 1


def _version_chain(project: Project, start: str, stop: str | None) -> list[str]:
    """Digests from ``start`` back along ``parent`` links, excluding ``stop`` (and what is
    before it)."""
    out: list[str] = []
    cur: str | None = start
    seen: set[str] = set()
    while cur and cur != stop and cur not in seen and len(out) < 1000:
        seen.add(cur)
        out.append(cur)
        meta = project.store.path(cur) / META_FILE
        try:
            cur = json.loads(meta.read_text()).get("parent") if meta.is_file() else None
        except (OSError, ValueError):
            cur = None
    return out


def _with_rings(boxes: tuple[Box, ...], rings: Any) -> tuple[Box, ...]:
    """``boxes`` with the outlines of a corrections.json ``*_rings`` list (one entry per box:
    rings of ``[x, y]`` pixel points); unchanged when absent. Raises ValueError on a wrong
    shape."""
    if rings is None:
        return boxes
    if not isinstance(rings, list) or len(rings) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes need as many polygon entries")
    out = []
    for box, inst in zip(boxes, rings, strict=True):
        parsed = tuple(tuple((float(p[0]), float(p[1])) for p in ring) for ring in inst)
        out.append(replace(box, rings=tuple(r for r in parsed if len(r) >= 3)))
    return tuple(out)


def _disagreement(project: Project, item: dict[str, Any], classes: Sequence[str]) -> Disagreement:
    sha = str(item["sha256"])

    try:
        entry = project.pool.get(sha)
        name = Path(entry.source).name or entry.path
        path: Path | None = project.pool.abs_path(sha)
        size: tuple[int, int] | None = (entry.width, entry.height)
    except ImageError:
        name, path, size = sha[:12], None, None
    predicted = tuple(_box(b, classes, True) for b in item.get("predicted", []) or [])
    final = tuple(_box(b, classes, False) for b in item.get("final", []) or [])
    return Disagreement(
        sha256=sha,
        file_name=name,
        disagreement=float(item.get("disagreement", 0.0) or 0.0),
        predicted=_with_rings(predicted, item.get("predicted_rings")),
        final=_with_rings(final, item.get("final_rings")),
        image_path=path,
        size=size,
    )


def _labelstudio_rows(version: DatasetVersion | None) -> dict[str, tuple[str, str]]:
    """sha256 -> (annotation id, annotator) of the rows that came from Label Studio."""
    if version is None:
        return {}
    return {
        r.sha256: (str(r.provenance.get("annotation_id", "")), str(r.provenance.get("annotator")))
        for r in version.rows
        if r.provenance.get("source") == "labelstudio"
    }


def _parse_baseline(doc: Any) -> list[tuple[int, float]]:
    pts = doc.get("random", doc.get("baseline")) if isinstance(doc, dict) else doc
    if not isinstance(pts, list):
        raise ValueError("expected a list of {labeled, test_map50}")
    return sorted((int(p["labeled"]), float(p["test_map50"])) for p in pts)


def _parse_next_batch(doc: Any) -> NextBatch:
    if not isinstance(doc, dict):
        raise ValueError("expected an object")
    mix = doc.get("class_mix", {}) or {}
    if not isinstance(mix, dict):
        raise ValueError("class_mix must map class names to counts")
    rnd = doc.get("round")
    empty = doc.get("images_without_boxes")
    strategy = str(doc.get("strategy", "?"))
    if doc.get("reduction"):
        strategy += f" ({doc['reduction']})"
    return NextBatch(
        strategy=strategy,
        size=int(doc.get("size", 0)),
        class_mix={str(k): int(v) for k, v in mix.items()},
        round=None if rnd is None else int(rnd),
        images_without_boxes=None if empty is None else int(empty),
    )


def _optional(
    project: Project, notes: list[str]
) -> tuple[list[tuple[int, float]], NextBatch | None]:
    paths = project.cfg.paths
    baseline: list[tuple[int, float]] = []
    doc = _read_json(paths.simulation, notes)
    if doc is not None:
        try:
            baseline = _parse_baseline(doc)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(
                f"{paths.simulation.name} has an unexpected shape ({exc}); no baseline shown"
            )
    nb = None
    doc = _read_json(paths.next_batch, notes)
    if doc is not None:
        try:
            nb = _parse_next_batch(doc)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(
                f"{paths.next_batch.name} has an unexpected shape ({exc}); section skipped"
            )
    return baseline, nb


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _metric(run: TrainingRun | None, key: str) -> float | None:
    if run is None:
        return None
    v = run.metrics.get(key)
    return None if v is None else float(v)


def collect_report_data(project: Project, tracker: Tracker, round: int | None = None) -> ReportData:
    """Read round ``round`` (default: the newest) of ``project`` into a `ReportData`.

    Raises `ModelError` when ``round`` has no finished training run. Missing optional inputs
    (corrections, simulation, next batch, confusion matrix) leave their fields empty; malformed
    ones are skipped with a line in ``notes``.
    """
    cfg = project.cfg
    classes = tuple(cfg.classes)
    notes: list[str] = []
    baseline, next_batch = _optional(project, notes)
    production = safe_collect(project, notes)
    label_quality = collect_label_quality(project, notes)
    runs = tracker.finished_training_runs()
    if cfg.task == "segment":
        # Segment projects are judged on masks: the report's mAP and AP figures are mask ones.
        from dataclasses import replace

        from loop.tracking.gate import mask_metrics_view

        runs = [replace(r, metrics=mask_metrics_view(r.metrics)) for r in runs]
        notes.append(
            "Segment project: every mAP, AP and recall figure here is measured on instance "
            "masks (mask IoU), as the promotion gate is; the box figures are in MLflow "
            "(test_map50 ...)."
        )
    if not runs:
        if round is not None:
            raise ModelError(
                f"no finished training run for round {round}: run `defect-loop train` first"
            )
        return ReportData(
            project=cfg.name,
            round=None,
            classes=classes,
            generated_at=_now(),
            baseline=baseline,
            next_batch=next_batch,
            notes=notes,
            production=production,
            label_quality=label_quality,
        )
    by_round = {r.round: r for r in runs}
    if round is None:
        target = runs[-1]
    elif round in by_round:
        target = by_round[round]
    else:
        have = ", ".join(str(r.round) for r in runs)
        raise ModelError(f"no finished training run for round {round}; rounds with runs: {have}")
    earlier = [r for r in runs if r.round < target.round]
    prev_run = earlier[-1] if earlier else None
    versions = tracker.model_versions_by_run()
    run_of_version = {v: rid for rid, v in versions.items()}
    runs_by_id = {r.run_id: r for r in runs}
    compared = target.tags.get(TAG + "compared_to", "")
    prev_champ: TrainingRun | None = runs_by_id.get(run_of_version.get(compared, ""))
    if prev_champ is None:
        promoted_before = [r for r in earlier if r.promoted]
        prev_champ = promoted_before[-1] if promoted_before else None
    champ = target if target.promoted else prev_champ

    v_now = _load_version(project, tracker, target, notes)
    v_prev = _load_version(project, tracker, prev_run, notes) if prev_run else None
    counts_now = v_now.class_counts() if v_now is not None else None
    counts_prev = v_prev.class_counts() if v_prev is not None else None
    labels_added: int | None = None
    if v_now is not None:
        before = {r.sha256 for r in v_prev.rows} if v_prev is not None else set()
        labels_added = (
            sum(1 for r in v_now.rows if r.sha256 not in before)
            if v_prev is not None or prev_run is None
            else None
        )

    # The paired gate evaluated the previous champion on this round's test images
    # (``compared_test_*``): compare against those figures when they exist.
    paired = _metric(target, "compared_test_map50_95") is not None

    def prev_metric(key: str) -> float | None:
        if paired:
            return _metric(target, f"compared_{key}")
        return _metric(prev_champ, key)

    split_boxes = _split_boxes(v_now, classes)
    class_rows = []
    for c in classes:
        ap95 = _metric(target, class_metric("test", "ap50_95", c))
        if ap95 is None and _metric(target, "test_map50_95") is None:
            continue
        n_now = counts_now.get(c) if counts_now is not None else None
        n_prev = counts_prev.get(c, 0) if counts_prev is not None else None
        ap50_key = class_metric("test", "ap50", c)
        diff_key = class_metric("gate_diff", "ap50_95", c)
        class_rows.append(
            ClassRow(
                name=c,
                ap50_95=ap95,
                previous_ap50_95=prev_metric(class_metric("test", "ap50_95", c)),
                ap50=_metric(target, ap50_key),
                previous_ap50=prev_metric(ap50_key),
                ap50_lo=_metric(target, f"{ap50_key}_lo"),
                ap50_hi=_metric(target, f"{ap50_key}_hi"),
                delta_lo=_metric(target, f"{diff_key}_lo"),
                delta_hi=_metric(target, f"{diff_key}_hi"),
                test_boxes=split_boxes["test"].get(c) if split_boxes else None,
                train_boxes=split_boxes["train"].get(c) if split_boxes else None,
                instances=n_now,
                instances_added=(
                    n_now - n_prev
                    if n_now is not None and n_prev is not None
                    else n_now
                    if n_now is not None and prev_run is None
                    else None
                ),
            )
        )

    curve = []
    # A report of round N shows the history up to N, not rounds that came after it.
    for r in (r for r in runs if r.round <= target.round):
        labeled: int | None
        try:
            labeled = int(r.params["n_images"])
        except (KeyError, ValueError):
            meta = _read_json(project.store.path(r.digest) / META_FILE, notes)
            labeled = (
                int(meta["n_images"]) if isinstance(meta, dict) and "n_images" in meta else None
            )
        curve.append(
            RoundPoint(
                r.round,
                labeled,
                _metric(r, "test_map50"),
                _metric(r, "test_map50_95"),
                r.promoted,
                _metric(r, "test_map50_lo"),
                _metric(r, "test_map50_hi"),
                _metric(r, "test_map50_95_lo"),
                _metric(r, "test_map50_95_hi"),
            )
        )

    confusion = _confusion(tracker, target, classes, notes)
    effort, disagreements = _effort(project, target, prev_run, v_now, v_prev, classes, notes)
    # The champion after this round's gate: this round's model, or the kept one measured on
    # this round's test images by the paired gate (else its own round's figures).
    kept = paired and not target.promoted
    champ_src, champ_prefix = (target, "compared_test") if kept else (champ, "test")
    gate_diff = _triple(target, "gate_diff_map50_95")
    try:
        epochs: int | None = int(float(target.params.get("train.epochs", "")))
    except ValueError:
        epochs = None
    return ReportData(
        project=cfg.name,
        round=target.round,
        classes=classes,
        generated_at=_now(),
        run_id=target.run_id,
        dataset_digest=target.digest or None,
        candidate_version=versions.get(target.run_id),
        candidate_map50=_metric(target, "test_map50"),
        candidate_map50_95=_metric(target, "test_map50_95"),
        promoted=target.promoted,
        promotion_reason=target.tags.get(TAG + "promotion_reason", ""),
        champion_version=versions.get(champ.run_id) if champ else None,
        champion_round=champ.round if champ else None,
        champion_map50=_metric(champ_src, f"{champ_prefix}_map50"),
        champion_map50_95=_metric(champ_src, f"{champ_prefix}_map50_95"),
        previous_version=versions.get(prev_champ.run_id) if prev_champ else None,
        previous_round=prev_champ.round if prev_champ else None,
        previous_map50=prev_metric("test_map50"),
        previous_map50_95=prev_metric("test_map50_95"),
        labels_added=labels_added,
        labels_total=len(v_now) if v_now is not None else None,
        curve=curve,
        baseline=baseline,
        class_rows=class_rows,
        confusion=confusion,
        effort=effort,
        disagreements=disagreements,
        next_batch=next_batch,
        notes=notes,
        production=production,
        label_quality=label_quality,
        confidence=cfg.evaluation.confidence,
        candidate_map50_ci=_ci(target, "test_map50"),
        candidate_map50_95_ci=_ci(target, "test_map50_95"),
        candidate_recall=_metric(target, "test_recall"),
        candidate_recall_ci=_ci(target, "test_recall"),
        champion_map50_ci=_ci(champ_src, f"{champ_prefix}_map50"),
        champion_map50_95_ci=_ci(champ_src, f"{champ_prefix}_map50_95"),
        gate_verdict=target.tags.get(TAG + "gate_verdict"),
        gate_difference=gate_diff,
        test_images=v_now.split_counts()["test"] if v_now is not None else None,
        preannotation_hidden=_json_list(target.tags.get(TAG + "preannotation_hidden")),
        train_epochs=epochs,
        max_halfwidth=cfg.evaluation.max_halfwidth,
        min_test_boxes=cfg.evaluation.min_test_boxes,
        min_recall=cfg.advice.min_recall,
        min_train_boxes=cfg.advice.min_train_boxes,
        preannotation_min_ap50=cfg.advice.preannotation_min_ap50,
    )


def _ci(run: TrainingRun | None, key: str) -> tuple[float, float] | None:
    lo, hi = _metric(run, f"{key}_lo"), _metric(run, f"{key}_hi")
    return None if lo is None or hi is None else (lo, hi)


def _triple(run: TrainingRun | None, key: str) -> tuple[float, float, float] | None:
    v, ci = _metric(run, key), _ci(run, key)
    return None if v is None or ci is None else (v, ci[0], ci[1])


def _json_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        v = json.loads(text)
    except ValueError:
        return []
    return [str(x) for x in v] if isinstance(v, list) else []


def _split_boxes(
    version: DatasetVersion | None, classes: Sequence[str]
) -> dict[str, dict[str, int]] | None:
    """Boxes per class in the train and test splits of ``version`` (None without it)."""
    if version is None:
        return None
    out = {s: dict.fromkeys(classes, 0) for s in ("train", "test")}
    for r in version.rows:
        if r.split in out:
            for c in r.boxes.class_id.tolist():
                name = version.classes[int(c)]
                if name in out[r.split]:
                    out[r.split][name] += 1
    return out


def _confusion(
    tracker: Tracker, run: TrainingRun, classes: Sequence[str], notes: list[str]
) -> Confusion | None:
    with tempfile.TemporaryDirectory(prefix="defect-loop-report-") as d:
        local = tracker.download_artifact(run.run_id, CONFUSION_ARTIFACT, Path(d))
        if local is None:
            return None  # not logged (no test split): the section says "no data yet"
        doc = _read_json(local, notes)
    if not isinstance(doc, dict):
        return None
    names = [str(c) for c in doc.get("classes", classes)]
    matrix = doc.get("matrix")
    n = len(names) + 1
    if (
        not isinstance(matrix, list)
        or len(matrix) != n
        or any(not isinstance(row, list) or len(row) != n for row in matrix)
    ):
        notes.append(f"the confusion matrix of round {run.round} is not {n}x{n}; skipped")
        return None
    return Confusion(names, [[int(v) for v in row] for row in matrix])


def _effort(
    project: Project,
    target: TrainingRun,
    prev_run: TrainingRun | None,
    v_now: DatasetVersion | None,
    v_prev: DatasetVersion | None,
    classes: Sequence[str],
    notes: list[str],
) -> tuple[Effort | None, list[Disagreement]]:
    acc = _Corrections()
    for digest in _version_chain(project, target.digest, prev_run.digest if prev_run else None):
        path = project.cfg.paths.corrections(digest)
        doc = _read_json(path, notes)
        if doc is None:
            continue
        try:
            _merge_corrections(acc, doc, classes)
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"{path.name} of dataset {digest[:12]} is malformed ({exc}); skipped")
    now_ls, prev_ls = _labelstudio_rows(v_now), _labelstudio_rows(v_prev)
    new = {sha: v for sha, v in now_ls.items() if prev_ls.get(sha) != v}
    annotators = Counter(annotator for _, annotator in new.values())
    if not acc.files and not new:
        return None, []
    disagreements = []
    for item in sorted(acc.images, key=lambda i: -float(i.get("disagreement", 0.0) or 0.0))[
        :MAX_DISAGREEMENTS
    ]:
        try:
            disagreements.append(_disagreement(project, item, classes))
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"skipped a disagreement image: {exc}")
    effort = Effort(
        tasks=acc.tasks if acc.files else len(new),
        lead_times=tuple(acc.lead_times),
        per_class=dict(acc.per_class),
        annotators=dict(annotators),
    )
    return effort, disagreements


def task_url(project: Project) -> str | None:
    """The Label Studio address a task id is appended to, to open that task in the project's
    data manager: ``<labelstudio.url>/projects/<id>/data/?task=`` (None before the workspace has
    a Label Studio project)."""
    pid = project.state.ls_project_id
    if pid is None:
        return None
    return f"{project.cfg.labelstudio.url.rstrip('/')}/projects/{int(pid)}/data/?task="


def collect_label_quality(project: Project, notes: list[str]) -> LabelQualityData:
    """The annotation log's label quality (`loop.annotator_quality.read_label_quality`) over
    every pulled task so far; an unreadable log leaves ``quality`` None with a line in
    ``notes``."""
    from loop.annotator_quality import read_label_quality

    path = project.cfg.paths.annotation_log
    try:
        quality = read_label_quality(path, list(project.cfg.classes), project.cfg.quality.match_iou)
    except (DatasetError, UnknownLabelError, LabelQualityError) as exc:
        notes.append(f"the annotation log {path.name} is unreadable ({exc}); no label quality")
        return LabelQualityData(None, task_url(project))
    return LabelQualityData(quality, task_url(project))


def collect_production(project: Project) -> ProductionData | None:
    """The monitor's records of ``project`` (None when no window was checked yet)."""
    from loop.monitor import read_windows
    from loop.review_queue import ReviewQueue

    cfg = project.cfg
    windows = read_windows(cfg.paths.monitor)
    if not windows:
        return None
    points = [
        WindowPoint(
            w.index,
            w.created_at,
            w.bundle_version,
            w.n_images,
            w.p_values(),
            w.threshold,
            w.alert,
            w.message,
            w.metrics.get("novelty_rate"),
        )
        for w in windows
    ]
    classes = list(cfg.classes)
    entries = ReviewQueue(cfg.paths.monitor).entries()
    novel = []
    for e in entries[:MAX_NOVEL]:
        path: Path | None = None
        if e.sha256 in project.pool:
            path = project.pool.abs_path(e.sha256)
        elif e.held:
            path = Path(e.held)
        boxes = [
            (
                b[0],
                b[1],
                b[2],
                b[3],
                classes[int(b[4])] if 0 <= int(b[4]) < len(classes) else str(b[4]),
                b[5],
            )
            for b in e.boxes
        ]
        novel.append(
            NovelImage(
                e.sha256, path, (e.width, e.height), boxes, e.priority, e.reason, e.window, e.status
            )
        )
    return ProductionData(
        points,
        novel,
        queued=sum(e.status == "queued" for e in entries),
        pushed=sum(e.status == "pushed" for e in entries),
        images=sum(w.n_images for w in windows),
    )


def safe_collect(project: Project, notes: list[str]) -> ProductionData | None:
    """`collect_production`, with unreadable monitor records noted instead of failing."""
    try:
        return collect_production(project)
    except Exception as exc:  # a broken monitor database must not break the report
        notes.append(f"production monitor records unreadable ({type(exc).__name__}: {exc})")
        return None
