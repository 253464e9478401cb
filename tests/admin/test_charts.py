"""The status page's last hour: the per-minute ring buffer on a fake clock, the deltas and
response time quantiles it keeps, the inline SVG charts drawn from it (well-formed XML, values
at the right coordinates, escaped, empty states) and their wiring into the admin site."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.admin.fakes import FakeRequest, unbalanced_tags
from tests.admin.test_status import StatusTestCase
from trackingproxy.admin import charts
from trackingproxy.admin.charts import LATENCY, PLOT, REQUESTS, Frame, decades, nice_top
from trackingproxy.admin.history import (
    INTERVAL,
    MINUTES,
    OTHER_5XX,
    Counters,
    History,
    Minute,
    Window,
    counters_of,
    minute_between,
    quantile,
)
from trackingproxy.admin.metrics import LATENCY_BUCKETS, ProxyMetrics
from trackingproxy.admin.page import render_page
from trackingproxy.admin.resources import AdminSite, admin_resource

SVG = "{http://www.w3.org/2000/svg}"
BOUNDS = (0.1, 0.2, float("inf"))
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def reading(
    open: int = 0,
    click: int = 0,
    other: int = 0,
    c4: int = 0,
    c5: int = 0,
    failures: Mapping[str, int] | None = None,
    buckets: tuple[int, ...] = (0, 0, 0),
) -> Counters:
    """A reading of the counters (histogram ``BOUNDS``, cumulative ``buckets``)."""
    return Counters(
        requests={"open": open, "click": click, "other": other},
        answers={"4xx": c4, "5xx": c5},
        failures=dict(failures or {}),
        bounds=BOUNDS,
        buckets=buckets,
    )


class Counting:
    """A reader whose counters the test sets (``now``)."""

    def __init__(self) -> None:
        self.now = reading()
        self.reads = 0

    def __call__(self) -> Counters:
        self.reads += 1
        return self.now


def minute(
    start: float,
    requests: Mapping[str, int] | None = None,
    errors: Mapping[str, int] | None = None,
    buckets: tuple[int, ...] = (0, 0, 0),
    partial: bool = False,
) -> Minute:
    return Minute(
        start=start,
        end=start + 60,
        requests={"open": 0, "click": 0, "other": 0, **(requests or {})},
        errors={"4xx": 0, OTHER_5XX: 0, **(errors or {})},
        bounds=BOUNDS,
        buckets=buckets,
        partial=partial,
    )


def window(*minutes: Minute) -> Window:
    """The window ending with the minute after the last of ``minutes``."""
    end = minutes[-1].start + 60
    return Window(minutes=minutes, start=end - 61 * 60, end=end, interval=60.0)


def svgs(html: str) -> dict[str, ET.Element]:
    """Every ``<svg>`` of ``html`` parsed as XML, by id."""
    found = re.findall(r"<svg\b.*?</svg>", html, re.S)
    parsed = [ET.fromstring(svg) for svg in found]
    return {e.get("id", ""): e for e in parsed}


def bars(svg: ET.Element) -> list[ET.Element]:
    return list(svg.iter(f"{SVG}rect"))


class HistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.read = Counting()
        self.history = History(self.clock, self.read)

    def test_start_reads_at_once_then_every_minute(self) -> None:
        """Starting reads the counters; a minute later the difference is one recorded minute."""
        self.history.start()
        self.assertEqual((self.read.reads, self.history.minutes()), (1, []))
        self.read.now = reading(open=5, click=2)
        self.clock.advance(INTERVAL)
        [first] = self.history.minutes()
        self.assertEqual((first.start, first.end), (T0, T0 + 60))
        self.assertEqual(first.requests, {"open": 5, "click": 2, "other": 0})
        self.assertFalse(first.partial)

    def test_ring_buffer_keeps_the_last_sixty_minutes(self) -> None:
        """After 100 minutes only the last 60 are kept, oldest first."""
        self.history.start()
        for n in range(100):
            self.read.now = reading(open=n + 1)
            self.clock.advance(INTERVAL)
        minutes = self.history.minutes()
        self.assertEqual(len(minutes), MINUTES)
        self.assertEqual(minutes[0].start, T0 + 40 * 60)
        self.assertEqual(minutes[-1].end, T0 + 100 * 60)
        self.assertEqual({m.requests["open"] for m in minutes}, {1})

    def test_stop_ends_the_readings(self) -> None:
        """Stopped, the history reads nothing more; stopping twice is harmless."""
        self.history.start()
        self.history.stop()
        self.history.stop()
        self.clock.advance(10 * INTERVAL)
        self.assertEqual((self.read.reads, self.history.running), (1, False))

    def test_restart_does_not_read_twice_at_once(self) -> None:
        """Starting again (or twice) reads on the next interval: no empty zero-length minute."""
        self.history.start()
        self.history.start()
        self.history.stop()
        self.clock.advance(150)
        self.history.start()
        self.assertEqual(self.read.reads, 1)
        self.clock.advance(INTERVAL)
        [gap] = self.history.minutes()
        self.assertEqual((gap.start, gap.end), (T0, T0 + 210))

    def test_a_failing_reader_is_logged(self) -> None:
        """A reader that raises stops the readings and the failure is logged, not lost."""
        self.history.start()

        def broken() -> Counters:
            raise RuntimeError("no counters")

        self.history._read = broken
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.history.running)

    def test_no_reading_without_time_passing(self) -> None:
        """A reading at the time of the last one records nothing."""
        self.history.sample()
        self.history.sample()
        self.assertEqual((self.read.reads, self.history.minutes()), (1, []))

    def test_window_before_any_reading_is_none(self) -> None:
        """Nothing read yet: no window (the charts say "no data yet")."""
        self.assertIsNone(self.history.window())

    def test_window_ends_with_the_minute_in_progress(self) -> None:
        """The window holds the recorded minutes and the current one so far, and spans 61."""
        self.history.start()
        self.read.now = reading(open=3)
        self.clock.advance(INTERVAL)
        self.read.now = reading(open=4, click=1)
        self.clock.advance(25)
        w = self.history.window()
        assert w is not None
        self.assertEqual(len(w.minutes), 2)
        current = w.minutes[-1]
        self.assertTrue(current.partial)
        self.assertEqual((current.start, current.end), (T0 + 60, T0 + 85))
        self.assertEqual(current.requests, {"open": 1, "click": 1, "other": 0})
        self.assertEqual((w.end, w.end - w.start), (T0 + 120, 61 * 60))


class DeltaTests(SynchronousTestCase):
    def test_deltas_by_kind_and_cause(self) -> None:
        """A minute holds the increases by kind, 4xx, causes, and the 5xx no failure explains."""
        before = reading(open=10, c4=1, c5=2, failures={"timeout": 1})
        after = reading(
            open=15, click=4, c4=3, c5=9, failures={"timeout": 3, "connect": 1, "dns": 0}
        )
        m = minute_between(0.0, before, 60.0, after)
        self.assertEqual(m.requests, {"open": 5, "click": 4, "other": 0})
        self.assertEqual(m.errors, {"4xx": 2, "connect": 1, "timeout": 2, OTHER_5XX: 4})

    def test_a_counter_going_down_counts_zero(self) -> None:
        """Counts that shrink (slots retired by a per-domain switch) are zero, not negative."""
        m = minute_between(0.0, reading(open=9, c4=5, buckets=(3, 3, 3)), 60.0, reading(open=2))
        self.assertEqual((m.requests["open"], m.errors["4xx"], m.buckets), (0, 0, (0, 0, 0)))

    def test_counters_of_the_proxy_metrics(self) -> None:
        """The reader sums slots by kind and status class and makes the histogram cumulative."""
        metrics = ProxyMetrics(lambda: {"a.example.com"}, process_metrics=False)
        site = metrics.site("https")
        for uri, code in ((b"/q/1", 200), (b"/q/2", 200), (b"/f/1", 504), (b"/x", 404)):
            site.request_done(FakeRequest(uri, code, "a.example.com"))
        metrics.upstream_error("timeout")
        for seconds in (0.005, 0.03, 0.03, 100.0):
            metrics.upstream_latency.observe(seconds)
        counters = counters_of(metrics)()
        self.assertEqual(counters.requests, {"open": 2, "click": 1, "other": 1})
        self.assertEqual(counters.answers, {"4xx": 1, "5xx": 1})
        self.assertEqual(counters.failures["timeout"], 1)
        self.assertEqual(counters.bounds, (*LATENCY_BUCKETS, float("inf")))
        self.assertEqual(counters.buckets, (1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4))


class QuantileTests(SynchronousTestCase):
    def test_interpolates_within_the_bucket(self) -> None:
        """Ten responses in 0.1-0.2 s: p50 is 0.15 s, p99 0.199 s."""
        self.assertAlmostEqual(quantile(0.5, BOUNDS, (0, 10, 10)) or 0, 0.15)
        self.assertAlmostEqual(quantile(0.99, BOUNDS, (0, 10, 10)) or 0, 0.199)

    def test_the_first_bucket_starts_at_zero(self) -> None:
        """Four responses under 0.1 s: the median is 0.05 s."""
        self.assertAlmostEqual(quantile(0.5, BOUNDS, (4, 4, 4)) or 0, 0.05)

    def test_beyond_the_last_bound_is_that_bound(self) -> None:
        """Responses slower than every finite bound read as the last finite bound."""
        self.assertEqual(quantile(0.99, BOUNDS, (0, 0, 5)), 0.2)

    def test_no_responses_no_quantile(self) -> None:
        """An empty histogram has no quantile."""
        self.assertIsNone(quantile(0.5, BOUNDS, (0, 0, 0)))

    def test_each_minute_has_its_own_quantiles(self) -> None:
        """After a slow minute, a fast one's p99 comes from its own bucket deltas only."""
        clock = Clock()
        metrics = ProxyMetrics(set, process_metrics=False)
        history = History(clock, counters_of(metrics))
        history.start()
        for seconds in (3.0, 0.03):
            for _ in range(100):
                metrics.upstream_latency.observe(seconds)
            clock.advance(INTERVAL)
        slow, fast = history.minutes()
        self.assertEqual((slow.responses, fast.responses), (100, 100))
        self.assertTrue(2.5 < (slow.latency(0.99) or 0) <= 5.0)
        self.assertTrue(0.025 < (fast.latency(0.99) or 0) <= 0.05)


