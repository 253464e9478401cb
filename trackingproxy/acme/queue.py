# -*- test-case-name: tests.acme.test_acme_queue,tests.acme.test_acme_scale -*-
"""The order queue (which due domain is ordered next, and when) and the per-domain wake-ups.

``OrderQueue`` owns the domains waiting for an order, in the order of a key the issuing
service gives each one, and starts them through its ``start`` callback no faster than the
``Pacer`` allows, at most ``concurrency`` at a time, and not at all while paused (the CA
answered ``rateLimited``: the pause covers every domain, until the CA's Retry-After).
``start`` returns a Deferred firing with whether a CA order was really placed; a start that
placed none (another process held the lock, the certificate had been renewed meanwhile)
gives its slot back. ``Wakeups`` is one timer for many domains: it hands back the names
whose planned time has come.

Both run on the injected clock, one ``IDelayedCall`` each, and cost O(log n) per domain
added, started or planned (n: the domains); only ``places`` and ``summary`` (for the status
page) walk the whole queue, in O(n log n). Times are clock seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["HOUR", "Key", "OrderQueue", "Pacer", "QueuePlace", "QueueSummary", "Wakeups"]

log = Logger()
HOUR = 3600.0
_SLACK = 1e-6  # clock arithmetic: a timer set for t may see t minus a rounding error

Key = tuple[float, ...]
"""Smaller first; equal keys in the order the names were first added."""


class Pacer:
    """When the next order may start: ``burst`` at once, then one every ``3600 / per_hour``
    seconds (a token bucket, kept as its theoretical arrival time: GCRA), and never more than
    ``per_hour`` starts in any sliding hour.

    @ivar per_hour: the most starts in any hour.
    @ivar burst: how many may start at once after a quiet spell (at most ``per_hour``).
    @ivar interval: seconds between starts once the burst is spent.
    """

    def __init__(self, per_hour: int, burst: int = 1) -> None:
        if per_hour < 1:
            raise ValueError(f"per_hour must be at least 1, not {per_hour}")
        self.per_hour = per_hour
        self.burst = max(1, min(burst, per_hour))
        self.interval = HOUR / per_hour
        self._tat = float("-inf")  # the bucket is full before this time
        self._starts: deque[float] = deque()  # starts in the last hour, oldest first

    def copy(self) -> Pacer:
        twin = Pacer(self.per_hour, self.burst)
        twin._tat = self._tat
        twin._starts = deque(self._starts)
        return twin

    def _forget(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - HOUR:
            self._starts.popleft()

    def next_start(self, now: float) -> float:
        """The earliest time, ``now`` or later, at which a start is allowed."""
        self._forget(now)
        when = max(now, self._tat - (self.burst - 1) * self.interval)
        if len(self._starts) >= self.per_hour:
            when = max(when, self._starts[-self.per_hour] + HOUR)
        return when

    def take(self, now: float) -> None:
        """Count a start at ``now``."""
        self._tat = max(self._tat, now) + self.interval
        self._starts.append(now)

    def give_back(self, started: float) -> None:
        """Forget the start counted at ``started``: it placed no order."""
        self._tat -= self.interval
        with contextlib.suppress(ValueError):  # already older than an hour
            self._starts.remove(started)

    def in_last_hour(self, now: float) -> int:
        self._forget(now)
        return len(self._starts)


@frozen
class QueuePlace:
    """Where a waiting domain stands: ``position`` 1 starts next; ``eta`` is its estimated
    start (from the pace and the pause; the CA's speed can make it later)."""

    position: int
    eta: datetime.datetime


@frozen
class QueueSummary:
    """The queue as a whole, for the status page and metrics."""

    length: int  # domains waiting for their order to start
    running: int  # queued orders running now
    paused_until: datetime.datetime | None  # the CA said rateLimited: no start before this
    pause_reason: str | None  # the CA's problem, as logged
    orders_last_hour: int  # orders started in the last hour (those that placed none excluded)
    max_orders_per_hour: int
    max_concurrent: int
    next_start: datetime.datetime | None  # estimated start of position 1
    drained_at: datetime.datetime | None  # estimated start of the last waiting domain


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


class OrderQueue:
    """The domains waiting for an order, started in key order at the ``Pacer``'s pace.

    @ivar pacer: the pace (shared by every start through this queue).
    @ivar concurrency: the most orders started here that may run at once.
    @ivar paused_until: no start before this (clock seconds), or None.
    @ivar pause_reason: why (the CA's problem), while paused.
    """

    def __init__(
        self,
        clock: IReactorTime,
        start: Callable[[str], Deferred[bool]],
        *,
        per_hour: int,
        concurrency: int = 4,
        burst: int = 10,
    ) -> None:
        self._clock = clock
        self._start = start
        self.pacer = Pacer(per_hour, burst)
        self.concurrency = max(1, concurrency)
        self.paused_until: float | None = None
        self.pause_reason: str | None = None
        self._heap: list[list[Any]] = []  # [key, seq, name]; name None: removed
        self._entries: dict[str, list[Any]] = {}
        self._seq = itertools.count()
        self._running = 0
        self._active = False
        self._pumping = False
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def running(self) -> int:
        return self._running

    # -- contents -------------------------------------------------------------------------
    def add(self, name: str, key: Key) -> None:
        """Let ``name`` wait with ``key`` (a new key moves it; its place among equals stays).
        Nothing starts before the next ``pump``."""
        entry = self._entries.get(name)
        if entry is not None:
            if entry[0] == key:
                return
            entry[2] = None
        seq = entry[1] if entry is not None else next(self._seq)
        entry = [key, seq, name]
        self._entries[name] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)

    def discard(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry[2] = None

    def _pop(self) -> str | None:
        while self._heap:
            name: str | None = heapq.heappop(self._heap)[2]
            if name is not None:
                del self._entries[name]
                return name
        return None

    # -- starting -------------------------------------------------------------------------
    def begin(self) -> None:
        """Start orders from now on."""
        self._active = True
        self.pump()

    def halt(self) -> None:
        """Start nothing more (running orders go on); the waiting domains stay."""
        self._active = False
        self._cancel_timer()

    def pause(self, until: float, reason: str) -> bool:
        """Start nothing before ``until`` (a later pause wins). True if this began a pause
        (logged once; extending a running pause is not logged again)."""
        now = self._clock.seconds()
        if until <= now + _SLACK:
            return False
        began = not self.paused(now)
        if began or self.paused_until is None or until > self.paused_until:
            self.paused_until, self.pause_reason = until, reason
        if began:
            log.warn(
                "ACME orders paused until {until} for every domain ({waiting} waiting): the "
                "CA answered rateLimited: {reason}",
                until=_utc(until).isoformat(timespec="seconds"), waiting=len(self._entries),
                reason=reason,
            )
        self.pump()
        return began

    def paused(self, now: float) -> bool:
        return self.paused_until is not None and now + _SLACK < self.paused_until

    def _next_start(self, now: float) -> float:
        when = self.pacer.next_start(now)
        if self.paused(now):
            assert self.paused_until is not None
            when = max(when, self.paused_until)
        return when

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def pump(self) -> None:
        """Start what may start now; otherwise set the timer for the next start."""
        if self._pumping:  # a start that finished at once: the running loop goes on
            return
        self._cancel_timer()
        if not self._active:
            return
        self._pumping = True
        try:
            while self._entries and self._running < self.concurrency:
                now = self._clock.seconds()
                if self.paused_until is not None and not self.paused(now):
                    log.info("ACME orders resume after the CA's rate limit ({waiting} waiting)",
                             waiting=len(self._entries))
                    self.paused_until = self.pause_reason = None
                when = self._next_start(now)
                if when > now + _SLACK:
                    self._timer = self._clock.callLater(when - now, self._tick)
                    return
                name = self._pop()
                if name is not None:
                    self.pacer.take(now)
                    self._launch(name, now)
        finally:
            self._pumping = False

    def _tick(self) -> None:
        self._timer = None
        self.pump()

    def _launch(self, name: str, now: float) -> None:
        self._running += 1
        try:
            d = self._start(name)
        except Exception:
            d = fail()

        def done(result: bool | Failure) -> None:
            self._running -= 1
            if isinstance(result, Failure):
                log.failure("{name}: starting the queued order failed", result, name=name)
            elif not result:
                self.pacer.give_back(now)
            self.pump()

        d.addBoth(done)

    # -- reporting ------------------------------------------------------------------------
    def _estimates(self, now: float) -> list[tuple[str, float]]:
        """The waiting names in start order, each with its estimated start."""
        ordered = sorted(e for e in self._heap if e[2] is not None)
        pacer = self.pacer.copy()
        when = now
        if self.paused(now):
            assert self.paused_until is not None
            when = self.paused_until
        out: list[tuple[str, float]] = []
        for _key, _seq, name in ordered:
            when = pacer.next_start(when)
            pacer.take(when)
            out.append((name, when))
        return out

    def places(self) -> dict[str, QueuePlace]:
        """Position (1: next) and estimated start of every waiting domain."""
        estimates = self._estimates(self._clock.seconds())
        return {
            name: QueuePlace(position=i, eta=_utc(when))
            for i, (name, when) in enumerate(estimates, start=1)
        }

    def summary(self) -> QueueSummary:
        now = self._clock.seconds()
        estimates = self._estimates(now)
        return QueueSummary(
            length=len(self._entries),
            running=self._running,
            paused_until=_utc(self.paused_until)
            if self.paused_until is not None and self.paused(now) else None,
            pause_reason=self.pause_reason if self.paused(now) else None,
            orders_last_hour=self.pacer.in_last_hour(now),
            max_orders_per_hour=self.pacer.per_hour,
            max_concurrent=self.concurrency,
            next_start=_utc(estimates[0][1]) if estimates else None,
            drained_at=_utc(estimates[-1][1]) if estimates else None,
        )


class Wakeups:
    """One timer for many names: ``plan(name, when)`` (None cancels); when planned times
    come, ``fire(names)`` gets every name due by then."""

    def __init__(self, clock: IReactorTime, fire: Callable[[list[str]], object]) -> None:
        self._clock = clock
        self._fire = fire
        self._when: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # stale entries are skipped
        self._timer: IDelayedCall | None = None
        self._armed_for: float | None = None
        self._active = False

    def planned(self, name: str) -> float | None:
        return self._when.get(name)

    def plan(self, name: str, when: float | None) -> None:
        if self._when.get(name) == when:
            return
        if when is None:
            del self._when[name]
            return
        self._when[name] = when
        heapq.heappush(self._heap, (when, name))
        if len(self._heap) > 2 * len(self._when) + 64:
            self._heap = [(w, n) for n, w in self._when.items()]
            heapq.heapify(self._heap)
        if self._active and (self._armed_for is None or when < self._armed_for):
            self._arm()

    def start(self) -> None:
        self._active = True
        self._arm()

    def stop(self) -> None:
        self._active = False
        self._cancel()

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._armed_for = None

    def _arm(self) -> None:
        self._cancel()
        heap = self._heap
        while heap and self._when.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if not heap or not self._active:
            return
        self._armed_for = heap[0][0]
        self._timer = self._clock.callLater(
            max(0.0, heap[0][0] - self._clock.seconds()), self._due
        )

    def _due(self) -> None:
        self._timer = self._armed_for = None
        now = self._clock.seconds()
        names: list[str] = []
        while self._heap and self._heap[0][0] <= now + _SLACK:
            when, name = heapq.heappop(self._heap)
            if self._when.get(name) == when:
                del self._when[name]
                names.append(name)
        self._arm()
        if names:
            self._fire(names)
