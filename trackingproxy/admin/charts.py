# -*- test-case-name: tests.admin.test_charts -*-
"""The status page's charts of the last hour, as inline SVG (no scripts, no external assets).

Three figures drawn from a ``history.Window``: requests per minute by kind and error answers
per minute by cause (stacked bars), and the upstream response time's p50 and p99 per minute
(lines, on a logarithmic scale: a slow p99 does not flatten the p50). Each has a time axis
in UTC (a tick every ten minutes), a value axis with gridlines at round values (powers of ten
for the response time), a legend with the hour's totals (an HTML list below the drawing), a
tooltip per minute (``<title>``) and an empty state ("no data yet" before the first reading).
The minute in progress is the last bar, drawn paler. Every SVG is well-formed XML and every
text in it is escaped; the colours keep at least 3:1 contrast against the white background.
The work depends only on the number of minutes (61), never on the number of domains.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape
from operator import attrgetter
from typing import Final

from attrs import frozen

from trackingproxy.admin.history import OTHER_5XX, Minute, Window, cause_status
from trackingproxy.admin.metrics import ERROR_CAUSES

__all__ = [
    "ERROR_COLOURS", "HEIGHT", "LATENCY", "PLOT", "REQUESTS", "WIDTH", "Frame", "Plot", "Series",
    "decades", "error_series", "latency_lines", "nice_top", "render_charts", "stacked_bars",
]  # fmt: skip

WIDTH: Final = 320.0
HEIGHT: Final = 180.0
TICKS: Final = 4  # gridlines above the baseline
TEXT: Final = "#4a5263"
GRID: Final = "#e3e6ec"


@frozen
class Plot:
    """The plotting area inside the ``WIDTH`` x ``HEIGHT`` view box."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top


PLOT: Final = Plot(left=48.0, top=8.0, right=WIDTH - 14.0, bottom=HEIGHT - 36.0)


@frozen
class Series:
    """One quantity drawn: its key in a ``Minute``'s mapping, legend label and colour."""

    key: str
    label: str
    colour: str


REQUESTS: Final = (
    Series("open", "opens (/q/)", "#0072b2"),
    Series("click", "clicks (/f/)", "#c75000"),
    Series("other", "other", "#6b7383"),
)
LATENCY: Final = (
    Series("p50", "p50 (median)", "#0072b2"),
    Series("p99", "p99", "#c2185b"),
)
ERROR_COLOURS: Final = {
    "4xx": "#9a6700", "timeout": "#c62828", "connect": "#6a3d9a", "dns": "#00796b",
    "tls": "#3949ab", "reset": "#ad1457", "protocol": "#5d4037", "busy": "#d84315",
    "internal": "#37474f", OTHER_5XX: "#2e7d32",
}  # fmt: skip
_SPARE_COLOURS: Final = ("#455a64", "#795548", "#00695c", "#4527a0")
_QUANTILE: Final = {"p50": 0.5, "p99": 0.99}


@frozen
class Frame:
    """Maps clock seconds (``start`` to ``end``) and values (``low`` to ``top``; on a
    logarithmic scale with ``log``) into ``PLOT``."""

    start: float
    end: float
    top: float
    low: float = 0.0
    log: bool = False

    def x(self, t: float) -> float:
        return PLOT.left + (t - self.start) * PLOT.width / (self.end - self.start)

    def y(self, value: float) -> float:
        if self.log:
            value = min(max(value, self.low), self.top)
            part = math.log10(value / self.low) / math.log10(self.top / self.low)
        else:
            part = (value - self.low) / (self.top - self.low)
        return PLOT.bottom - part * PLOT.height

    def ticks(self) -> list[tuple[float, str]]:
        """The gridlines: ``TICKS`` + 1 round values, or each power of ten (in ms) on a
        logarithmic scale."""
        if self.log:
            out = []
            value = self.low
            while value <= self.top * (1 + 1e-9):
                out.append((value, _ms(value / 1000)))
                value *= 10
            return out
        return [(self.top * i / TICKS, _count(self.top * i / TICKS)) for i in range(TICKS + 1)]


