"""``--workers``: the other processes' counters, reported to the twistd process and added up.

Design: every worker keeps its own ``ProxyMetrics`` (a hot path identical to the parent's) and,
every ``REPORT_INTERVAL`` second, writes all of its counts as one JSON line to a pipe the
parent reads (``MetricsReporter``; the pipe is fd 4, next to the control pipe, see
``trackingproxy.ops.supervisor``). The parent keeps the last report of each worker
(``WorkerMetrics``) and its ``ProxyMetrics`` adds them to its own counts at every scrape,
``/status`` read and page view, so every exported series, the page's totals and its rates
count every process. ``trackingproxy_process_*`` series and ``/status``'s ``processes`` break
them down by process (``main`` is the twistd process, ``worker-1`` ... the others).

Why a pipe of whole totals rather than prometheus_client's multiprocess mode: that mode needs
an environment variable before the first import, a directory of mmap files that must be
cleaned between runs, has no way to carry the custom request collector (its series are built
from our slots, with or without the domain label) nor the status page's numbers, and its
gauges of dead processes need their own clean-up. Totals rather than increments make a report
idempotent: a report the worker could not write at once is replaced by the next one, none can
be counted twice, and a dead worker's counts are simply its last report.

Bounds: the parent's numbers lag by at most a report interval (1 s) plus the pipe; a worker
killed outright loses what it counted since its last report (a graceful stop sends one last
report after its drain). A report is a few kB (one entry per label combination: with
``--metrics-per-domain`` at most 99 domains x kinds x status classes x protocols x schemes).
When a worker ends, its last counters (not its gauges) are kept in the parent, so totals and
``rate()`` never go backwards while the restarted worker counts from zero again.
"""

# -*- test-case-name: tests.ops.test_worker_metrics -*-

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

from attrs import define
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from trackingproxy.admin.metrics import (
    ERROR_CAUSES,
    KINDS,
    LATENCY_BUCKETS,
    MetricHooks,
    ProcessCounts,
    ProxyMetrics,
    add_up,
)
from trackingproxy.admin.status import CertificateSource, ClusterFacts

__all__ = [
    "REPORT_INTERVAL",
    "STALE_AFTER",
    "MetricsReporter",
    "WorkerAdmin",
    "WorkerMetrics",
    "decode",
    "encode",
    "worker_admin",
]

log = Logger(namespace="trackingproxy.admin.workers")

REPORT_INTERVAL: Final = 1.0  # seconds between a worker's reports
STALE_AFTER: Final = 5.0  # a worker whose last report is older counts as down (process_up 0)
MAIN: Final = "main"


# -- the wire format --------------------------------------------------------------------------
def encode(counts: ProcessCounts) -> bytes:
    """One report line (JSON, newline-terminated)."""
    data = {
        "requests": [[*key, n] for key, n in counts.requests.items()],
        "retired": counts.retired,
        "upstream_requests": counts.upstream_requests,
        "upstream_errors": counts.upstream_errors,
        "latency": counts.latency,
        "latency_sum": counts.latency_sum,
        "connections": counts.connections,
        "in_flight": counts.in_flight,
    }
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _counts(value: Any, keys: Collection[str] | None = None) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError(f"not a mapping: {value!r}")
    if keys is not None and not set(value) <= set(keys):
        raise ValueError(f"unknown names: {sorted(set(value) - set(keys))}")
    return {str(k): _count(v) for k, v in value.items()}


