"""The report page: one self-contained HTML document (inline CSS, ``data:`` PNGs, no scripts,
a Content-Security-Policy that forbids loading anything). Every user-supplied string (class, file
and annotator names, promotion reasons) is escaped."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

from loop.annotator_quality import most_confused
from loop.report.advice import what_to_do_next
from loop.report.data import (
    CONFUSED_PAIRS,
    CORRECTION_KINDS,
    MAX_ALERTS,
    MAX_DISAGREEMENTS,
    NO_DATA,
    NO_PRODUCTION,
    REJECTIONS_LISTED,
    TASK_LINKS,
    WORSE_THRESHOLD,
    Box,
    Disagreement,
    LabelQualityData,
    ProductionData,
    ReportData,
)
from loop.report.plots import confusion_png, drift_png, learning_curve_png
from loop.report.text import (
    ERROR_KIND_TEXT,
    LABEL_QUALITY_UNREADABLE,
    NO_LABEL_QUALITY,
    delta_of,
    fmt_ci,
    fmt_int,
    fmt_num,
    fmt_pct,
    fmt_seconds,
    fmt_signed,
    model_name,
    reference_rule,
    trend,
    waiting,
)
from loop.report.thumbnails import thumbnail_png


def _h(text: object) -> str:
    """HTML-escape ``text`` (quotes too: safe in attributes)."""
    return html.escape(str(text), quote=True)


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--good:#1a7f37;--bad:#cf222e;
--warn:#9a6700;--pred:#e69f00;--final:#0072b2}
*{box-sizing:border-box}
html{background:#fff}
body{margin:0;color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI","DejaVu Sans",
"Liberation Sans",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 56px}
header h1{font-size:24px;margin:0 0 2px}
.sub,.muted{color:var(--muted);font-size:13px}
code{font:12px/1.4 "DejaVu Sans Mono",Menlo,Consolas,monospace;background:var(--soft);
padding:1px 4px;border-radius:4px}
.cards{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:12px;margin:20px 0 8px}
.card{border:1px solid var(--line);border-radius:10px;padding:12px 16px;background:var(--soft)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .value{font-size:32px;font-weight:650;line-height:1.2;font-variant-numeric:tabular-nums}
.card .value.small{font-size:24px;padding-top:6px}
.card .value.yes{color:var(--good)}.card .value.no{color:var(--bad)}
.card .foot{font-size:13px;color:var(--muted);font-variant-numeric:tabular-nums}
.up{color:var(--good)}.down{color:var(--bad)}.flat{color:var(--muted)}
.ci{color:var(--muted);font-size:12px;white-space:nowrap}
.decision{margin:10px 0 0;padding:10px 14px;border-radius:8px;background:var(--soft);
border-left:4px solid var(--muted);font-size:14px}
.decision.yes{border-left-color:var(--good)}.decision.no{border-left-color:var(--bad)}
section{margin-top:34px}
h2{font-size:18px;margin:0 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 8px}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:middle}
th:first-child,td:first-child{text-align:left}
td.name{font-weight:600;word-break:break-word}
tr.worse td{background:#fff1f0}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
white-space:nowrap}
.badge.bad{background:#ffebe9;color:var(--bad)}.badge.good{background:#dafbe1;color:var(--good)}
.nodata{color:var(--muted);font-style:italic;padding:14px 16px;border:1px dashed var(--line);
border-radius:8px;background:#fcfcfd}
ul.advice{list-style:none;padding:0;margin:0}
ul.advice li{padding:10px 14px;margin:0 0 8px;border-radius:8px;background:var(--soft);
border-left:4px solid var(--muted)}
ul.advice li.act{border-left-color:var(--bad);background:#fff5f4}
ul.advice li.watch{border-left-color:#d4a72c;background:#fffbeb}
ul.advice li.ok{border-left-color:var(--good);background:#f3fbf5}
ul.advice .lvl{font-size:11px;font-weight:700;text-transform:uppercase;letter-spacing:.06em;
margin-right:8px}
li.act .lvl{color:var(--bad)}li.watch .lvl{color:var(--warn)}li.ok .lvl{color:var(--good)}
img.plot{display:block;max-width:100%;height:auto;margin:0 auto}
.stats{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:14px}
.stat{border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:150px}
.stat b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.stat span{font-size:12px;color:var(--muted)}
.bar{display:flex;height:12px;width:100%;min-width:140px;border-radius:3px;overflow:hidden;
background:#eaeef2}
.bar i{display:block;height:100%}
.k-accepted{background:#2da44e}.k-adjusted{background:#a2d96f}.k-relabeled{background:#8250df}
.k-removed{background:#cf222e}.k-mix{background:#0072b2}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12px;color:var(--muted);margin:8px 0}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px}
.legend i.pred{background:none;border:2px dashed var(--pred);width:16px;height:12px}
.legend i.final{background:none;border:2px solid var(--final);width:16px;height:12px}
.gallery{display:grid;grid-template-columns:repeat(5,minmax(0,1fr));gap:14px}
figure{margin:0}
figure img{display:block;width:100%;height:auto;border:1px solid var(--line);border-radius:6px;
background:#d0d7de}
figcaption{font-size:12px;color:var(--muted);margin-top:4px;line-height:1.4}
figcaption b{color:var(--fg);overflow-wrap:anywhere}
.two{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px}
footer{margin-top:40px;font-size:12px;color:var(--muted);border-top:1px solid var(--line);
padding-top:10px}
@media (max-width:800px){.cards{grid-template-columns:repeat(2,minmax(0,1fr))}
.gallery{grid-template-columns:repeat(2,minmax(0,1fr))}.two{grid-template-columns:1fr}}
@media print{main{max-width:none;padding:0}section{break-inside:avoid}}
"""