def nice_top(peak: float) -> float:
    """The top of a value axis showing ``peak``: ``TICKS`` steps of 1, 2 or 5 times a power
    of ten (2.5 too from 10 up), each step at least 1."""
    target = max(peak, TICKS) / TICKS
    power = 10.0 ** math.floor(math.log10(target))
    steps = (1.0, 2.0, 2.5, 5.0, 10.0) if power >= 10 else (1.0, 2.0, 5.0, 10.0)
    step = next(m * power for m in steps if m * power >= target * (1 - 1e-9))
    return step * TICKS


def error_series(keys: Iterable[str]) -> list[Series]:
    """The error series for ``keys``, in the charts' order: 4xx, the upstream failure causes
    (labelled with the status they are answered with), other 5xx."""
    wanted = set(keys)
    order = ["4xx", *ERROR_CAUSES, *sorted(wanted - {"4xx", OTHER_5XX, *ERROR_CAUSES}), OTHER_5XX]
    labels = {"4xx": "4xx answers", OTHER_5XX: OTHER_5XX}
    out: list[Series] = []
    for key in (k for k in order if k in wanted):
        spare = _SPARE_COLOURS[sum(s.key not in ERROR_COLOURS for s in out) % 4]
        label = labels.get(key) or f"{cause_status(key)} upstream {key}"
        out.append(Series(key, label, ERROR_COLOURS.get(key, spare)))
    return out


def decades(low: float, high: float) -> tuple[float, float]:
    """The powers of ten (at least 1 and two decades apart) around ``low`` to ``high``."""
    bottom = 10.0 ** math.floor(math.log10(max(low, 1.0)))
    top = 10.0 ** math.ceil(math.log10(max(high, bottom * 100)))
    return bottom, top


def _count(v: float) -> str:
    return f"{v / 1000:g}k" if v >= 10_000 else f"{v:,.0f}"


def _num(v: float) -> str:
    """A coordinate: at most one decimal, no trailing zeros."""
    text = f"{v:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _hhmm(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%H:%M")


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.1f}".removesuffix(".0") + " ms"
    if ms < 1000:
        return f"{ms:,.0f} ms"
    return f"{seconds:.2f}".rstrip("0").removesuffix(".") + " s"


@frozen
class _Slot:
    """A minute and the time span it is drawn over."""

    minute: Minute
    start: float
    end: float


def _slots(window: Window | None) -> list[_Slot]:
    """The minutes of ``window`` with their spans (the minute in progress: a whole interval),
    clipped to the window; the minutes outside it are left out."""
    if window is None:
        return []
    out = []
    for m in window.minutes:
        start = max(m.start, window.start)
        end = min(m.start + window.interval if m.partial else m.end, window.end)
        if end > start:
            out.append(_Slot(m, start, end))
    return out


def _frame(window: Window | None, top: float, low: float = 0.0, log: bool = False) -> Frame:
    """The frame of ``window`` (without one: an hour, drawn without times)."""
    start, end = (0.0, 3660.0) if window is None else (window.start, window.end)
    return Frame(start, end, top, low, log)


def _axes(frame: Frame, unit: str, times: bool = True) -> str:
    """Gridlines with value labels, the time axis with a tick every ten minutes (``times``),
    the axis titles (``unit``: none where every value label has its unit)."""
    out = []
    for i, (value, label) in enumerate(frame.ticks()):
        y = frame.y(value)
        colour = TEXT if i == 0 else GRID
        out.append(
            f'<line x1="{_num(PLOT.left)}" x2="{_num(PLOT.right)}" y1="{_num(y)}" '
            f'y2="{_num(y)}" stroke="{colour}"/><text x="{_num(PLOT.left - 4)}" '
            f'y="{_num(y + 3.5)}" text-anchor="end">{escape(label)}</text>'
        )
    tick = math.ceil(frame.start / 600) * 600
    while times and tick <= frame.end:
        at = frame.x(tick)
        x = _num(at)
        anchor = "end" if at > WIDTH - 12 else "middle"
        out.append(
            f'<line x1="{x}" x2="{x}" y1="{_num(PLOT.bottom)}" y2="{_num(PLOT.bottom + 4)}" '
            f'stroke="{TEXT}"/><text x="{x}" y="{_num(PLOT.bottom + 15)}" '
            f'text-anchor="{anchor}">{_hhmm(tick)}</text>'
        )
        tick += 600
    out.append(
        f'<text x="{_num(PLOT.left + PLOT.width / 2)}" y="{_num(HEIGHT - 3)}" '
        f'text-anchor="middle">time (UTC)</text>'
    )
    if unit:
        out.append(
            f'<text transform="translate(10 {_num(PLOT.top + PLOT.height / 2)}) rotate(-90)" '
            f'text-anchor="middle">{escape(unit)}</text>'
        )
    return f'<g class="axes" fill="{TEXT}">{"".join(out)}</g>'