class ChartTests(SynchronousTestCase):
    def test_svgs_are_well_formed_xml(self) -> None:
        """Every chart of a busy hour parses as XML: an SVG root with a title and a view box."""
        hour = [
            minute(
                T0 + 60 * n,
                {"open": n, "click": 2},
                {"4xx": 1, "timeout": n % 3},
                (n, 2 * n, 2 * n),
            )
            for n in range(60)
        ]
        found = svgs(charts.render_charts(window(*hour)))
        self.assertEqual(sorted(found), ["chart-errors", "chart-latency", "chart-requests"])
        for svg in found.values():
            self.assertEqual(svg.tag, f"{SVG}svg")
            self.assertEqual(svg.get("viewBox"), "0 0 320 180")
            self.assertIsNotNone(svg.find(f"{SVG}title"))

    def test_stacked_bars_map_counts_to_coordinates(self) -> None:
        """30 opens + 10 clicks on a 40 axis: opens fill 3/4, clicks the rest, at the minute."""
        m = minute(T0, {"open": 30, "click": 10})
        w = window(m)
        rects = bars(svgs(charts.render_charts(w))["chart-requests"])
        opens = [r for r in rects if r.get("fill") == REQUESTS[0].colour]
        clicks = [r for r in rects if r.get("fill") == REQUESTS[1].colour]
        self.assertEqual((len(opens), len(clicks)), (1, 1))
        frame = Frame(w.start, w.end, nice_top(40))
        self.assertEqual(frame.top, 40)
        self.assertAlmostEqual(float(opens[0].get("height")), 0.75 * PLOT.height, places=0)
        self.assertAlmostEqual(float(opens[0].get("y")), PLOT.bottom - 0.75 * PLOT.height, 0)
        self.assertAlmostEqual(float(clicks[0].get("y")), PLOT.top, places=0)
        self.assertAlmostEqual(float(opens[0].get("x")), frame.x(T0) + 0.4, places=1)

    def test_time_axis_has_a_tick_every_ten_minutes(self) -> None:
        """The time axis is labelled in UTC at each whole ten minutes of the window."""
        svg = svgs(charts.render_charts(window(minute(T0 + 3000))))["chart-requests"]  # 07:50-08:51
        texts = [t.text for t in svg.iter(f"{SVG}text")]
        self.assertEqual(
            [t for t in texts if t and re.fullmatch(r"\d\d:\d\d", t)],
            ["07:50", "08:00", "08:10", "08:20", "08:30", "08:40", "08:50"],
        )
        self.assertIn("time (UTC)", texts)
        self.assertIn("requests / minute", texts)

    def test_latency_lines_on_a_log_scale(self) -> None:
        """p50 and p99 per minute are lines on a log scale of powers of ten (in ms)."""
        fast = (0, 10, 10)  # p50 150 ms, p99 199 ms
        m1, m2 = minute(T0, buckets=fast), minute(T0 + 60, buckets=fast)
        svg = svgs(charts.render_charts(window(m1, m2)))["chart-latency"]
        lines = list(svg.iter(f"{SVG}polyline"))
        self.assertEqual([p.get("stroke") for p in lines], [s.colour for s in LATENCY])
        low, top = decades(150, 199)
        self.assertEqual((low, top), (100, 10_000))  # two decades at least
        frame = Frame(0, 1, top, low, log=True)
        y50 = float(lines[0].get("points", "").split()[0].split(",")[1])
        self.assertAlmostEqual(y50, frame.y(150), places=0)
        self.assertAlmostEqual(frame.y(100), PLOT.bottom)
        texts = [t.text for t in svg.iter(f"{SVG}text")]
        self.assertIn("100 ms", texts)
        self.assertIn("10 s", texts)

    def test_error_series_order_labels_and_colours(self) -> None:
        """Errors stack as 4xx, the known causes with their status, unknown ones, other 5xx."""
        found = charts.error_series([OTHER_5XX, "zz", "timeout", "4xx", "connect", "busy"])
        self.assertEqual(
            [s.label for s in found],
            ["4xx answers", "502 upstream connect", "504 upstream timeout", "503 upstream busy",
             "502 upstream zz", OTHER_5XX],
        )  # fmt: skip
        self.assertEqual(len({s.colour for s in found}), len(found))

    def test_nice_axis_tops(self) -> None:
        """The value axis tops at four round steps of at least 1."""
        self.assertEqual(
            [nice_top(v) for v in (0, 3, 5, 40, 41, 90, 170, 1234)],
            [4, 4, 8, 40, 80, 100, 200, 2000],
        )

    def test_empty_states(self) -> None:
        """No reading yet: "no data yet" in each chart; a quiet hour says what is missing."""
        nothing = charts.render_charts(None)
        self.assertEqual(nothing.count(">no data yet<"), 3)
        self.assertEqual(len(svgs(nothing)), 3)
        quiet = charts.render_charts(window(minute(T0)))
        for text in ("no requests yet", "no errors", "no upstream responses yet"):
            self.assertIn(text, quiet)

    def test_text_is_escaped(self) -> None:
        """A cause name with markup is escaped in the drawing and the legend."""
        cause = '<img src=x onerror="alert(1)">&'
        html = charts.render_charts(window(minute(T0, errors={cause: 2})))
        self.assertNotIn("<img", html)
        self.assertIn("502 upstream &lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;", html)
        svgs(html)  # still well-formed

    def test_the_minute_in_progress_is_pale(self) -> None:
        """The last bar, the current minute so far, is drawn at half opacity."""
        w = window(minute(T0, {"open": 4}), minute(T0 + 60, {"open": 1}, partial=True))
        svg = svgs(charts.render_charts(w))["chart-requests"]
        groups = [g for g in svg.iter(f"{SVG}g") if g.find(f"{SVG}title") is not None]
        self.assertEqual([g.get("fill-opacity") for g in groups], [None, "0.5"])
        self.assertIn("(so far)", groups[1].findtext(f"{SVG}title") or "")

    def test_colours_contrast_with_the_background(self) -> None:
        """Every series colour has at least 3:1 contrast against white."""

        def luminance(colour: str) -> float:
            channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
            linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
            return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

        colours = [s.colour for s in (*REQUESTS, *LATENCY)] + list(charts.ERROR_COLOURS.values())
        for colour in colours:
            self.assertGreaterEqual(1.05 / (luminance(colour) + 0.05), 3.0, colour)

    def test_an_hour_renders_fast_and_small(self) -> None:
        """A busy hour renders in under 50 ms and 50 KB (nothing grows with the domains)."""
        hour = [
            minute(
                T0 + 60 * n,
                {"open": 50 + n, "click": 20, "other": 1},
                {"4xx": 2, "timeout": n % 2, OTHER_5XX: 1},
                (n, 3 * n, 3 * n + 1),
            )
            for n in range(60)
        ]
        w = window(*hour, minute(T0 + 3600, {"open": 3}, partial=True))
        started = time.perf_counter()
        html = charts.render_charts(w)
        self.assertLess(time.perf_counter() - started, 0.05)
        self.assertLess(len(html.encode()), 50_000)


