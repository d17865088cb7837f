"""Inline SVG charts drawn on the server: a score histogram and lines over time.

No chart library and no script: the page is readable as it arrives, prints, and needs nothing
from the internet. Colors are presentation attributes (not style=) so a strict Content-Security-
Policy applies. Every text that comes from data is escaped.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 230
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 36
NIGHT_COLOR, CALIBRATION_COLOR, THRESHOLD_COLOR = "#4a78b5", "#e08a1e", "#c0392b"
LINE_COLORS = ("#4a78b5", "#2e9e6a", "#8e44ad", "#e08a1e")


def bin_edges(low: float, high: float, n_bins: int) -> list[float]:
    """`n_bins` equal bins from `low` to `high` (a degenerate range is widened a little)."""
    if high <= low:
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    step = (high - low) / n_bins
    return [low + step * i for i in range(n_bins)] + [high]


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Histogram of `values` on `edges` in Python (for the calibration scores, already in memory)."""
    n_bins = len(edges) - 1
    counts = [0] * n_bins
    for value in values:
        if edges[0] <= value <= edges[-1]:
            counts[min(bisect_right(edges, value) - 1, n_bins - 1)] += 1  # the last bin is closed
    return counts


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def histogram_svg(edges: Sequence[float], night: Sequence[int], calibration: Sequence[int],
                  threshold: float | None) -> Markup:
    """The night's scores as bars and the calibration scores as an outline, both as the share of
    their own images per bin (so a night of 10,000 and 150 calibration images compare), and the
    threshold as a vertical line."""
    night_share, calib_share = _shares(night), _shares(calibration)
    top = max([*night_share, *calib_share, 1e-9])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    low, high = edges[0], edges[-1]

    def x_of(score: float) -> float:
        return LEFT + (score - low) / (high - low) * plot_w

    def y_of(share: float) -> float:
        return TOP + plot_h - share / top * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">']
    parts.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#888"/>')
    for index, share in enumerate(night_share):
        if share:
            x0, x1 = x_of(edges[index]), x_of(edges[index + 1])
            parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{y_of(share):.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                         f'height="{TOP + plot_h - y_of(share):.1f}" fill="{NIGHT_COLOR}" fill-opacity="0.75">'
                         f'<title>{_fmt(edges[index])} to {_fmt(edges[index + 1])}: {night[index]} images</title></rect>')
    if any(calibration):
        points = [f"{x_of(low):.1f},{y_of(0):.1f}"]
        for index, share in enumerate(calib_share):
            points += [f"{x_of(edges[index]):.1f},{y_of(share):.1f}", f"{x_of(edges[index + 1]):.1f},{y_of(share):.1f}"]
        points.append(f"{x_of(high):.1f},{y_of(0):.1f}")
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{CALIBRATION_COLOR}" stroke-width="2"/>')
    if threshold is not None and low <= threshold <= high:
        x = x_of(threshold)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="{THRESHOLD_COLOR}" '
                     f'stroke-width="2" stroke-dasharray="5,3"/>')
        parts.append(f'<text x="{x + 4:.1f}" y="{TOP + 10}" font-size="13" fill="{THRESHOLD_COLOR}">'
                     f'threshold {_fmt(threshold)}</text>')
    for score in (low, (low + high) / 2, high):
        anchor = "start" if score == low else "end" if score == high else "middle"
        parts.append(f'<text x="{x_of(score):.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="13" '
                     f'text-anchor="{anchor}" fill="#444">{_fmt(score)}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 4}" font-size="13" text-anchor="middle" '
                 f'fill="#444">score</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + 8}" font-size="13" text-anchor="end" fill="#444">'
                 f'{top:.0%}</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + plot_h}" font-size="13" text-anchor="end" fill="#444">0</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[float | None]  # one per x position; None leaves a gap
    dashed: bool = False


def line_chart_svg(x_labels: Sequence[str], series: Sequence[Series], *, percent: bool = False,
                   height: int = 200) -> Markup:
    """Lines over evenly spaced x positions (one per job, oldest left), with a legend."""
    values = [v for s in series for v in s.values if v is not None]
    if not x_labels or not values:
        return Markup("")
    low, high = min(values), max(values)
    if percent:
        low = 0.0
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM
    step = plot_w / max(len(x_labels) - 1, 1)

    def x_of(index: int) -> float:
        return LEFT + (index * step if len(x_labels) > 1 else plot_w / 2)

    def y_of(value: float) -> float:
        return TOP + plot_h - (value - low) / (high - low) * plot_h

    label = (lambda v: f"{v:.0%}") if percent else _fmt
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img">']
    parts.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#888"/>')
    for bound in (low, high):
        parts.append(f'<text x="{LEFT - 6}" y="{y_of(bound) + 4:.1f}" font-size="13" text-anchor="end" '
                     f'fill="#444">{label(bound)}</text>')
    for index, color in zip(range(len(series)), LINE_COLORS * 4, strict=False):
        line = series[index]
        dash = ' stroke-dasharray="5,3"' if line.dashed else ""
        runs: list[list[str]] = [[]]
        for position, value in enumerate(line.values):
            if value is None:
                runs.append([])
                continue
            runs[-1].append(f"{x_of(position):.1f},{y_of(value):.1f}")
            parts.append(f'<circle cx="{x_of(position):.1f}" cy="{y_of(value):.1f}" r="2.5" fill="{color}">'
                         f'<title>{escape(line.label)} {escape(x_labels[position])}: {label(value)}</title></circle>')
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{LEFT + 8 + index * 130}" y="{height - 6}" font-size="13" fill="{color}">'
                     f'■ {escape(line.label)}</text>')
    for position in sorted({0, len(x_labels) - 1}):
        anchor = "start" if position == 0 else "end"
        parts.append(f'<text x="{x_of(position):.1f}" y="{height - BOTTOM + 14}" font-size="13" '
                     f'text-anchor="{anchor}" fill="#444">{escape(x_labels[position])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
