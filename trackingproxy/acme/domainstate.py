# -*- test-case-name: tests.acme.test_acme_issuer,tests.acme.test_acme_queue -*-
"""What the issuer knows about one domain, and the rules read from it alone: when it is due,
when to look at it again, and its place in the order queue.

``DomainState`` is the issuer's working record (mutable, one per managed domain);
``RenewalState`` the frozen view of it that the admin listener shows. Nothing here touches the
clock, the store or the CA: ``now`` is always given.
"""

from __future__ import annotations

import datetime

from attrs import define, field, frozen

from trackingproxy.acme.queue import Key
from trackingproxy.store.contract import AriWindow
from trackingproxy.tls.certificates import LoadedCertificate

__all__ = ["PANIC_WINDOW", "DomainState", "RenewalState"]

PANIC_WINDOW = datetime.timedelta(days=7)


@define
class DomainState:
    current: LoadedCertificate | None = None
    ari: AriWindow | None = None
    renew_at: datetime.datetime | None = None
    point: tuple[str, float] | None = None  # (serial, where in its renewal window), per cert
    wanted_since: datetime.datetime | None = None  # first queued without a certificate
    ari_check_at: datetime.datetime | None = None
    failures: int = 0
    retry_at: datetime.datetime | None = None
    last_panic: datetime.datetime | None = None
    last_error: str | None = None
    last_error_at: datetime.datetime | None = None
    orders: dict[str, int] = field(factory=dict)  # outcome -> count (admin metrics)

    def due_at(self) -> datetime.datetime | None:
        """When this domain should next be ordered (None: not before the next check)."""
        if self.current is None or self.renew_at is None:
            return self.retry_at
        if self.retry_at is not None:
            return max(self.retry_at, self.renew_at)
        return self.renew_at

    def is_due(self, now: datetime.datetime) -> bool:
        due = self.due_at()
        return (self.current is None and self.retry_at is None) or (
            due is not None and due <= now
        )

    def wake_time(self) -> float | None:
        """When to look at a domain that is not due: its due or ARI check time."""
        times = [t for t in (self.due_at(), self.ari_check_at if self.current else None) if t]
        return min(times).timestamp() if times else None

    def queue_key(self, now: datetime.datetime) -> Key:
        """Queue order: renewals within PANIC_WINDOW of expiry (soonest expiry first), then
        domains without a certificate (longest waiting first), then renewals by renew time."""
        if self.current is None:
            if self.wanted_since is None:
                self.wanted_since = now
            return (1.0, self.wanted_since.timestamp())
        if self.current.not_after - now <= PANIC_WINDOW:
            return (0.0, self.current.not_after.timestamp())
        return (2.0, (self.renew_at or now).timestamp())


@frozen
class RenewalState:
    """What the issuer knows about one domain, for the admin status page and metrics."""

    next_attempt: datetime.datetime | None  # None: at the next check (no certificate yet)
    ordering: bool
    failures: int
    last_error: str | None
    last_error_at: datetime.datetime | None
    orders: dict[str, int]  # outcome (issued, failed, rate_limited, busy) -> count
    queue_position: int | None = None  # 1: the next order to start; None: not waiting
    queue_eta: datetime.datetime | None = None  # estimated start (pace, pause), if waiting
