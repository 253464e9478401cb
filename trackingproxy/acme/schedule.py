"""When to renew and when to retry: pure functions on tz-aware UTC datetimes.

Randomness comes in as a ``random.Random`` so tests can fix it; nothing here reads a clock.
"""

from __future__ import annotations

import datetime
import email.utils
import random

from trackingproxy.store.contract import AriWindow

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "SHORT_LIVED",
    "backoff_delay",
    "jittered",
    "lifetime_renewal_time",
    "next_attempt",
    "parse_retry_after",
    "renewal_time",
]

SHORT_LIVED = datetime.timedelta(days=10)
BACKOFF_MIN = datetime.timedelta(minutes=1)
BACKOFF_MAX = datetime.timedelta(hours=6)


def lifetime_renewal_time(
    not_before: datetime.datetime, not_after: datetime.datetime
) -> datetime.datetime:
    """When a third of the lifetime remains (half, for certificates shorter than 10 days)."""
    lifetime = not_after - not_before
    remaining = lifetime / 2 if lifetime < SHORT_LIVED else lifetime / 3
    return not_after - remaining


def renewal_time(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ari: AriWindow | None,
    rng: random.Random,
) -> datetime.datetime:
    """A random point inside the ARI window when there is one, else the lifetime rule.

    A window that is empty or inverted is ignored (RFC 9773 says to treat it as absent).
    """
    if ari is not None and ari.end >= ari.start:
        span = (ari.end - ari.start).total_seconds()
        return ari.start + datetime.timedelta(seconds=rng.uniform(0, span))
    return lifetime_renewal_time(not_before, not_after)


def backoff_delay(
    failures: int,
    rng: random.Random,
    base: datetime.timedelta = BACKOFF_MIN,
    cap: datetime.timedelta = BACKOFF_MAX,
) -> datetime.timedelta:
    """1 minute after the first failure, doubling, at most 6 hours, with +-20 % jitter.

    The jitter never exceeds the ceiling ``cap`` and never drops below ``base``.
    """
    exponent = max(0, failures - 1)
    delay: datetime.timedelta = min(base * (2 ** min(exponent, 30)), cap)
    delay = delay * rng.uniform(0.8, 1.2)
    return max(base, min(delay, cap))


def parse_retry_after(value: str | None, now: datetime.datetime) -> datetime.datetime | None:
    """The time a ``Retry-After`` header (seconds or HTTP date) points to; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return now + datetime.timedelta(seconds=int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC)


def next_attempt(
    failures: int,
    now: datetime.datetime,
    rng: random.Random,
    retry_after: datetime.datetime | None = None,
    base: datetime.timedelta = BACKOFF_MIN,
) -> datetime.datetime:
    """When to try again after ``failures`` failures in a row; never before ``retry_after``."""
    when = now + backoff_delay(failures, rng, base)
    if retry_after is not None and retry_after > when:
        return retry_after
    return when


def jittered(seconds: float, rng: random.Random, spread: float = 0.1) -> float:
    """``seconds`` moved randomly by up to ``spread`` (a fraction) either way."""
    return seconds * rng.uniform(1 - spread, 1 + spread)
