"""The renewal schedule and the retry back-off, with fixed randomness."""

from __future__ import annotations

import datetime

from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.schedule import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    backoff_delay,
    lifetime_renewal_time,
    next_attempt,
    parse_retry_after,
    renewal_time,
)
from trackingproxy.acme.testing import FixedRandom
from trackingproxy.store.contract import AriWindow

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


class LifetimeTests(SynchronousTestCase):
    def test_third_remaining_for_90_days(self) -> None:
        """A 90-day certificate is renewed 30 days before expiry."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 90 * DAY), T0 + 60 * DAY)

    def test_third_remaining_for_45_days(self) -> None:
        """A 45-day certificate is renewed 15 days before expiry."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 45 * DAY), T0 + 30 * DAY)

    def test_half_remaining_for_short_lived(self) -> None:
        """A 6-day certificate is renewed half-way, a 60-second one after 30 seconds."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 6 * DAY), T0 + 3 * DAY)
        sixty = datetime.timedelta(seconds=60)
        self.assertEqual(lifetime_renewal_time(T0, T0 + sixty), T0 + sixty / 2)

    def test_ten_days_is_not_short(self) -> None:
        """Exactly 10 days uses the one-third rule."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 10 * DAY), T0 + 10 * DAY * 2 / 3)


class AriTests(SynchronousTestCase):
    def test_random_point_inside_window(self) -> None:
        """With ARI the renewal time is a random point inside the suggested window."""
        ari = AriWindow(T0 + 50 * DAY, T0 + 52 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, FixedRandom(0.0)), T0 + 50 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, FixedRandom(0.5)), T0 + 51 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, FixedRandom(1.0)), T0 + 52 * DAY)

    def test_ari_overrides_lifetime(self) -> None:
        """An ARI window earlier than the lifetime rule (e.g. revocation) wins."""
        ari = AriWindow(T0 + 1 * DAY, T0 + 1 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, FixedRandom(0.3)), T0 + DAY)

    def test_inverted_window_ignored(self) -> None:
        """A window whose end precedes its start counts as no ARI."""
        ari = AriWindow(T0 + 52 * DAY, T0 + 50 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, FixedRandom(0.5)), T0 + 60 * DAY)

    def test_no_ari(self) -> None:
        """Without ARI the lifetime rule applies."""
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, None, FixedRandom(0.5)), T0 + 60 * DAY)


class BackoffTests(SynchronousTestCase):
    def test_doubles_from_one_minute(self) -> None:
        """Without jitter: 1, 2, 4, 8 minutes after 1..4 failures."""
        mid = FixedRandom(0.5)  # uniform(0.8, 1.2) -> 1.0
        self.assertEqual(
            [backoff_delay(n, mid) for n in (1, 2, 3, 4)],
            [BACKOFF_MIN * k for k in (1, 2, 4, 8)],
        )

    def test_capped_at_six_hours(self) -> None:
        """However many failures, never more than 6 hours, jitter included."""
        for n in (10, 11, 50, 1000):
            self.assertEqual(backoff_delay(n, FixedRandom(1.0)), BACKOFF_MAX)
        self.assertLess(backoff_delay(1000, FixedRandom(0.0)), BACKOFF_MAX)

    def test_jitter_spreads_and_floor(self) -> None:
        """Jitter moves the delay by up to 20 % but never below one minute."""
        self.assertEqual(backoff_delay(3, FixedRandom(0.0)), BACKOFF_MIN * 4 * 0.8)
        self.assertEqual(backoff_delay(3, FixedRandom(1.0)), BACKOFF_MIN * 4 * 1.2)
        self.assertEqual(backoff_delay(1, FixedRandom(0.0)), BACKOFF_MIN)

    def test_retry_after_wins_when_later(self) -> None:
        """A Retry-After later than the back-off is honoured; an earlier one is not."""
        mid = FixedRandom(0.5)
        later = T0 + datetime.timedelta(hours=3)
        self.assertEqual(next_attempt(1, T0, mid, later), later)
        earlier = T0 + datetime.timedelta(seconds=5)
        self.assertEqual(next_attempt(1, T0, mid, earlier), T0 + BACKOFF_MIN)
        self.assertEqual(next_attempt(2, T0, mid, None), T0 + 2 * BACKOFF_MIN)


class RetryAfterTests(SynchronousTestCase):
    def test_seconds(self) -> None:
        """A number of seconds is relative to now."""
        self.assertEqual(parse_retry_after("120", T0), T0 + datetime.timedelta(seconds=120))

    def test_http_date(self) -> None:
        """An HTTP date is absolute, converted to UTC."""
        self.assertEqual(
            parse_retry_after("Wed, 02 Jan 2030 00:00:00 GMT", T0), T0 + DAY
        )

    def test_garbage(self) -> None:
        """Missing or unparseable values give None."""
        self.assertIsNone(parse_retry_after(None, T0))
        self.assertIsNone(parse_retry_after("soon", T0))
        self.assertIsNone(parse_retry_after("-5", T0))
