# -*- test-case-name: tests.admin.test_charts -*-
"""The last hour of traffic, per minute: what the status page's charts draw.

``History`` reads the monotonic counters of ``ProxyMetrics`` (``Counters``: requests by kind,
answers by status class, upstream failures by cause, the cumulative buckets of the upstream
response time histogram; with ``--workers`` added up over the processes, as the rest of the
page is) once a minute on the injected clock, and keeps the difference between two
readings as one ``Minute`` in a ring buffer of ``MINUTES`` (60) entries. Memory is bounded
by that: each minute holds three request counts, at most ten error counts and the twelve
bucket counts of the histogram (1.4 KB, measured with every error cause present), so the
hour stays under 100 KB whatever the traffic or the number of domains. The page also gets
the minute in progress (from the last reading to now), so a proxy shows its traffic the
moment it has some.

Per-minute response time quantiles come from the bucket deltas of the cumulative histogram
(``trackingproxy_upstream_response_seconds``), interpolated linearly within the bucket that
holds the rank, as Prometheus's ``histogram_quantile`` does: their precision is that of the
buckets (``LATENCY_BUCKETS``), and a quantile beyond the last finite bound reads as that bound.

A counter that goes down (the request slots are retired when ``--metrics-per-domain``
switches) counts as zero for that minute. ``counters_from`` is the one place that knows how
``ProxyMetrics`` keeps its numbers. Nothing here runs per request.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Final

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.admin.metrics import (
    ERROR_CAUSES,
    KINDS,
    LATENCY_BUCKETS,
    ProcessCounts,
    ProxyMetrics,
)
from trackingproxy.upstream.errors import UpstreamError

__all__ = [
    "ANSWER_CLASSES",
    "INTERVAL",
    "MINUTES",
    "OTHER_5XX",
    "Counters",
    "History",
    "Minute",
    "Window",
    "cause_status",
    "counters_from",
    "counters_of",
    "minute_between",
    "quantile",
]

MINUTES: Final = 60
INTERVAL: Final = 60.0
ANSWER_CLASSES: Final = ("4xx", "5xx")  # answers counted by status class
OTHER_5XX: Final = "other 5xx"  # 5xx answers no upstream failure explains (e.g. SparkPost's)


def _statuses() -> dict[str, int]:
    found: dict[str, int] = {}
    todo: list[type[UpstreamError]] = [UpstreamError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.cause, cls.status)
        todo.extend(cls.__subclasses__())
    return found


_STATUS_OF_CAUSE: Final = _statuses()
_BOUNDS: Final = (*LATENCY_BUCKETS, math.inf)
_log = Logger()


def cause_status(cause: str) -> int:
    """The status the proxy answers an upstream failure of ``cause`` with (502 by default:
    ``internal`` and any cause without a typed error)."""
    return _STATUS_OF_CAUSE.get(cause, 502)


@frozen
class Counters:
    """One reading of the process's monotonic counters.

    @ivar requests: requests answered, by kind (``open``, ``click``, ``other``).
    @ivar answers: requests answered, by status class (``4xx``, ``5xx``).
    @ivar failures: upstream requests that got no response, by cause.
    @ivar bounds: the upper bounds of the response time buckets (seconds, the last ``inf``).
    @ivar buckets: the cumulative count of responses in each bucket (same order).
    """

    requests: Mapping[str, int]
    answers: Mapping[str, int]
    failures: Mapping[str, int]
    bounds: tuple[float, ...]
    buckets: tuple[int, ...]


def counters_from(counts: ProcessCounts) -> Counters:
    """The ``Counters`` in ``counts`` (requests by kind and status class, failures by cause,
    the histogram made cumulative)."""
    requests = dict.fromkeys(KINDS, 0)
    answers = dict.fromkeys(ANSWER_CLASSES, 0)
    for retired in counts.retired.values():
        for kind, n in retired.items():
            requests[kind] = requests.get(kind, 0) + n
    for (_, _, kind, status, _), n in counts.requests.items():
        requests[kind] = requests.get(kind, 0) + n
        if status in answers:
            answers[status] += n
    return Counters(
        requests=requests,
        answers=answers,
        failures=dict(counts.upstream_errors),
        bounds=_BOUNDS,
        buckets=tuple(accumulate(counts.latency)),
    )


def counters_of(metrics: ProxyMetrics) -> Callable[[], Counters]:
    """A reader of ``metrics``'s counters: this process's and, with ``--workers``, the other
    processes' added up, as everywhere on the page (a few dozen slots: cheap)."""

    def read() -> Counters:
        return counters_from(metrics.total())

    return read


def quantile(q: float, bounds: Sequence[float], cumulative: Sequence[int]) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of a histogram given as cumulative bucket counts, in
    the unit of ``bounds``: linear within the bucket holding the rank (its lower bound is the
    previous bound, 0 for the first); the last finite bound when the rank is beyond it. None
    when the histogram is empty."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    below, lower = 0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    return lower


