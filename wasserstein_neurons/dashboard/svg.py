"""Small inline SVG charts drawn directly from numbers (no matplotlib, no JavaScript).

The neuron dashboard renders a few charts per page for more than a thousand pages, so every
chart here is a plain string of SVG built from arrays in well under a millisecond. Each chart
is a :class:`Chart` (a fixed pixel frame with linear or log axes) that series are drawn into,
and :meth:`Chart.svg` returns the ``<svg>`` element. Numbers are written with four
significant digits; non-finite values are left out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Colours of successive series (matplotlib's tab10, so the pages match the PNG figures).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _f(v: float) -> str:
    """A coordinate with one decimal (pixels)."""
    return f"{v:.1f}"


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps 1, 2, 2.5 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


@dataclass
class Chart:
    """A plot frame: data limits, pixel size, axis labels and the SVG elements drawn so far.

    Parameters
    ----------
    xlim, ylim : (float, float)
        Data limits; with ``log_y`` the y limits must be positive.
    width, height : int
        Pixels of the whole ``<svg>`` (margins included).
    """

    xlim: tuple[float, float]
    ylim: tuple[float, float]
    width: int = 420
    height: int = 240
    log_y: bool = False
    xlabel: str = ""
    ylabel: str = ""
    title: str = ""
    parts: list[str] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)
    margin: tuple[int, int, int, int] = (22, 12, 34, 52)  # top, right, bottom, left

    def _ty(self, y: float) -> float:
        lo, hi = self.ylim
        if self.log_y:
            y, lo, hi = math.log10(max(y, lo)), math.log10(lo), math.log10(hi)
        top, _, bottom, _ = self.margin
        return self.height - bottom - (y - lo) / (hi - lo) * (self.height - top - bottom)

    def _tx(self, x: float) -> float:
        lo, hi = self.xlim
        _, right, _, left = self.margin
        return left + (x - lo) / (hi - lo) * (self.width - left - right)

    def bars(self, edges, heights, color: str = PALETTE[0], label: str = "", opacity=0.75):
        """Histogram bars: ``heights[i]`` over ``[edges[i], edges[i + 1]]`` (zeros skipped)."""
        base = self.ylim[0]
        rects = []
        for x0, x1, h in zip(edges[:-1], edges[1:], heights, strict=True):
            if not (h > base and math.isfinite(h)):
                continue
            y, left = self._ty(min(h, self.ylim[1])), self._tx(x0)
            rects.append(
                f'<rect x="{_f(left)}" y="{_f(y)}" width="{_f(self._tx(x1) - left)}"'
                f' height="{_f(self._ty(base) - y)}"/>'
            )
        self.parts.append(f'<g fill="{color}" fill-opacity="{opacity}">{"".join(rects)}</g>')
        if label:
            self.legend.append((label, color))

    def stacked_bars(self, edges, counts, colors) -> None:
        """Bars stacked per bin: ``counts[g, i]`` of group ``g`` in bin ``i`` (linear y)."""
        counts = np.asarray(counts, dtype=float)
        below = np.zeros(counts.shape[1])
        for row, color in zip(counts, colors, strict=True):
            rects = []
            for i in np.flatnonzero(row > 0):
                y0, y1 = self._ty(below[i]), self._ty(min(below[i] + row[i], self.ylim[1]))
                x0, x1 = self._tx(edges[i]), self._tx(edges[i + 1])
                rects.append(
                    f'<rect x="{_f(x0)}" y="{_f(y1)}" width="{_f(x1 - x0)}" '
                    f'height="{_f(y0 - y1)}"/>'
                )
            below += row
            self.parts.append(f'<g fill="{color}">{"".join(rects)}</g>')

    def line(self, x, y, color="#000", label="", dash="", width=1.4, step=False):
        """A polyline through the finite points (``step``: a histogram outline over edges)."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if step:  # x are the edges (len(y) + 1)
            x = np.repeat(x, 2)[1:-1]
            y = np.repeat(y, 2)
        keep = np.isfinite(x) & np.isfinite(y)
        if self.log_y:
            keep &= y >= self.ylim[0]
        pts = " ".join(
            f"{_f(self._tx(a))},{_f(self._ty(min(b, self.ylim[1])))}"
            for a, b in zip(x[keep], y[keep], strict=True)
        )
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="{width}"{dash_attr}'
            f' points="{pts}"/>'
        )
        if label:
            self.legend.append((label, color))

    def points(self, x, y, color=PALETTE[0], label="", r=1.8):
        """Dots at the finite points (one ``<path>`` of zero-length round-capped strokes)."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        d = "".join(
            f"M{_f(self._tx(a))} {_f(self._ty(b))}h0" for a, b in zip(x[keep], y[keep], strict=True)
        )
        self.parts.append(
            f'<path class="dots" d="{d}" stroke="{color}" stroke-width="{2 * r}" '
            'stroke-linecap="round" fill="none"/>'
        )
        if label:
            self.legend.append((label, color))

    def _axes(self) -> str:
        top, right, bottom, left = self.margin
        x0, x1 = left, self.width - right
        y0, y1 = self.height - bottom, top
        out = [
            f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" '
            'stroke="#888"/>'
        ]
        for t in nice_ticks(*self.xlim):
            px = self._tx(t)
            out.append(f'<line x1="{_f(px)}" y1="{y0}" x2="{_f(px)}" y2="{y0 + 4}" stroke="#888"/>')
            out.append(
                f'<text x="{_f(px)}" y="{y0 + 15}" text-anchor="middle">{_tick_label(t)}</text>'
            )
        for t in self._y_ticks():
            py = self._ty(t)
            out.append(f'<line x1="{x0 - 4}" y1="{_f(py)}" x2="{x0}" y2="{_f(py)}" stroke="#888"/>')
            out.append(
                f'<text x="{x0 - 6}" y="{_f(py + 3)}" text-anchor="end">{_tick_label(t)}</text>'
            )
        if self.xlabel:
            out.append(
                f'<text x="{(x0 + x1) / 2}" y="{self.height - 4}" text-anchor="middle">'
                f"{html.escape(self.xlabel)}</text>"
            )
        if self.ylabel:
            out.append(
                f'<text transform="translate(12,{(y0 + y1) / 2}) rotate(-90)" '
                f'text-anchor="middle">{html.escape(self.ylabel)}</text>'
            )
        if self.title:
            out.append(
                f'<text x="{(x0 + x1) / 2}" y="14" text-anchor="middle" font-weight="bold">'
                f"{html.escape(self.title)}</text>"
            )
        return "".join(out)

    def _y_ticks(self) -> list[float]:
        lo, hi = self.ylim
        if not self.log_y:
            return nice_ticks(lo, hi)
        return [10.0**e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]

    def _legend(self) -> str:
        _, right, _, _ = self.margin
        out = []
        for i, (label, color) in enumerate(self.legend):
            y = self.margin[0] + 10 + 13 * i
            x = self.width - right - 8
            out.append(
                f'<rect x="{x - 10}" y="{y - 8}" width="9" height="9" fill="{color}"/>'
                f'<text x="{x - 14}" y="{y}" text-anchor="end">{html.escape(label)}</text>'
            )
        return "".join(out)

    def svg(self, css_class: str = "chart", label: str = "") -> str:
        """The finished ``<svg>`` element (``label`` becomes its ``aria-label``)."""
        aria = html.escape(label or self.title, quote=True)
        return (
            f'<svg class="{css_class}" role="img" aria-label="{aria}" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="10">'
            f"{self._axes()}{''.join(self.parts)}{self._legend()}</svg>"
        )


def group_colors(k: int) -> list[str]:
    """``k`` distinct colours: the palette, or evenly spaced hues beyond ten groups."""
    if k <= len(PALETTE):
        return list(PALETTE[:k])
    return [f"hsl({round(360 * g / k)},65%,48%)" for g in range(k)]


def data_range(*arrays: Sequence[float], pad: float = 0.03) -> tuple[float, float]:
    """``(lo, hi)`` over the finite values of ``arrays``, padded by ``pad`` of the span."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span
