"""Certificate, renewal and readiness metrics, computed at scrape time from ``StatusSource``.

Neither Caddy nor nginx exports certificate expiry; here every configured domain has its
certificate's validity as epoch seconds, and every ACME-managed domain the seconds to its next
order (whole seconds; not while an order runs). What is only worth a series while it says
something is exported only then, so 10,000 domains stay a scrape of a few MB: ACME orders per
outcome that happened (no zero counters), consecutive failures while there are any, the last
renewal error while failing. Certificate facts come cached from ``StatusSource.domains``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trackingproxy.admin.status import StatusSource

__all__ = ["ERROR_LABEL_LIMIT", "OUTCOMES", "StatusCollector"]

ERROR_LABEL_LIMIT = 200  # characters of the error message kept in the ``error`` label
OUTCOMES = ("issued", "failed", "rate_limited", "busy")


class StatusCollector(Collector):
    """A prometheus_client collector over the live status (register it with the registry)."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # names are not checked for duplicates; collect() is only run on scrapes

    def collect(self) -> Iterator[Metric]:
        source = self._source
        now = source.now().timestamp()
        domains = source.domains()
        ready, _ = source.ready(domains)
        yield GaugeMetricFamily(
            "trackingproxy_ready",
            "1 when every listener is up and every domain has a valid certificate (/readyz).",
            value=1.0 if ready else 0.0,
        )
        info = GaugeMetricFamily(
            "trackingproxy_certificate_info",
            "The certificate served for a domain (always 1), with its issuer and serial.",
            labels=("domain", "issuer", "serial", "source"),
        )
        not_before = GaugeMetricFamily(
            "trackingproxy_certificate_not_before_timestamp_seconds",
            "Start of the served certificate's validity (seconds since the epoch).",
            labels=("domain",),
        )
        not_after = GaugeMetricFamily(
            "trackingproxy_certificate_not_after_timestamp_seconds",
            "End of the served certificate's validity (seconds since the epoch).",
            labels=("domain",),
        )
        present = GaugeMetricFamily(
            "trackingproxy_certificate_present",
            "1 when a certificate is served for the domain, else 0.",
            labels=("domain",),
        )
        next_attempt = GaugeMetricFamily(
            "trackingproxy_acme_next_attempt_seconds",
            "Seconds until the next ACME order (renewal or retry) for the domain; 0: due now; "
            "absent while an order runs.",
            labels=("domain",),
        )
        failures = GaugeMetricFamily(
            "trackingproxy_acme_consecutive_failures",
            "Failed ACME orders for the domain since its last success (absent while 0).",
            labels=("domain",),
        )
        orders = CounterMetricFamily(
            "trackingproxy_acme_orders",
            "ACME orders by outcome (issued, failed, rate_limited, busy: another process held "
            "the order lock); an outcome appears with its first order.",
            labels=("domain", "outcome"),
        )
        last_error = GaugeMetricFamily(
            "trackingproxy_acme_last_error_timestamp_seconds",
            "When the last ACME order for the domain failed, with the error message as a label; "
            "absent once an order succeeds.",
            labels=("domain", "error"),
        )
        for d in domains:
            cert = d.certificate
            present.add_metric((d.name,), 0.0 if cert is None else 1.0)
            if cert is not None:
                info.add_metric((d.name, cert.issuer, cert.serial, cert.source), 1.0)
                not_before.add_metric((d.name,), cert.not_before.timestamp())
                not_after.add_metric((d.name,), cert.not_after.timestamp())
            r = d.renewal
            if r is None:
                continue
            if not r.ordering:  # while an order runs there is no next one to count down to
                at = r.next_attempt
                due = 0.0 if at is None else max(0.0, float(round(at.timestamp() - now)))
                next_attempt.add_metric((d.name,), due)
            if r.failures:
                failures.add_metric((d.name,), float(r.failures))
            for outcome in OUTCOMES:
                count = r.orders.get(outcome, 0)
                if count:
                    orders.add_metric((d.name, outcome), float(count))
            if r.last_error is not None and r.last_error_at is not None:
                message = " ".join(r.last_error.split())[:ERROR_LABEL_LIMIT]
                last_error.add_metric((d.name, message), r.last_error_at.timestamp())
        yield from (info, present, not_before, not_after, next_attempt, failures, orders)
        yield last_error
        yield from _cluster_metrics(source)
        in_flight = source.requests_in_flight()
        if in_flight is not None:
            yield GaugeMetricFamily(
                "trackingproxy_requests_in_flight",
                "Requests accepted and not yet finished.",
                value=float(in_flight),
            )


def _cluster_metrics(source: StatusSource) -> Iterator[Metric]:
    """Which replica this is; with ``--store``, whether the store answers and when this
    replica last checked that it serves what the store holds."""
    cluster = source.cluster
    if cluster is None:
        return
    node = GaugeMetricFamily(
        "trackingproxy_node_info", "This replica (always 1), named by --node-id.",
        labels=("node",),
    )
    node.add_metric((cluster.node_id,), 1.0)
    yield node
    health = cluster.health
    if health is None:
        return
    yield GaugeMetricFamily(
        "trackingproxy_store_up",
        "1 while the shared store (--store) answers; 0 while it is unreachable, slow or "
        "read-only (certificates in memory and in the local copy stay served, no orders).",
        value=1.0 if health.up else 0.0,
    )
    if health.last_sync is not None:
        yield GaugeMetricFamily(
            "trackingproxy_store_last_sync_timestamp_seconds",
            "When this replica last confirmed it serves what the store holds (epoch seconds).",
            value=health.last_sync,
        )