class PageTests(StatusTestCase):
    def test_the_page_shows_the_charts_after_the_requests(self) -> None:
        """The charts sit between the request rates and the domains; the HTML stays balanced."""
        page = render_page(self.source().snapshot(), window(minute(T0, {"open": 2}))).decode()
        self.assertEqual(unbalanced_tags(page), [])
        order = [page.index(s) for s in ('id="requests"', 'id="charts"', 'id="domains"')]
        self.assertEqual(order, sorted(order))
        self.assertEqual(len(svgs(page)), 3)

    def test_the_admin_site_keeps_the_history(self) -> None:
        """The admin site runs a history on its clock while it listens; the page draws it."""
        source = self.source()
        site = AdminSite(admin_resource(source, self.metrics.registry), self.clock)
        assert site.history is not None
        site.doStart()
        self.assertTrue(site.history.running)
        self.metrics.site("https").request_done(FakeRequest(b"/q/1", 200, "a.example.com"))
        self.clock.advance(INTERVAL)
        [recorded] = site.history.minutes()
        self.assertEqual(recorded.requests["open"], 1)
        client = StubTreq(site.resource)
        response = self.successResultOf(client.get("http://admin.invalid/"))
        body = self.successResultOf(response.content()).decode()
        self.assertIn("UTC: opens (/q/) 1</title>", body)
        site.doStop()
        self.assertFalse(site.history.running)