def _empty(text: str) -> str:
    return (
        f'<text class="empty" x="{_num(PLOT.left + PLOT.width / 2)}" '
        f'y="{_num(PLOT.top + PLOT.height / 2)}" text-anchor="middle" fill="{TEXT}" '
        f'font-size="12">{escape(text)}</text>'
    )


def _svg(name: str, title: str, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="chart-{name}" '
        f'viewBox="0 0 {_num(WIDTH)} {_num(HEIGHT)}" role="img" '
        f'aria-labelledby="chart-{name}-title" font-size="10" '
        f'font-family="system-ui, -apple-system, &quot;Segoe UI&quot;, Roboto, '
        f'&quot;DejaVu Sans&quot;, sans-serif">'
        f'<title id="chart-{name}-title">{escape(title)}</title>{body}</svg>'
    )


def _span_title(window: Window | None, what: str) -> str:
    if window is None:
        return f"{what}: no data yet"
    return f"{what}, {_hhmm(window.start)} to {_hhmm(window.end)} UTC"


def _when(m: Minute) -> str:
    return f"{_hhmm(m.start)} UTC{' (so far)' if m.partial else ''}"


def stacked_bars(
    name: str, unit: str, window: Window | None, series: Sequence[Series], nothing: str
) -> str:
    """An SVG of one stacked bar per minute of the counts ``name`` (``requests`` or
    ``errors``) of each ``series``, bottom up, with a tooltip per minute; ``nothing`` says
    what a window of zeros lacks."""
    values: Callable[[Minute], Mapping[str, int]] = attrgetter(name)
    slots = _slots(window)
    peak = max((sum(values(t.minute).get(s.key, 0) for s in series) for t in slots), default=0)
    frame = _frame(window, nice_top(peak))
    bars = []
    for t in slots:
        counts = values(t.minute)
        x = frame.x(t.start) + 0.4
        width = _num(max(frame.x(t.end) - 0.4 - x, 0.8))
        below, rects = 0, []
        for s in series:
            v = counts.get(s.key, 0)
            if v > 0:
                top, bottom = frame.y(below + v), frame.y(below)
                rects.append(
                    f'<rect x="{_num(x)}" y="{_num(top)}" width="{width}" '
                    f'height="{_num(bottom - top)}" fill="{s.colour}"/>'
                )
                below += v
        if rects:
            detail = ", ".join(f"{s.label} {counts[s.key]:,}" for s in series if counts.get(s.key))
            pale = ' fill-opacity="0.5"' if t.minute.partial else ""
            title = f"<title>{_when(t.minute)}: {escape(detail)}</title>"
            bars.append(f"<g{pale}>{title}{''.join(rects)}</g>")
    body = _axes(frame, unit, window is not None) + f'<g class="bars">{"".join(bars)}</g>'
    if window is None:
        body += _empty("no data yet")
    elif peak == 0:
        body += _empty(nothing)
    return _svg(name, _span_title(window, f"{name.capitalize()} per minute"), body)


def _runs(points: Sequence[tuple[_Slot, float, float]]) -> list[list[tuple[float, float]]]:
    """The (x, y) points split where a minute is missing (no response, or not recorded)."""
    runs: list[list[tuple[float, float]]] = []
    previous: Minute | None = None
    for t, x, y in points:
        if runs and previous is not None and t.minute.start - previous.end < 1:
            runs[-1].append((x, y))
        else:
            runs.append([(x, y)])
        previous = t.minute
    return runs


