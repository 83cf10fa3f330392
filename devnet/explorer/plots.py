"""Server-side SVG: cumulative step charts (one line per series) with axes, ticks and a legend."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from devnet.explorer.layout import esc

PALETTE = ("#2457c5", "#e4572e", "#17803d", "#9a4dc4", "#d4a017", "#0f8b8d", "#c2185b", "#6d4c41")
MAX_SERIES = len(PALETTE)


@dataclass(frozen=True, slots=True)
class Point:
    x: int  # block number
    y: float  # cumulative value after this block
    note: str = ""  # tooltip text


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def step_chart(
    series: Mapping[str, Sequence[Point]],
    *,
    title: str,
    y_label: str,
    chart_id: str,
    y_format: Callable[[float], str] = lambda v: f"{v:,.0f}",
    width: int = 640,
    height: int = 300,
) -> str:
    """An SVG of cumulative values against block number; each series is drawn as steps."""
    series = {k: list(v) for k, v in list(series.items())[:MAX_SERIES] if v}
    rows = max(1, math.ceil(len(series) / 3))  # legend rows, three entries each
    left, right, top, bottom = 70, 16, 36, 50 + 15 * rows
    pw, ph = width - left - right, height - top - bottom
    head = (
        f'<svg id="{esc(chart_id)}" class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}"><text x="{left}" y="22" font-size="14" font-weight="600" '
        f'fill="#1d2430">{esc(title)}</text>'
    )
    if not series:
        return head + (
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#5d6778" '
            'font-size="13">no settled batches yet</text></svg>'
        )
    xs = [p.x for pts in series.values() for p in pts]
    x_lo, x_hi = min(xs), max(xs)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_end = x_hi + (x_hi - x_lo) * 0.04  # room after the last step, so it shows
    y_ticks = nice_ticks(0, max(p.y for pts in series.values() for p in pts) or 1)
    y_hi = y_ticks[-1] or 1

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_end - x_lo) * pw

    def sy(y: float) -> float:
        return top + ph - y / y_hi * ph

    out = [head, f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfcfe" stroke="#dde2ea"/>']
    for t in y_ticks:
        y = sy(t)
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e8ecf2"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#5d6778">'
            f"{esc(y_format(t))}</text>"
        )
    for t in nice_ticks(x_lo, x_hi, 6):
        if x_lo <= t <= x_hi and float(t).is_integer():
            x = sx(t)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#5d6778"/>'
                f'<text x="{x:.1f}" y="{top + ph + 17}" text-anchor="middle" font-size="11" fill="#5d6778">'
                f"{int(t)}</text>"
            )
    out.append(
        f'<text x="{left + pw / 2}" y="{top + ph + 33}" text-anchor="middle" font-size="12" fill="#394253">'
        f'block (settlement)</text><text x="14" y="{top + ph / 2}" font-size="12" fill="#394253" '
        f'text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">{esc(y_label)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i]
        pts = sorted(pts, key=lambda p: p.x)
        path = [f"M{sx(x_lo):.1f},{sy(0):.1f}"]
        for p in pts:
            path.append(f"H{sx(p.x):.1f}V{sy(p.y):.1f}")
        path.append(f"H{sx(x_end):.1f}")
        out.append(
            f'<path class="series" data-series="{esc(name)}" d="{"".join(path)}" fill="none" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        for p in pts:
            out.append(
                f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="3" fill="{color}">'
                f"<title>{esc(name)}: {esc(y_format(p.y))} by block {p.x}{esc(p.note)}</title></circle>"
            )
        lx, ly = left + (i % 3) * (pw / 3), top + ph + 52 + (i // 3) * 15
        out.append(
            f'<rect x="{lx:.1f}" y="{ly - 8:.1f}" width="10" height="10" fill="{color}"/>'
            f'<text x="{lx + 14:.1f}" y="{ly + 1:.1f}" font-size="11" fill="#1d2430">{esc(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
