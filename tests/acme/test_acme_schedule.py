"""The renewal schedule (spread over a window per certificate) and the retry back-off."""

from __future__ import annotations

import collections
import datetime
import random

from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.schedule import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    backoff_delay,
    draw_point,
    lifetime_renewal_time,
    lifetime_window,
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
        """A 90-day certificate is renewed 30 days before expiry at the window's centre."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 90 * DAY), T0 + 60 * DAY)

    def test_third_remaining_for_45_days(self) -> None:
        """A 45-day certificate is renewed 15 days before expiry at the window's centre."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 45 * DAY), T0 + 30 * DAY)

    def test_half_remaining_for_short_lived(self) -> None:
        """A 6-day certificate is renewed half-way, a 60-second one after 30 seconds."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 6 * DAY), T0 + 3 * DAY)
        sixty = datetime.timedelta(seconds=60)
        self.assertEqual(lifetime_renewal_time(T0, T0 + sixty), T0 + sixty / 2)

    def test_ten_days_is_not_short(self) -> None:
        """Exactly 10 days uses the one-third rule."""
        self.assertEqual(lifetime_renewal_time(T0, T0 + 10 * DAY), T0 + 10 * DAY * 2 / 3)

    def test_window_of_90_days(self) -> None:
        """A 90-day certificate's window runs from 33.75 to 26.25 days before expiry."""
        start, end = lifetime_window(T0, T0 + 90 * DAY)
        self.assertEqual((T0 + 90 * DAY - start, T0 + 90 * DAY - end),
                         (33.75 * DAY, 26.25 * DAY))
        self.assertEqual(lifetime_renewal_time(T0, T0 + 90 * DAY, 0.0), start)
        self.assertEqual(lifetime_renewal_time(T0, T0 + 90 * DAY, 1.0), end)

    def test_window_of_short_lived(self) -> None:
        """A 6-day certificate's window runs from 3.375 to 2.625 days before expiry."""
        start, end = lifetime_window(T0, T0 + 6 * DAY)
        self.assertEqual((T0 + 6 * DAY - start, T0 + 6 * DAY - end),
                         (3.375 * DAY, 2.625 * DAY))

    def test_point_is_clamped(self) -> None:
        """A point outside 0..1 never leaves the window."""
        start, end = lifetime_window(T0, T0 + 90 * DAY)
        self.assertEqual(lifetime_renewal_time(T0, T0 + 90 * DAY, -3.0), start)
        self.assertEqual(lifetime_renewal_time(T0, T0 + 90 * DAY, 7.0), end)

    def test_certificates_issued_together_spread_out(self) -> None:
        """10,000 90-day certificates issued in the same second renew over the whole 7.5-day window, at most 2 % an hour."""
        rng = random.Random(7)
        times = [renewal_time(T0, T0 + 90 * DAY, None, draw_point(rng)) for _ in range(10_000)]
        start, end = lifetime_window(T0, T0 + 90 * DAY)
        self.assertTrue(all(start <= t <= end for t in times))
        self.assertLess(min(times) - start, datetime.timedelta(hours=1))
        self.assertLess(end - max(times), datetime.timedelta(hours=1))
        per_hour = collections.Counter(int((t - start).total_seconds() // 3600) for t in times)
        self.assertLessEqual(max(per_hour.values()), 200)

    def test_draw_point_uses_the_rng(self) -> None:
        """The point comes from the injected rng (a fixed one gives a fixed point)."""
        self.assertEqual(draw_point(FixedRandom(0.25)), 0.25)
        self.assertEqual(draw_point(random.Random(1)), draw_point(random.Random(1)))


class AriTests(SynchronousTestCase):
    def test_random_point_inside_window(self) -> None:
        """With ARI the renewal time is the certificate's point inside the suggested window."""
        ari = AriWindow(T0 + 50 * DAY, T0 + 52 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, 0.0), T0 + 50 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, 0.5), T0 + 51 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, 1.0), T0 + 52 * DAY)

    def test_ari_overrides_lifetime(self) -> None:
        """An ARI window earlier than the lifetime rule (e.g. revocation) wins."""
        ari = AriWindow(T0 + 1 * DAY, T0 + 1 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, 0.3), T0 + DAY)

    def test_inverted_window_ignored(self) -> None:
        """A window whose end precedes its start counts as no ARI."""
        ari = AriWindow(T0 + 52 * DAY, T0 + 50 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, ari, 0.5), T0 + 60 * DAY)

    def test_no_ari(self) -> None:
        """Without ARI the certificate's point inside the lifetime window applies."""
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, None, 0.5), T0 + 60 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY, None, 0.0), T0 + 56.25 * DAY)


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
