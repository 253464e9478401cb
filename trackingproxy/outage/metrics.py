# -*- test-case-name: tests.outage.test_integration -*-
"""Outage mode's Prometheus metrics, computed at scrape time from its counters and state
(register `OutageCollector` with the admin registry). Labels hold only fixed words."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trackingproxy.outage.counters import OutageCounters

__all__ = ["OutageCollector"]


class OutageCollector(Collector):
    """The counters of `OutageCounters` plus the journal's and the links' sizes."""

    def __init__(
        self,
        counters: OutageCounters,
        entries: Callable[[], int],
        file_bytes: Callable[[], int],
        links: Callable[[], int],
        down: Callable[[], bool],
    ) -> None:
        self._counters = counters
        self._entries = entries
        self._file_bytes = file_bytes
        self._links = links
        self._down = down

    def describe(self) -> list[Metric]:
        return []  # collect() only runs on scrapes

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        answers = CounterMetricFamily(
            "trackingproxy_outage_local_answers",
            "Answers given without the upstream while it could not be reached, by kind "
            "(open: the pixel; remembered_click: a learned redirect; unavailable: 503).",
            labels=("kind",),
        )
        for kind, count in c.local_answers.items():
            answers.add_metric((kind,), float(count))
        yield answers
        yield CounterMetricFamily(
            "trackingproxy_outage_journaled",
            "Requests that provably never reached the upstream, journaled for one re-send.",
            value=float(c.journaled),
        )
        yield CounterMetricFamily(
            "trackingproxy_outage_repeats",
            "Requests not journaled: the same one was journaled less than 10 s before.",
            value=float(c.repeats),
        )
        yield CounterMetricFamily(
            "trackingproxy_outage_replayed",
            "Journaled requests re-sent and answered by the upstream.",
            value=float(c.replayed),
        )
        dropped = CounterMetricFamily(
            "trackingproxy_outage_dropped",
            "Journaled requests given up, by reason (ttl: expired; size: journal full; "
            "crash: maybe sent when the process stopped, or behind a damaged record).",
            labels=("reason",),
        )
        for reason, count in c.dropped.items():
            dropped.add_metric((reason,), float(count))
        yield dropped
        yield CounterMetricFamily(
            "trackingproxy_engagement_ambiguous",
            "Opens and clicks sent upstream that got no answer (timeout or reset after the "
            "request was written): maybe counted by SparkPost, never re-sent.",
            value=float(c.ambiguous),
        )
        yield CounterMetricFamily(
            "trackingproxy_outage_journal_write_errors",
            "Failed writes of the journal file.",
            value=float(c.write_errors),
        )
        yield GaugeMetricFamily(
            "trackingproxy_outage_journal_entries",
            "Requests waiting in the journal to be re-sent.",
            value=float(self._entries()),
        )
        yield GaugeMetricFamily(
            "trackingproxy_outage_journal_bytes",
            "Size of the journal file.",
            value=float(self._file_bytes()),
        )
        yield GaugeMetricFamily(
            "trackingproxy_outage_remembered_links",
            "Click redirects remembered for answering during an outage.",
            value=float(self._links()),
        )
        yield GaugeMetricFamily(
            "trackingproxy_outage_upstream_down",
            "1 while the upstream is seen failing and has not answered since.",
            value=1.0 if self._down() else 0.0,
        )
