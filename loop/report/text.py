"""How the report writes numbers and names, shared by the advice, the HTML and the Markdown."""

from __future__ import annotations

import math


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