@frozen
class Minute:
    """What happened between two readings (``start``, ``end``: clock seconds).

    @ivar requests: requests answered, by kind.
    @ivar errors: error answers by cause, in the charts' order: ``4xx``, then each upstream
        failure cause seen, then ``OTHER_5XX`` (5xx answers beyond the upstream failures).
    @ivar bounds: the response time bucket bounds (seconds; shared, not copied).
    @ivar buckets: upstream responses per bucket in this minute (cumulative over buckets).
    @ivar partial: the minute in progress (from the last reading to now).
    """

    start: float
    end: float
    requests: Mapping[str, int]
    errors: Mapping[str, int]
    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    partial: bool = False

    @property
    def responses(self) -> int:
        """Upstream responses (with headers) in this minute."""
        return self.buckets[-1] if self.buckets else 0

    def latency(self, q: float) -> float | None:
        """The ``q`` quantile of the upstream response time in this minute (seconds)."""
        return quantile(q, self.bounds, self.buckets)


def _delta(after: Mapping[str, int], before: Mapping[str, int], key: str) -> int:
    return max(0, after.get(key, 0) - before.get(key, 0))


def minute_between(
    start: float, before: Counters, end: float, after: Counters, partial: bool = False
) -> Minute:
    """The ``Minute`` from reading ``before`` (at ``start``) to reading ``after`` (at ``end``)."""
    errors = {"4xx": _delta(after.answers, before.answers, "4xx")}
    failed = 0
    for cause in (*ERROR_CAUSES, *sorted(set(after.failures) - set(ERROR_CAUSES))):
        count = _delta(after.failures, before.failures, cause)
        if count:
            errors[cause] = count
            failed += count
    errors[OTHER_5XX] = max(0, _delta(after.answers, before.answers, "5xx") - failed)
    if after.bounds == before.bounds:
        buckets = tuple(max(0, a - b) for a, b in zip(after.buckets, before.buckets, strict=True))
    else:  # the histogram changed shape (never, in one process): no response times
        buckets = (0,) * len(after.bounds)
    return Minute(
        start=start,
        end=end,
        requests={k: _delta(after.requests, before.requests, k) for k in KINDS},
        errors=errors,
        bounds=after.bounds,
        buckets=buckets,
        partial=partial,
    )


def _add(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in counts:
        for key, n in mapping.items():
            total[key] = total.get(key, 0) + n
    return total


@frozen
class Window:
    """What the charts draw: the recorded minutes, oldest first, and the minute in progress
    last (``partial``); the charts span ``start`` to ``end`` (the end of the minute in
    progress), ``interval`` seconds a minute."""

    minutes: tuple[Minute, ...]
    start: float
    end: float
    interval: float

    def requests(self) -> dict[str, int]:
        """Requests answered in the window, by kind."""
        return _add(m.requests for m in self.minutes)

    def errors(self) -> dict[str, int]:
        """Error answers in the window, by cause (as in ``Minute.errors``)."""
        return _add(m.errors for m in self.minutes)

    def responses(self) -> int:
        """Upstream responses in the window."""
        return sum(m.responses for m in self.minutes)

    def latency(self, q: float) -> float | None:
        """The ``q`` quantile of the upstream response time over the window (seconds), from
        the bucket counts of its minutes added up."""
        if not self.minutes:
            return None
        bounds = self.minutes[-1].bounds
        summed = [0] * len(bounds)
        for m in self.minutes:
            if m.bounds == bounds:
                summed = [a + b for a, b in zip(summed, m.buckets, strict=True)]
        return quantile(q, bounds, summed)


class History:
    """A ring buffer of the last ``minutes`` minutes, filled by reading ``read`` every
    ``interval`` seconds of ``clock``.

    @ivar interval: seconds between readings.
    """

    def __init__(
        self,
        clock: IReactorTime,
        read: Callable[[], Counters],
        *,
        minutes: int = MINUTES,
        interval: float = INTERVAL,
    ) -> None:
        self._clock = clock
        self._read = read
        self.interval = interval
        self._minutes: deque[Minute] = deque(maxlen=minutes)
        self._last: tuple[float, Counters] | None = None  # the last reading and its time
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        """Read now (unless already read) and every ``interval`` seconds; idempotent."""
        if not self._loop.running:
            done = self._loop.start(self.interval, now=self._last is None)
            done.addErrback(self._failed)

    @staticmethod
    def _failed(reason: Failure) -> None:
        _log.failure("The status page's history stopped reading the counters", reason)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> None:
        """Read the counters; record the minute since the last reading (if time passed)."""
        now = self._clock.seconds()
        if self._last is not None and now <= self._last[0]:
            return
        counters = self._read()
        if self._last is not None:
            self._minutes.append(minute_between(*self._last, now, counters))
        self._last = (now, counters)

    def minutes(self) -> list[Minute]:
        """The recorded minutes, oldest first (at most ``minutes``)."""
        return list(self._minutes)

    def window(self) -> Window | None:
        """The recorded minutes and the one in progress; None before the first reading."""
        if self._last is None:
            return None
        since, last = self._last
        now = max(self._clock.seconds(), since)
        current = minute_between(since, last, now, self._read(), partial=True)
        end = since + self.interval
        span = ((self._minutes.maxlen or 0) + 1) * self.interval
        return Window(
            minutes=(*self._minutes, current), start=end - span, end=end, interval=self.interval
        )
