"""The report's short Markdown summary: headline, classes that got worse, what to do next,
label quality, production alerts, rejected tasks."""

from __future__ import annotations

from collections.abc import Sequence

from loop.annotator_quality import most_confused
from loop.report.advice import what_to_do_next
from loop.report.data import (
    CONFUSED_PAIRS,
    NO_PRODUCTION,
    REJECTIONS_LISTED,
    TASK_LINKS,
    LabelQualityData,
    ProductionData,
    ReportData,
)
from loop.report.text import (
    ERROR_KIND_TEXT,
    LABEL_QUALITY_UNREADABLE,
    NO_LABEL_QUALITY,
    delta_of,
    fmt_ci,
    fmt_int,
    fmt_num,
    fmt_seconds,
    fmt_signed,
    model_name,
    reference_rule,
    waiting,
)

_MD_SPECIAL = set("\\`*_[]<>|&#~!")


def _md(text: object) -> str:
    """``text`` safe inside Markdown (CommonMark backslash escapes; newlines folded)."""
    s = " ".join(str(text).split())
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in s)


def render_markdown(data: ReportData, html_name: str | None = None) -> str:
    """A short Markdown summary: headline, classes that got worse, what to do next."""
    if data.round is None:
        lines = [f"# defect-loop report: {_md(data.project)}", "", "No training run yet."]
    else:
        prev = model_name(data.previous_version, data.previous_round)
        cmp50 = (
            f"({fmt_signed(delta_of(data.champion_map50, data.previous_map50))} vs {prev}: "
            f"{fmt_num(data.previous_map50)})"
            if data.previous_map50 is not None
            else ""
        )
        cmp95 = (
            f"({fmt_signed(delta_of(data.champion_map50_95, data.previous_map50_95))} vs "
            f"{fmt_num(data.previous_map50_95)})"
            if data.previous_map50_95 is not None
            else ""
        )
        verdict = (
            "promoted"
            if data.promoted
            else "not promoted"
            if data.promoted is False
            else "no promotion decision"
        )

        def ci_md(ci: tuple[float, float] | None) -> str:
            return f" {_md(fmt_ci(ci).strip())}" if ci is not None else ""

        c50, c95 = ci_md(data.champion_map50_ci), ci_md(data.champion_map50_95_ci)
        lines = [
            f"# defect-loop report: {_md(data.project)}, round {data.round}",
            "",
            f"- **Champion test mAP50 {fmt_num(data.champion_map50)}**{c50} {_md(cmp50)}, "
            f"mAP50-95 {fmt_num(data.champion_map50_95)}{c95} {_md(cmp95)}".rstrip(),
            f"- Labeled images: {fmt_int(data.labels_added, signed=True)} this round, "
            f"{fmt_int(data.labels_total)} in total",
            f"- This round's model ({_md(model_name(data.candidate_version, data.round))}): "
            f"test mAP50 {fmt_num(data.candidate_map50)}{ci_md(data.candidate_map50_ci)}, "
            f"**{verdict}**" + (f": {_md(data.promotion_reason)}" if data.promotion_reason else ""),
        ]
        hw = data.map50_halfwidth
        if hw is not None:
            n = f"{data.test_images} test images" if data.test_images is not None else "test"
            lines.append(
                f"- Intervals: {100 * data.confidence:g}% bootstrap over {n}; the test split "
                f"resolves mAP50 differences larger than ±{hw:.3f}"
            )
        if data.effort is not None:
            lines.append(
                f"- Labeling: {fmt_int(data.effort.tasks)} tasks, median lead time "
                f"{fmt_seconds(data.effort.median_lead_time)}"
            )
        worse = [r for r in data.class_rows if r.worse]
        if worse:
            lines += ["", "## Classes that got worse", ""]
            lines += [
                f"- {_md(r.name)}: AP50-95 {fmt_num(r.ap50_95)} ({fmt_signed(r.delta)})"
                for r in worse
            ]
    lines += ["", "## What to do next", ""]
    lines += [f"- **{a.level}**: {_md(a.text)}" for a in what_to_do_next(data)]
    lines += label_quality_markdown(data.label_quality)
    lines += production_markdown(data.production)
    if data.rejections:
        lines += ["", f"## Rejected Label Studio tasks ({len(data.rejections)})", ""]
        lines += [f"- {_md(r)}" for r in data.rejections[:REJECTIONS_LISTED]]
        if len(data.rejections) > REJECTIONS_LISTED:
            lines.append(f"- ... see `defect-loop rejections` for all {len(data.rejections)}")
    if html_name:
        lines += ["", f"Full report with plots: {_md(html_name)} (MLflow artifact `report/`)."]
    return "\n".join(lines) + "\n"