_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _nodata(what: str = "") -> str:
    return f'<p class="nodata">{_h(NO_DATA)}{_h(": " + what) if what else ""}</p>'


def _card(label: str, value_id: str, value: str, foot: str, extra: str = "") -> str:
    cls = f"value {extra}".strip()
    return (
        f'<div class="card"><div class="label">{_h(label)}</div>'
        f'<div class="{cls}" id="{value_id}">{_h(value)}</div><div class="foot">{foot}</div></div>'
    )


def _delta_foot(
    now: float | None,
    prev: float | None,
    prev_id: str,
    who: str,
    ci: tuple[float, float] | None = None,
    ci_id: str = "",
) -> str:
    d = delta_of(now, prev)
    interval = (
        f'<span class="ci" id="{ci_id}">[{_h(fmt_num(ci[0]))}, {_h(fmt_num(ci[1]))}]</span><br>'
        if ci is not None and ci_id
        else ""
    )
    if prev is None:
        return f'{interval}<span id="{prev_id}">—</span> no previous champion'
    return (
        f'{interval}<span class="{trend(d)}" id="{prev_id}-delta">{_h(fmt_signed(d))}</span> vs '
        f'<span id="{prev_id}">{_h(fmt_num(prev))}</span> {_h(who)}'
    )


def _headline(data: ReportData) -> str:
    prev_who = f"({model_name(data.previous_version, data.previous_round)})"
    if data.promoted is None:
        status, sfoot = "—", "no training run"
    elif data.promoted:
        status, sfoot = "Promoted", "this round's model is the new champion"
    else:
        status, sfoot = "Not promoted", "the previous champion stays"
    added = fmt_int(data.labels_added, signed=True) if data.labels_added is not None else "—"
    cards = "".join(
        [
            _card(
                "Champion test mAP50",
                "champion-map50",
                fmt_num(data.champion_map50),
                _delta_foot(
                    data.champion_map50,
                    data.previous_map50,
                    "previous-map50",
                    prev_who,
                    data.champion_map50_ci,
                    "champion-map50-ci",
                ),
            ),
            _card(
                "Champion test mAP50-95",
                "champion-map50-95",
                fmt_num(data.champion_map50_95),
                _delta_foot(
                    data.champion_map50_95,
                    data.previous_map50_95,
                    "previous-map50-95",
                    prev_who,
                    data.champion_map50_95_ci,
                    "champion-map50-95-ci",
                ),
            ),
            _card(
                "Images labeled this round",
                "labels-added",
                added,
                f'<span id="labels-total">{_h(fmt_int(data.labels_total))}</span> labeled in total',
            ),
            _card(
                "Candidate",
                "promotion-status",
                status,
                _h(sfoot),
                "small " + ("yes" if data.promoted else "no" if data.promoted is False else ""),
            ),
        ]
    )
    decision = ""
    if data.round is not None:
        cls = "yes" if data.promoted else "no" if data.promoted is False else ""
        cand = model_name(data.candidate_version, data.round)
        verdict = "promoted" if data.promoted else "not promoted" if data.promoted is False else "?"
        decision = (
            f'<p class="decision {cls}">This round\'s model ({_h(cand)}): test mAP50 '
            f'<b id="candidate-map50">{_h(fmt_num(data.candidate_map50))}</b>'
            f'<span class="ci" id="candidate-map50-ci">{_h(fmt_ci(data.candidate_map50_ci))}'
            "</span>, mAP50-95 "
            f'<b id="candidate-map50-95">{_h(fmt_num(data.candidate_map50_95))}</b>'
            f'<span class="ci">{_h(fmt_ci(data.candidate_map50_95_ci))}</span>; '
            f"<b>{_h(verdict)}</b>"
            f"{': ' if data.promotion_reason else ''}"
            f'<span id="promotion-reason">{_h(data.promotion_reason)}</span>.</p>'
            f"{_sureness_html(data)}"
        )
    return f'<div class="cards">{cards}</div>{decision}'


