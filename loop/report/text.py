"""How the report writes numbers and names, shared by the advice, the HTML and the Markdown."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loop.annotator_quality import LabelQuality

NO_LABEL_QUALITY = (
    "the annotation log holds no pulled task; the figures appear once `defect-loop pull` brings "
    "back labeled tasks"
)

LABEL_QUALITY_UNREADABLE = "the annotation log could not be read: see the notes at the end"

# What each error kind of `loop.annotator_quality` means, as the report words it.
ERROR_KIND_TEXT = {
    "missed": "missed reference boxes",
    "extra": "drew boxes the reference does not have",
    "confused": "gave a matched box another class",
}


def fmt_pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def fmt_ci(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_signed(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def fmt_int(v: int | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+d}" if signed else f"{v:d}"


def delta_of(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def trend(d: float | None) -> str:
    if d is None:
        return "flat"
    return "up" if d > 1e-9 else "down" if d < -1e-9 else "flat"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def model_name(version: str | None, rnd: int | None) -> str:
    parts = []
    if version:
        parts.append(f"v{version}")
    if rnd is not None:
        parts.append(f"round {rnd}")
    return ", ".join(parts) if parts else "the model"


def reference_rule(lq: LabelQuality) -> str:
    """How the reference was chosen, with this log's counts (the section's caption)."""
    n = lq.status_counts
    return (
        "Each annotator is scored against the label each task ended with: the consensus of the "
        f"merged tasks ({n.get('merged', 0)}), which their own boxes helped make, so it flatters "
        f"them, or the lead's resolved ground truth ({n.get('ground_truth', 0)} tasks; the lead's "
        f"own annotation is not scored). Tasks with one annotator ({n.get('single', 0)}) have no "
        f"independent reference and tasks waiting in review ({n.get('review', 0)}) none yet: "
        f"neither is scored. Boxes match one-to-one at IoU ≥ {lq.min_iou:g} (the correction "
        "analytics' matching); figures cover every task pulled so far (the newest pull of each)."
    )


def waiting(n: int) -> str:
    """``1 task waits`` / ``3 tasks wait``."""
    return f"{n} task waits" if n == 1 else f"{n} tasks wait"