def latency_lines(window: Window | None) -> str:
    """An SVG of the upstream response time's p50 and p99 per minute on a logarithmic scale
    (milliseconds); a point alone (a minute between minutes without responses) is a dot."""
    measured = [
        (t, {s.key: 1000 * (t.minute.latency(_QUANTILE[s.key]) or 0.0) for s in LATENCY})
        for t in _slots(window)
        if t.minute.responses
    ]
    values = [v for _, qs in measured for v in qs.values() if v > 0]
    low, top = decades(min(values, default=10.0), max(values, default=1000.0))
    frame = _frame(window, top, low, log=True)
    lines = []
    for s in LATENCY:
        points = [(t, frame.x((t.start + t.end) / 2), frame.y(qs[s.key])) for t, qs in measured]
        for run in _runs(points):
            if len(run) == 1:
                lines.append(
                    f'<circle cx="{_num(run[0][0])}" cy="{_num(run[0][1])}" r="2" '
                    f'fill="{s.colour}"/>'
                )
            else:
                coords = " ".join(f"{_num(x)},{_num(y)}" for x, y in run)
                lines.append(
                    f'<polyline points="{coords}" fill="none" stroke="{s.colour}" '
                    'stroke-width="1.8" stroke-linejoin="round"/>'
                )
    hover = [
        f'<rect x="{_num(frame.x(t.start))}" y="{_num(PLOT.top)}" '
        f'width="{_num(frame.x(t.end) - frame.x(t.start))}" height="{_num(PLOT.height)}">'
        f"<title>{_when(t.minute)}: p50 {_ms(qs['p50'] / 1000)}, p99 {_ms(qs['p99'] / 1000)} "
        f"({t.minute.responses:,} responses)</title></rect>"
        for t, qs in measured
    ]
    body = (
        _axes(frame, "", window is not None)
        + f'<g class="lines">{"".join(lines)}</g>'
        + f'<g class="hover" fill="#fff" fill-opacity="0">{"".join(hover)}</g>'
    )
    if window is None:
        body += _empty("no data yet")
    elif not measured:
        body += _empty("no upstream responses yet")
    return _svg("latency", _span_title(window, "Upstream response time per minute"), body)


def _legend(items: Iterable[tuple[str | None, str, str]]) -> str:
    """(colour or None, label, value) per entry."""
    out = []
    for colour, label, value in items:
        key = f'<span class="key" style="background:{colour}"></span>' if colour else ""
        shown = f" <b>{escape(value)}</b>" if value else ""
        out.append(f"<li>{key}{escape(label)}{shown}</li>")
    return f'<ul class="legend">{"".join(out)}</ul>'


def _figure(name: str, caption: str, svg: str, legend: str) -> str:
    return (
        f'<figure class="chart" id="figure-{name}"><figcaption>{caption}</figcaption>'
        f"{svg}{legend}</figure>"
    )


def render_charts(window: Window | None) -> str:
    """The page's "last hour" section: requests, errors and response time per minute."""
    requests = window.requests() if window is not None else {}
    errors = window.errors() if window is not None else {}
    shown = error_series(k for k, v in errors.items() if v)
    hour = [(s, window.latency(_QUANTILE[s.key]) if window else None) for s in LATENCY]
    figures = (
        _figure(
            "requests",
            "Requests per minute, by kind",
            stacked_bars("requests", "requests / minute", window, REQUESTS, "no requests yet"),
            _legend((s.colour, s.label, f"{requests.get(s.key, 0):,}") for s in REQUESTS),
        ),
        _figure(
            "errors",
            "Errors per minute, by cause",
            stacked_bars("errors", "errors / minute", window, shown, "no errors"),
            _legend((s.colour, s.label, f"{errors[s.key]:,}") for s in shown)
            if shown
            else _legend([(None, "no 4xx or 5xx answers", "")]),
        ),
        _figure(
            "latency",
            'Upstream response time <span class="muted">(log scale)</span>',
            latency_lines(window),
            _legend(
                [
                    *((s.colour, s.label, "-" if q is None else _ms(q)) for s, q in hour),
                    (None, "responses", f"{window.responses() if window else 0:,}"),
                ]
            ),
        ),
    )
    return (
        '<section id="charts"><h2>Last hour <span class="muted">(per minute)</span></h2>'
        f'<div class="charts">{"".join(figures)}</div>'
        '<p class="facts">Totals in the legends cover the hour shown; the last bar is the '
        "current minute so far. Response times are interpolated within the histogram's "
        "buckets.</p></section>"
    )