def _sureness_html(data: ReportData) -> str:
    """One line on how sure the figures are: interval level and the split's resolution."""
    hw = data.map50_halfwidth
    if hw is None:
        return ""
    n = f"{data.test_images} test images" if data.test_images is not None else "the test split"
    wide = hw > data.max_halfwidth
    return (
        f'<p class="muted" id="test-resolution">Intervals: {100 * data.confidence:g}% bootstrap '
        f"over {_h(n)}. This test split resolves mAP50 differences larger than "
        f'<b class="{"down" if wide else ""}">±{hw:.3f}</b>'
        + (f" (wider than evaluation.max_halfwidth {data.max_halfwidth:g})" if wide else "")
        + ".</p>"
    )


def _advice_html(data: ReportData) -> str:
    items = "".join(
        f'<li class="{a.level}"><span class="lvl">{_h(a.level)}</span>{_h(a.text)}</li>'
        for a in what_to_do_next(data)
    )
    return f'<ul class="advice" id="advice">{items}</ul>'


def _img(png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return _nodata(missing)
    return f'<img class="plot" alt="{_h(alt)}" src="{_png_uri(png)}">'


def _class_table(data: ReportData) -> str:
    if not data.class_rows:
        return _nodata("no per-class test metrics for this round")
    prev = model_name(data.previous_version, data.previous_round)
    rows = []
    for r in data.class_rows:
        flag = (
            '<span class="badge bad">got worse</span>'
            if r.worse
            else '<span class="badge good">improved</span>'
            if (r.delta or 0) > WORSE_THRESHOLD
            else ""
        )
        ap_ci = (r.ap50_lo, r.ap50_hi) if r.ap50_lo is not None and r.ap50_hi is not None else None
        d_ci = (
            f" [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
            if r.delta_lo is not None and r.delta_hi is not None
            else ""
        )
        few = r.test_boxes is not None and r.test_boxes < data.min_test_boxes
        rows.append(
            f'<tr class="{"worse" if r.worse else ""}" data-class="{_h(r.name)}">'
            f'<td class="name">{_h(r.name)}</td>'
            f'<td>{_h(fmt_num(r.ap50))}<span class="ci">{_h(fmt_ci(ap_ci, 2))}</span></td>'
            f'<td class="{trend(r.delta50)}">{_h(fmt_signed(r.delta50))}</td>'
            f"<td><b>{_h(fmt_num(r.ap50_95))}</b></td>"
            f'<td class="{trend(r.delta)}">{_h(fmt_signed(r.delta))}'
            f'<span class="ci">{_h(d_ci)}</span></td>'
            f"<td>{_h(fmt_int(r.instances))}</td>"
            f"<td>{_h(fmt_int(r.instances_added, signed=True))}</td>"
            f"<td>{_h(fmt_int(r.train_boxes))}</td>"
            f'<td class="{"down" if few else ""}">{_h(fmt_int(r.test_boxes))}</td>'
            f"<td>{flag}</td></tr>"
        )
    head = (
        "<tr><th>Class</th><th>AP50</th><th>Δ AP50</th><th>AP50-95</th><th>Δ AP50-95</th>"
        "<th>Labeled boxes</th><th>New this round</th><th>Train boxes</th><th>Test boxes</th>"
        "<th></th></tr>"
    )
    return (
        f'<table id="class-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        f'<p class="muted">AP on the frozen test split of this round\'s model; Δ against the '
        f"previous champion ({_h(prev)}). A class is flagged when its AP50-95 fell by more than "
        f"{WORSE_THRESHOLD:g} (and, where the paired interval is known, significantly). "
        f"Brackets: {100 * data.confidence:g}% bootstrap intervals over the test images; the "
        "Δ interval is paired (both models on the same images).</p>"
    )


def _bar(parts: Sequence[tuple[str, float]]) -> str:
    spans = "".join(
        f'<i class="k-{k}" style="width:{max(0.0, min(100.0, 100 * v)):.1f}%"></i>'
        for k, v in parts
        if v > 0
    )
    return f'<div class="bar">{spans}</div>'


def _effort_html(data: ReportData) -> str:
    e = data.effort
    if e is None:
        return _nodata("no labels were pulled from Label Studio for this round")
    lt = sorted(e.lead_times)
    p90 = lt[min(len(lt) - 1, math.ceil(0.9 * len(lt)) - 1)] if lt else None
    stats = (
        '<div class="stats">'
        f'<div class="stat"><b id="tasks-labeled">{_h(fmt_int(e.tasks))}</b>'
        "<span>tasks labeled</span></div>"
        f'<div class="stat"><b id="median-lead-time">{_h(fmt_seconds(e.median_lead_time))}</b>'
        "<span>median lead time per task</span></div>"
        f'<div class="stat"><b>{_h(fmt_seconds(p90))}</b><span>90th percentile</span></div>'
        f'<div class="stat"><b>{len(e.annotators)}</b><span>annotators</span></div></div>'
    )
    if e.per_class:
        rows = []
        for name in [*data.classes, *(c for c in e.per_class if c not in data.classes)]:
            c = e.per_class.get(name)
            if c is None:
                continue
            cells = "".join(
                f"<td>{getattr(c, k)} <span class='muted'>"
                f"({_h(fmt_pct(c.share(k) or 0.0) if c.share(k) is not None else '—')})</span></td>"
                for k in CORRECTION_KINDS[:4]
            )
            bar = _bar([(k, c.share(k) or 0.0) for k in CORRECTION_KINDS[:4]])
            rows.append(
                f'<tr data-class="{_h(name)}"><td class="name">{_h(name)}</td>'
                f"<td>{c.suggestions}</td>{cells}<td>{c.added}</td><td>{bar}</td></tr>"
            )
        legend = "".join(f'<span><i class="k-{k}"></i>{k}</span>' for k in CORRECTION_KINDS[:4])
        table = (
            "<h3>What labelers did with the model's suggestions</h3>"
            '<table id="acceptance-table"><thead><tr><th>Class</th><th>Suggestions</th>'
            "<th>Accepted</th><th>Adjusted</th><th>Relabeled</th><th>Removed</th>"
            f"<th>Added</th><th>Share</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f'<div class="legend">{legend}<span>added: boxes the model missed</span></div>'
        )
    else:
        table = _nodata("correction analytics (accepted / adjusted / relabeled / removed / added)")
    if e.annotators:
        arows = "".join(
            f'<tr><td class="name">{_h(a)}</td><td>{n}</td></tr>'
            for a, n in sorted(e.annotators.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        ann = (
            '<h3>Tasks per annotator</h3><table id="annotator-table"><thead><tr>'
            f"<th>Annotator</th><th>Tasks</th></tr></thead><tbody>{arows}</tbody></table>"
        )
    else:
        ann = ""
    return stats + table + ann


def _disagreements_html(data: ReportData) -> str:
    if not data.disagreements:
        return _nodata("no model-vs-labeler comparisons for this round")
    figs = []
    top = sorted(data.disagreements, key=lambda d: -d.disagreement)[:MAX_DISAGREEMENTS]
    for d in top:
        png = thumbnail_png(d)
        figs.append(
            f'<figure><img alt="{_h(d.file_name)}" src="{_png_uri(png)}">'
            f"<figcaption><b>{_h(d.file_name)}</b><br>disagreement "
            f"{_h(fmt_num(d.disagreement, 2))} · {len(d.predicted)} suggested · "
            f"{len(d.final)} final</figcaption></figure>"
        )
    legend = (
        '<div class="legend"><span><i class="pred"></i>model suggestion (dashed, score)</span>'
        '<span><i class="final"></i>labelers\' final box</span></div>'
    )
    return f'{legend}<div class="gallery" id="disagreements">{"".join(figs)}</div>'


def _next_batch_html(data: ReportData) -> str:
    nb = data.next_batch
    if nb is None:
        return _nodata("the next batch is recorded when a cycle pushes tasks to Label Studio")
    after = f"selected after round {nb.round}" if nb.round is not None else ""
    stats = (
        '<div class="stats">'
        f'<div class="stat"><b id="next-batch-size">{nb.size}</b><span>images</span></div>'
        f'<div class="stat"><b id="next-batch-strategy">{_h(nb.strategy)}</b>'
        f"<span>selection strategy</span></div>"
    )
    if nb.images_without_boxes is not None:
        stats += (
            f'<div class="stat"><b>{nb.images_without_boxes}</b>'
            "<span>images with no suggested box</span></div>"
        )
    stats += "</div>"
    total = sum(nb.class_mix.values())
    if total:
        rows = "".join(
            f'<tr data-class="{_h(c)}"><td class="name">{_h(c)}</td><td>{n}</td>'
            f"<td>{_h(fmt_pct(n / total))}</td><td>{_bar([('mix', n / total)])}</td></tr>"
            for c, n in sorted(nb.class_mix.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        mix = (
            '<h3>Predicted class mix</h3><table id="class-mix"><thead><tr><th>Class</th>'
            f"<th>Predicted boxes</th><th>Share</th><th></th></tr></thead><tbody>{rows}</tbody>"
            "</table>"
        )
    else:
        mix = _nodata("the model suggested no boxes in the next batch")
    return stats + mix + (f'<p class="muted">{_h(after)}</p>' if after else "")


def render_html(data: ReportData) -> str:
    """The self-contained report page (inline CSS, ``data:`` images, no scripts)."""
    title = f"defect-loop report: {data.project}" + (
        f", round {data.round}" if data.round is not None else ""
    )
    meta = [f"generated {data.generated_at}"] if data.generated_at else []
    if data.run_id:
        meta.append(f"MLflow run {data.run_id}")
    if data.dataset_digest:
        meta.append(f"dataset {data.dataset_digest[:12]}")
    curve = _img(
        learning_curve_png(data), "learning curve: test mAP against labeled images", "no rounds"
    )
    conf = (
        _img(confusion_png(data.confusion), "confusion matrix", "unreadable confusion matrix")
        if data.confusion is not None
        else _nodata("no confusion matrix was logged for this round")
    )
    curve_note = (
        ""
        if data.baseline
        else '<p class="muted">No oracle replay (simulation.json) for this project: '
        "no random baseline.</p>"
    )
    notes = (
        '<section id="notes"><h2>Notes</h2><ul>'
        + "".join(f"<li>{_h(n)}</li>" for n in data.notes)
        + "</ul></section>"
        if data.notes
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="defect-loop report">
<link rel="icon" href="data:,">
<title>{_h(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header><h1 id="title">{_h(title)}</h1><div class="sub">{_h(" · ".join(meta))}</div></header>
<section id="headline" style="margin-top:8px">{_headline(data)}</section>
<section id="next-steps"><h2>What to do next</h2>{_advice_html(data)}</section>
<section id="learning-curve"><h2>Learning curve</h2>{curve}{curve_note}</section>
<section id="classes"><h2>Per class</h2>{_class_table(data)}</section>
<section id="confusion"><h2>Confusion matrix (test split)</h2>{conf}</section>
<section id="effort"><h2>Labeling effort</h2>{_effort_html(data)}</section>
<section id="label-quality"><h2>Label quality</h2>{label_quality_html(data.label_quality)}</section>
<section id="disagreement"><h2>Where model and labelers disagreed most</h2>
{_disagreements_html(data)}</section>
<section id="next-batch"><h2>Next batch</h2>{_next_batch_html(data)}</section>
<section id="production"><h2>Production</h2>{production_html(data.production)}</section>
{_rejections_html(data)}
{notes}
<footer>defect-loop model-improvement report. Self-contained: open it from disk, nothing is
loaded from the network.</footer>
</main>
</body>
</html>
"""


def _rejections_html(data: ReportData) -> str:
    """The tasks pulls rejected and that still wait for a fix (empty when there are none)."""
    if not data.rejections:
        return ""
    items = "".join(f"<li>{_h(r)}</li>" for r in data.rejections[:REJECTIONS_LISTED])
    more = (
        f'<p class="muted">and {len(data.rejections) - REJECTIONS_LISTED} more: '
        "<code>defect-loop rejections</code> lists them all.</p>"
        if len(data.rejections) > REJECTIONS_LISTED
        else ""
    )
    return (
        f'<section id="rejections"><h2>Rejected Label Studio tasks ({len(data.rejections)})</h2>'
        "<p>Their annotations were not used: fix or delete them in Label Studio; the next pull "
        f"judges them again.</p><ul>{items}</ul>{more}</section>"
    )


def _task_links(section: LabelQualityData, task_ids: Sequence[int], limit: int = TASK_LINKS) -> str:
    """Task ids as links that open each task in Label Studio (plain ids without a project)."""
    items = []
    for tid in task_ids[:limit]:
        url = section.link(tid)
        text = f"#{int(tid)}"
        items.append(
            f'<a class="task" href="{_h(url)}" data-task="{int(tid)}">{text}</a>'
            if url is not None
            else f'<span class="task" data-task="{int(tid)}">{text}</span>'
        )
    more = f" and {len(task_ids) - limit} more" if len(task_ids) > limit else ""
    return ", ".join(items) + more


def label_quality_html(section: LabelQualityData | None) -> str:
    """The "Label quality" section's body: task counts, the per-annotator table, the tasks behind
    each error kind (links to Label Studio), the review queue and the per-class agreement."""
    if section is not None and section.quality is None:
        return _nodata(LABEL_QUALITY_UNREADABLE)
    lq = None if section is None else section.quality
    if section is None or lq is None or not lq.tasks:
        return _nodata(NO_LABEL_QUALITY)
    stats = (
        '<div class="stats" id="label-quality-stats">'
        f'<div class="stat"><b id="lq-tasks">{lq.tasks}</b><span>tasks pulled</span></div>'
        f'<div class="stat"><b id="lq-scored">{len(lq.scored_tasks)}</b>'
        "<span>scored against a reference</span></div>"
        f'<div class="stat"><b id="lq-review">{len(lq.review_tasks)}</b>'
        "<span>waiting in review</span></div>"
        f'<div class="stat"><b id="lq-single">{len(lq.single_tasks)}</b>'
        "<span>one annotator (not scored)</span></div></div>"
    )
    rule = f'<p class="muted">{_h(reference_rule(lq))}</p>'
    no_links = (
        '<p class="muted">No Label Studio project is recorded for this workspace: task ids '
        "without links.</p>"
        if section.task_url is None
        else ""
    )
    classes = list(lq.class_names)
    if lq.scored_tasks:
        rows, errors = [], []
        for name, a in lq.annotators.items():
            q = a.quality
            c = len(classes)
            if q is None:
                cells = "<td>0</td>" + "<td>—</td>" * 5 + '<td style="text-align:left">—</td>'
            else:
                pairs = "; ".join(
                    f"{r} → {x} ×{n}" for r, x, n in most_confused(q, classes, CONFUSED_PAIRS)
                )
                cells = (
                    f"<td>{q.tasks}</td><td>{_h(fmt_num(q.precision))}</td>"
                    f"<td>{_h(fmt_num(q.recall))}</td>"
                    f"<td>{int(q.confusion[:c, c].sum())}</td>"
                    f"<td>{int(q.confusion[c, :c].sum())}</td>"
                    f"<td>{int(q.confusion[:c, :c].sum() - q.confusion[:c, :c].trace())}</td>"
                    f'<td style="text-align:left">{_h(pairs or "—")}</td>'
                )
                for kind, ids in q.task_ids.items():
                    if ids:
                        errors.append(
                            f'<li data-annotator="{_h(name)}" data-kind="{_h(kind)}">'
                            f"<b>{_h(name)}</b> {_h(ERROR_KIND_TEXT[kind])} in {len(ids)} "
                            f"task{'s' if len(ids) != 1 else ''}: "
                            f"{_task_links(section, ids)}</li>"
                        )
            rows.append(
                f'<tr data-annotator="{_h(name)}"><td class="name">{_h(name)}</td>{cells}'
                f"<td>{_h(fmt_seconds(a.lead_time_median_s))}</td>"
                f"<td>{_h(fmt_seconds(a.lead_time_total_s))}</td>"
                f"<td>{a.tasks_annotated}</td></tr>"
            )
        table = (
            '<h3>Per annotator</h3><table id="annotator-quality"><thead><tr><th>Annotator</th>'
            "<th>Tasks scored</th><th>Precision</th><th>Recall</th><th>Missed</th><th>Extra</th>"
            '<th>Class swaps</th><th style="text-align:left">Most confused (reference → '
            "annotator)</th><th>Median lead time</th><th>Total lead time</th>"
            f"<th>Tasks labeled</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            '<p class="muted">Precision: share of the annotator\'s boxes that match a reference '
            "box of the same class; recall: share of the reference boxes they found. Lead times "
            "over every task they labeled.</p>"
        )
        table += (
            '<h3>Tasks behind the errors</h3><ul id="error-tasks">' + "".join(errors) + "</ul>"
            if errors
            else '<p class="muted" id="error-tasks">No annotator differs from a reference.</p>'
        )
    else:
        table = (
            '<p class="nodata" id="no-reference">No task has an independent reference yet, so '
            "no annotator is scored: a task needs two or more annotators (consensus) or a "
            "lead's ground-truth annotation.</p>"
        )
    review = (
        f'<h3>Review queue</h3><p id="review-queue">{_h(waiting(len(lq.review_tasks)))} '
        "for a lead to resolve the annotators' disagreement: "
        f"{_task_links(section, lq.review_tasks)}</p>"
        if lq.review_tasks
        else ""
    )
    if lq.agreement_tasks:
        arows = "".join(
            f'<tr data-class="{_h(c)}"><td class="name">{_h(c)}</td>'
            f"<td>{_h(fmt_num(lq.agreement.get(c)))}</td></tr>"
            for c in classes
        )
        agreement = (
            '<h3>Per class agreement</h3><table id="class-agreement"><thead><tr><th>Class</th>'
            f"<th>Agreement</th></tr></thead><tbody>{arows}</tbody></table>"
            f'<p class="muted">Mean pairwise F1 of the annotators\' boxes of each class over the '
            f"{lq.agreement_tasks} task{'s' if lq.agreement_tasks != 1 else ''} with two or more "
            "annotators (review tasks included); — where no annotator drew the class.</p>"
        )
    else:
        agreement = (
            '<p class="muted" id="class-agreement">No task has two annotators yet: no per-class '
            "agreement.</p>"
        )
    return stats + rule + no_links + table + review + agreement


def production_html(data: ProductionData | None) -> str:
    """The section's body: stats, the drift plot, the alerts table and the novel images."""

    def muted(text: str) -> str:
        return f'<p class="nodata">{_h(text)}</p>'

    if data is None or not data.windows:
        return muted(
            f"{NO_PRODUCTION}: deploy a model (`defect-loop deploy`) and run `defect-loop monitor`"
        )
    last = data.windows[-1]
    stats = (
        '<div class="stats" id="production-stats">'
        f'<div class="stat"><b>{len(data.windows)}</b><span>windows checked</span></div>'
        f'<div class="stat"><b>{data.images}</b><span>production images</span></div>'
        f'<div class="stat"><b>{len(data.alerts)}</b><span>alerts</span></div>'
        f'<div class="stat"><b>{data.queued}</b><span>queued for labeling ({data.pushed} pushed)</span></div>'
        f'<div class="stat"><b>v{_h(last.bundle_version)}</b><span>bundle of the last window</span></div>'
        "</div>"
    )
    png = drift_png(data)
    plot = "" if png is None else f'<img class="plot" alt="drift over time" src="{_png_uri(png)}">'
    if data.alerts:
        rows = "".join(
            f'<tr><td>{w.index}</td><td>{_h(w.created_at)}</td><td style="text-align:left">'
            f"{_h(w.message)}</td></tr>"
            for w in data.alerts[-MAX_ALERTS:][::-1]
        )
        alerts = (
            '<h3>Alerts</h3><table id="alerts"><thead><tr><th>Window</th><th>When (UTC)</th>'
            f'<th style="text-align:left">What changed</th></tr></thead><tbody>{rows}</tbody></table>'
        )
    else:
        alerts = '<h3>Alerts</h3><p class="muted" id="alerts">No window alerted.</p>'
    if data.novel:
        figs = []
        for n in data.novel:
            d = Disagreement(
                n.sha256,
                n.sha256[:12],
                n.priority,
                predicted=[Box(b[0], b[1], b[2], b[3], b[4], b[5]) for b in n.boxes],
                final=(),
                image_path=n.image_path,
                size=n.size,
            )
            figs.append(
                f'<figure><img alt="{_h(n.sha256[:12])}" src="{_png_uri(thumbnail_png(d))}">'
                f"<figcaption><b>{_h(n.sha256[:12])}</b><br>{_h(n.reason)}, priority "
                f"{_h(fmt_num(n.priority, 2))} · window {n.window} · {_h(n.status)}</figcaption></figure>"
            )
        novel = (
            "<h3>Most novel or uncertain images (first in the next push)</h3>"
            '<div class="legend"><span><i class="pred"></i>production model\'s boxes</span></div>'
            f'<div class="gallery" id="novel-images">{"".join(figs)}</div>'
        )
    else:
        novel = "<h3>Most novel or uncertain images</h3>" + muted("No image was queued.")
    return stats + plot + alerts + novel
