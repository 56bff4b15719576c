"""Thumbnails of images with boxes drawn in (PIL): the model's suggestions dashed orange, the
labelers' final boxes solid blue. An instance with an outline (``segment`` projects) is drawn
as its mask instead of its box: the polygon filled semi-transparent in the same colour, its
outline solid (final) or dashed (suggestion)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loop.report.data import THUMB_PX, Box, Disagreement

PRED_COLOR = (230, 159, 0)  # Okabe-Ito orange: the model's suggestions (dashed)

FINAL_COLOR = (0, 114, 178)  # Okabe-Ito blue: the labelers' final boxes (solid)


def _short(text: str, n: int = 16) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _dashed_path(draw: Any, points: list[tuple[float, float]], color: Any, width: int) -> None:
    """A closed dashed outline through ``points`` (pixels): 6 px dashes, 4 px gaps."""
    dash, gap = 6.0, 4.0
    for (ax, ay), (bx, by) in zip(points, points[1:] + points[:1], strict=True):
        length = math.hypot(bx - ax, by - ay)
        if length == 0:
            continue
        ux, uy = (bx - ax) / length, (by - ay) / length
        t = 0.0
        while t < length:
            e = min(t + dash, length)
            draw.line((ax + ux * t, ay + uy * t, ax + ux * e, ay + uy * e), fill=color, width=width)
            t = e + gap


def _dashed_rect(draw: Any, xy: tuple[float, float, float, float], color: Any, width: int) -> None:
    x1, y1, x2, y2 = xy
    _dashed_path(draw, [(x1, y1), (x2, y1), (x2, y2), (x1, y2)], color, width)


FILL_ALPHA = 80  # of 255: the image stays visible under a mask overlay


def _mask_overlay(img: Any, boxes: Sequence[Box], s: float, color: tuple[int, int, int]) -> Any:
    """``img`` with the outlines of ``boxes`` (those that have rings) filled at `FILL_ALPHA`,
    each instance by the even-odd rule (an inner ring is a hole)."""
    from PIL import Image, ImageChops, ImageDraw

    shapes = [b for b in boxes if b.rings]
    if not shapes:
        return img
    alpha = Image.new("L", img.size, 0)
    for b in shapes:
        inst = Image.new("1", img.size, 0)
        for ring in b.rings:
            one = Image.new("1", img.size, 0)
            ImageDraw.Draw(one).polygon([(x * s, y * s) for x, y in ring], fill=1)
            inst = ImageChops.logical_xor(inst, one)
        alpha.paste(FILL_ALPHA, mask=inst)
    layer = Image.new("RGB", img.size, color)
    return Image.composite(layer, img, alpha)


def thumbnail_png(d: Disagreement, px: int = THUMB_PX) -> bytes:
    """``d``'s image scaled to ``px`` on its long side with the final boxes (solid blue) and the
    model's suggestions (dashed orange) drawn; a grey canvas when the image is unavailable."""
    from PIL import Image, ImageDraw, ImageFont

    img: Any = None
    if d.image_path is not None and Path(d.image_path).is_file():
        try:
            with Image.open(d.image_path) as src:
                src.draft("RGB", (px * 2, px * 2))
                img = src.convert("RGB")
        except OSError:
            img = None
    if img is None:
        w, h = d.size or (
            max([1.0, *(b.x2 for b in (*d.predicted, *d.final))]),
            max([1.0, *(b.y2 for b in (*d.predicted, *d.final))]),
        )
        img = Image.new("RGB", (max(1, int(w)), max(1, int(h))), (208, 215, 222))
    ow, oh = img.size
    s = px / max(ow, oh)
    img = img.resize((max(1, round(ow * s)), max(1, round(oh * s))), Image.Resampling.LANCZOS)
    img = _mask_overlay(img, d.final, s, FINAL_COLOR)
    img = _mask_overlay(img, d.predicted, s, PRED_COLOR)
    draw = ImageDraw.Draw(img)
    try:
        font: Any = ImageFont.load_default(size=12)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()

    def tag(x: float, y: float, text: str, bg: tuple[int, int, int], below: bool) -> None:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 2
        ty = y + 1 if below else y - th - 1
        ty = min(max(ty, 0), img.height - th)
        tx = min(max(x, 0), img.width - tw)
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=bg)
        draw.text((tx + 2 - left, ty + 1 - top), text, fill=(255, 255, 255), font=font)

    for b in d.final:
        xy = (b.x1 * s, b.y1 * s, b.x2 * s, b.y2 * s)
        if b.rings:
            for ring in b.rings:
                draw.polygon([(x * s, y * s) for x, y in ring], outline=FINAL_COLOR, width=2)
        else:
            draw.rectangle(xy, outline=FINAL_COLOR, width=2)
        tag(xy[0], xy[3], _short(b.cls), FINAL_COLOR, below=True)
    for b in d.predicted:
        xy = (b.x1 * s, b.y1 * s, b.x2 * s, b.y2 * s)
        if b.rings:
            for ring in b.rings:
                _dashed_path(draw, [(x * s, y * s) for x, y in ring], PRED_COLOR, 2)
        else:
            _dashed_rect(draw, xy, PRED_COLOR, 2)
        score = "" if b.score is None else f" {b.score:.2f}"
        tag(xy[0], xy[1], f"{_short(b.cls)}{score}", (176, 112, 0), below=False)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
