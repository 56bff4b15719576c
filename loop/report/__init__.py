"""The model-improvement report for leads: one self-contained HTML page and a Markdown summary.

`write_report` is the entry point: `collect_report_data` (`loop.report.collect`) reads one round
from the project (MLflow training runs through `loop.tracking`, dataset versions, three optional
JSON files and the production monitor's records) into a `ReportData` (`loop.report.data`);
`render_html` (`loop.report.html`) and `render_markdown` (`loop.report.markdown`) turn it into text
and touch nothing but the thumbnail image files it names; the advice rules are in
`loop.report.advice`, the figures in `loop.report.plots` (the only module that imports
matplotlib) and `loop.report.thumbnails`. `write_report` (`loop.report.files`) writes both files
and logs them to the round's MLflow training run under ``report/``.

The page needs no network: CSS is inline, plots (matplotlib's Agg canvas) and thumbnails (PIL) are
``data:`` PNGs, there is no JavaScript, and a Content-Security-Policy forbids loading anything
else. Every user-supplied string (class, file and annotator names, promotion reasons) is escaped.

Optional inputs; a section whose input is absent says "no data yet" instead of failing:

- ``<workspace>/datasets/<digest>/corrections.json``: correction analytics of the labels pulled
  into that dataset version (``loop.corrections``)::

      {"per_class": {cls: {"accepted": n, "adjusted": n, "relabeled": n, "removed": n,
                           "added": n}},
       "lead_times": [seconds, ...], "tasks": n,
       "images": [{"sha256": ..., "disagreement": float,
                   "predicted": [[x1, y1, x2, y2, cls, score], ...],
                   "final": [[x1, y1, x2, y2, cls], ...]}]}

  (``cls``: class name or class id; pixels). A round merges the files of every version between
  the previous round's training dataset (exclusive) and its own (inclusive).
- ``<workspace>/annotation-log.jsonl``: every pulled task's outcome and all its annotators'
  annotations (`loop.annotation_log`); the "Label quality" section scores each annotator
  against the reference each task ended with (`loop.annotator_quality.label_quality`) and
  links the tasks behind each error to Label Studio.
- ``<workspace>/simulation.json``: the oracle replay's random-selection baseline, a list of
  ``{"labeled": n, "test_map50": x}`` (or ``{"random": [...]}``).
- ``<workspace>/next_batch.json``: the batch pushed after the last scoring, written by
  `write_next_batch`: ``{"strategy", "size", "class_mix": {cls: n}, ...}``.
"""

from loop.report.advice import what_to_do_next
from loop.report.collect import collect_production, collect_report_data
from loop.report.data import (
    NO_DATA,
    NO_PRODUCTION,
    Advice,
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
from loop.report.files import report_paths, write_next_batch, write_report
from loop.report.html import production_html, render_html
from loop.report.markdown import production_markdown, render_markdown
from loop.report.plots import confusion_png, drift_png, learning_curve_png
from loop.report.thumbnails import thumbnail_png

__all__ = [
    "NO_DATA",
    "NO_PRODUCTION",
    "Advice",
    "Box",
    "ClassCorrections",
    "ClassRow",
    "Confusion",
    "Disagreement",
    "Effort",
    "LabelQualityData",
    "NextBatch",
    "NovelImage",
    "ProductionData",
    "ReportData",
    "RoundPoint",
    "WindowPoint",
    "collect_production",
    "collect_report_data",
    "confusion_png",
    "drift_png",
    "learning_curve_png",
    "production_html",
    "production_markdown",
    "render_html",
    "render_markdown",
    "report_paths",
    "thumbnail_png",
    "what_to_do_next",
    "write_next_batch",
    "write_report",
]