def production_markdown(data: ProductionData | None) -> list[str]:
    """Markdown lines of the section (a heading and a few bullets)."""
    lines = ["", "## Production", ""]
    if data is None or not data.windows:
        return [*lines, f"{NO_PRODUCTION}."]
    lines.append(
        f"- {len(data.windows)} windows ({data.images} images) checked, "
        f"{len(data.alerts)} alerts, {data.queued} images queued for labeling"
    )
    for w in data.alerts[-5:][::-1]:
        lines.append(f"- **alert**: {_md(w.message)}")
    return lines


def _url(url: str) -> str:
    # A Markdown link destination ends at a space or an unbalanced parenthesis.
    return url.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def _task_links(section: LabelQualityData, task_ids: Sequence[int]) -> str:
    items = []
    for tid in task_ids[:TASK_LINKS]:
        url = section.link(tid)
        items.append(f"[#{int(tid)}]({_url(url)})" if url is not None else f"#{int(tid)}")
    more = f" and {len(task_ids) - TASK_LINKS} more" if len(task_ids) > TASK_LINKS else ""
    return ", ".join(items) + more


def label_quality_markdown(section: LabelQualityData | None) -> list[str]:
    """Markdown lines of the "Label quality" section: counts, the per-annotator table, the tasks
    behind each error kind and the review queue as Label Studio links, per-class agreement."""
    lines = ["", "## Label quality", ""]
    if section is not None and section.quality is None:
        return [*lines, f"{_md(LABEL_QUALITY_UNREADABLE)}."]
    lq = None if section is None else section.quality
    if section is None or lq is None or not lq.tasks:
        return [*lines, f"{_md(NO_LABEL_QUALITY)}."]
    lines += [
        f"- {lq.tasks} tasks pulled: {len(lq.scored_tasks)} scored against a reference, "
        f"{len(lq.review_tasks)} waiting in review, {len(lq.single_tasks)} with one annotator "
        "(not scored)",
        "",
        _md(reference_rule(lq)),
    ]
    classes = list(lq.class_names)
    if lq.scored_tasks:
        lines += [
            "",
            "| Annotator | Tasks scored | Precision | Recall | Missed | Extra | Class swaps "
            "| Most confused | Median lead time | Total lead time | Tasks labeled |",
            "|---|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|",
        ]
        errors = []
        c = len(classes)
        for name, a in lq.annotators.items():
            q = a.quality
            if q is None:
                cells = "0 | — | — | — | — | — | —"
            else:
                pairs = "; ".join(
                    f"{r} → {x} ×{n}" for r, x, n in most_confused(q, classes, CONFUSED_PAIRS)
                )
                cells = (
                    f"{q.tasks} | {fmt_num(q.precision)} | {fmt_num(q.recall)} | "
                    f"{int(q.confusion[:c, c].sum())} | {int(q.confusion[c, :c].sum())} | "
                    f"{int(q.confusion[:c, :c].sum() - q.confusion[:c, :c].trace())} | "
                    f"{_md(pairs) or '—'}"
                )
                errors += [
                    f"- {_md(name)} {ERROR_KIND_TEXT[kind]} in {len(ids)} task"
                    f"{'s' if len(ids) != 1 else ''}: {_task_links(section, ids)}"
                    for kind, ids in q.task_ids.items()
                    if ids
                ]
            lines.append(
                f"| {_md(name)} | {cells} | {fmt_seconds(a.lead_time_median_s)} | "
                f"{fmt_seconds(a.lead_time_total_s)} | {a.tasks_annotated} |"
            )
        lines += ["", *errors] if errors else ["", "No annotator differs from a reference."]
    else:
        lines += [
            "",
            "No task has an independent reference yet, so no annotator is scored: a task needs "
            "two or more annotators (consensus) or a lead's ground-truth annotation.",
        ]
    if lq.review_tasks:
        lines += [
            "",
            f"- Review queue: {waiting(len(lq.review_tasks))} for a lead: "
            f"{_task_links(section, lq.review_tasks)}",
        ]
    if lq.agreement_tasks:
        agree = ", ".join(f"{_md(k)} {fmt_num(lq.agreement.get(k))}" for k in classes)
        lines += [
            "",
            f"- Per-class agreement (mean pairwise F1 over {lq.agreement_tasks} tasks with two "
            f"or more annotators): {agree}",
        ]
    return lines