def decode(line: bytes) -> ProcessCounts:
    """A report line back into counts; ValueError (with what is wrong) for anything else."""
    try:
        data = json.loads(line)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        requests = {}
        for entry in data["requests"]:
            *key, n = entry
            if len(key) != 5 or not all(isinstance(k, str) for k in key) or key[2] not in KINDS:
                raise ValueError(f"bad request entry: {entry!r}")
            requests[(key[0], key[1], key[2], key[3], key[4])] = _count(n)
        latency = tuple(_count(n) for n in data["latency"])
        if len(latency) != len(LATENCY_BUCKETS) + 1:
            raise ValueError("wrong number of latency buckets")
        seconds = data["latency_sum"]
        if not isinstance(seconds, int | float):
            raise ValueError(f"bad latency_sum: {seconds!r}")
        return ProcessCounts(
            requests=requests,
            retired={str(g): _counts(kinds, KINDS) for g, kinds in data["retired"].items()},
            upstream_requests=_count(data["upstream_requests"]),
            upstream_errors=_counts(data["upstream_errors"], ERROR_CAUSES),
            latency=latency,
            latency_sum=float(seconds),
            connections=_counts(data["connections"]),
            in_flight=_count(data["in_flight"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"missing or malformed field ({e!r})") from None


# -- the parent: every worker's last report -----------------------------------------------------
@define
class _Live:
    pid: int | None
    counts: ProcessCounts
    at: float  # when it arrived (clock seconds)


class WorkerMetrics:
    """The parent's view of the workers' counts (``WorkerReports`` of the worker pool).

    @ivar count: the number of processes, the parent included (``--workers``).
    """

    def __init__(
        self, clock: IReactorTime, metrics: ProxyMetrics, count: int, pid: int | None = None
    ) -> None:
        self.count = count
        self._clock = clock
        self._metrics = metrics
        self._pid = pid
        self._live: dict[int, _Live] = {}  # worker index -> its last report
        self._ended: dict[int, ProcessCounts] = {}  # index -> counters of its ended processes
        self._complained: set[tuple[int, int | None]] = set()
        metrics.others = self.others
        metrics.registry.register(_ProcessCollector(self))

    # -- from the worker pool -------------------------------------------------------------
    def report(self, index: int, pid: int | None, line: bytes) -> None:
        """A report line from worker ``index``; an unreadable one is logged once per process."""
        try:
            counts = decode(line)
        except ValueError as e:
            if (index, pid) not in self._complained:
                self._complained.add((index, pid))
                log.warn("worker {index} (pid {pid}): unreadable metrics report ignored: "
                         "{error}", index=index, pid=pid, error=str(e))
            return
        self._live[index] = _Live(pid, counts, self._clock.seconds())

    def worker_ended(self, index: int) -> None:
        """Worker ``index`` exited: keep its counters (not its gauges) for good."""
        live = self._live.pop(index, None)
        if live is not None:
            self._ended[index] = add_up([self._ended.get(index, ProcessCounts()), live.counts],
                                        gauges=False)

    # -- for ProxyMetrics and the admin endpoints ---------------------------------------
    def others(self) -> list[ProcessCounts]:
        """What the workers counted: the running ones' last reports and the ended ones'."""
        return [*(live.counts for live in self._live.values()), *self._ended.values()]

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per process: requests answered (ever, restarts included), in
        flight and open connections now, and whether it reports (``up``)."""
        now = self._clock.seconds()
        main = self._metrics.counts()
        rows = [_row(MAIN, self._pid, True, None, main, main)]
        for index in range(1, self.count):
            live = self._live.get(index)
            ended = self._ended.get(index, ProcessCounts())
            if live is None:
                rows.append(_row(f"worker-{index}", None, False, None, ended, ProcessCounts()))
                continue
            age = max(0.0, now - live.at)
            both = add_up([ended, live.counts], gauges=False)
            rows.append(_row(f"worker-{index}", live.pid, age <= STALE_AFTER, age, both,
                             live.counts))
        return rows


def _row(
    name: str, pid: int | None, up: bool, age: float | None, counters: ProcessCounts,
    gauges: ProcessCounts,
) -> dict[str, Any]:
    return {
        "process": name,
        "pid": pid,
        "up": up,
        "report_age_seconds": None if age is None else round(age, 3),
        "requests": counters.requests_total(),
        "in_flight": gauges.in_flight,
        "connections": dict(gauges.connections),
    }


class _ProcessCollector(Collector):
    """``trackingproxy_process_*``: a few key series per process."""

    def __init__(self, workers: WorkerMetrics) -> None:
        self._workers = workers

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._workers.rows())

    @staticmethod
    def _families(rows: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ("process",)
        requests = CounterMetricFamily(
            "trackingproxy_process_requests",
            "Requests answered by each process (main: the twistd process; a restarted worker "
            "carries on from the totals of the one before).", labels=labels)
        in_flight = GaugeMetricFamily(
            "trackingproxy_process_requests_in_flight",
            "Requests accepted and not yet finished, by process (as of its last report).",
            labels=labels)
        connections = GaugeMetricFamily(
            "trackingproxy_process_open_connections",
            "Client connections open, by process (as of its last report).", labels=labels)
        up = GaugeMetricFamily(
            "trackingproxy_process_up",
            f"1 while the process reports its metrics (at most {STALE_AFTER:g} s ago), else 0.",
            labels=labels)
        for row in rows:
            key = (row["process"],)
            requests.add_metric(key, float(row["requests"]))
            in_flight.add_metric(key, float(row["in_flight"]))
            connections.add_metric(key, float(sum(row["connections"].values())))
            up.add_metric(key, 1.0 if row["up"] else 0.0)
        yield from (requests, in_flight, connections, up)


# -- a worker: count as the parent does, report instead of listening --------------------------
class MetricsReporter(Service):
    """Sends this worker's counts every ``interval`` seconds, and once more when stopped
    (after the drain: the service tree stops it last)."""

    name = "metrics-reporter"

    def __init__(
        self,
        clock: IReactorTime,
        metrics: ProxyMetrics,
        send: Callable[[bytes], None],
        interval: float = REPORT_INTERVAL,
    ) -> None:
        self._metrics = metrics
        self._send = send
        self._interval = interval
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        done = self._loop.start(self._interval, now=True)
        done.addErrback(lambda f: log.failure("metrics reports stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.report()

    def report(self) -> None:
        self._metrics.refresh_per_domain()  # switch with the parent after a reload
        self._send(encode(self._metrics.counts()))


class WorkerAdmin(MetricHooks):
    """A worker's admin parts (``AdminParts``): the same hooks as the parent's ``Admin``, and
    a ``MetricsReporter`` where the parent has its admin listener."""

    def __init__(
        self, clock: IReactorTime, metrics: ProxyMetrics, send: Callable[[bytes], None]
    ) -> None:
        super().__init__(clock, metrics)
        self._send = send

    def service(
        self,
        root: MultiService,
        certificates: CertificateSource,
        https_enabled: bool,
        acme_issuer: object | None,
        cluster: ClusterFacts | None = None,
    ) -> MetricsReporter:
        active = getattr(root, "active", None)
        if active is not None:
            self.metrics.local_in_flight = lambda: int(active.count)
        return MetricsReporter(self.clock, self.metrics, self._send)


def worker_admin(
    send: Callable[[bytes], None],
) -> Callable[[str | None, IReactorTime, Callable[[], Collection[str]], str], WorkerAdmin | None]:
    """``build_admin`` for a worker: its reports go to ``send``; None when the parent has no
    admin listener (then no process keeps metrics)."""

    def build(
        endpoint: str | None,
        clock: IReactorTime,
        domains: Callable[[], Collection[str]],
        metrics_per_domain: str = "auto",
    ) -> WorkerAdmin | None:
        if endpoint is None:
            return None
        metrics = ProxyMetrics(domains, per_domain=metrics_per_domain, process_metrics=False)
        return WorkerAdmin(clock, metrics, send)

    return build
