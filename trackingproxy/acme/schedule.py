"""When to renew and when to retry: pure functions on tz-aware UTC datetimes.

Renewals are spread: each certificate is renewed at its own random point of a window (the
CA's ARI window, or the lifetime window around "a third remains"), so certificates issued
together are not renewed together. Randomness comes in as a ``random.Random`` so tests can
fix it; nothing here reads a clock.
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
    "draw_point",
    "jittered",
    "lifetime_renewal_time",
    "lifetime_window",
    "next_attempt",
    "parse_retry_after",
    "renewal_time",
]

SHORT_LIVED = datetime.timedelta(days=10)
BACKOFF_MIN = datetime.timedelta(minutes=1)
BACKOFF_MAX = datetime.timedelta(hours=6)


def lifetime_window(
    not_before: datetime.datetime, not_after: datetime.datetime
) -> tuple[datetime.datetime, datetime.datetime]:
    """The lifetime rule's renewal window: centred on the point where a third of the lifetime
    remains (half, for certificates shorter than 10 days), one twelfth of the lifetime wide
    (one eighth for short ones).

    A 90-day certificate is renewed between 33.75 and 26.25 days before it expires (a 7.5-day
    window), a 45-day one between 16.9 and 13.1 days, a 6-day one between 3.4 and 2.6 days.
    """
    lifetime = not_after - not_before
    if lifetime < SHORT_LIVED:
        return not_before + lifetime * 7 / 16, not_before + lifetime * 9 / 16
    return not_before + lifetime * 15 / 24, not_before + lifetime * 17 / 24


def lifetime_renewal_time(
    not_before: datetime.datetime, not_after: datetime.datetime, point: float = 0.5
) -> datetime.datetime:
    """The time at ``point`` (0: start, 1: end) of the lifetime window; 0.5 is the rule's
    centre, when a third (or a half) of the lifetime remains."""
    start, end = lifetime_window(not_before, not_after)
    return start + (end - start) * min(1.0, max(0.0, point))


def draw_point(rng: random.Random) -> float:
    """Where in its renewal window a certificate is renewed (0 to 1), drawn once per
    certificate so that it stays put when the certificate is reloaded or its window moves."""
    return rng.uniform(0.0, 1.0)


def renewal_time(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ari: AriWindow | None,
    point: float,
) -> datetime.datetime:
    """The time at ``point`` (see ``draw_point``) inside the ARI window when there is one,
    else inside the lifetime window.

    A window that is empty or inverted is ignored (RFC 9773 says to treat it as absent).
    """
    if ari is not None and ari.end >= ari.start:
        return ari.start + (ari.end - ari.start) * min(1.0, max(0.0, point))
    return lifetime_renewal_time(not_before, not_after, point)


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
