# -*- test-case-name: tests.outage.test_replay -*-
"""Noticing that SparkPost answers again, and re-sending the journal once, oldest first.

While requests wait in the journal and the upstream is down, a probe (``GET /f/a/b/c/d`` with
the Host of the oldest entry) is sent every ``probe_interval`` (5 s), and at once when a live
request gets an answer. Any HTTP answer to the probe means the upstream is back (a 503 does not
while upstream 503s are journaled). Then the journal is re-sent, oldest first, at most ``rate``
requests per second (20) and ``concurrency`` at a time (4), each with its original method,
Host, path and query, ``X-Forwarded-For`` (the original client address),
``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``User-Agent``. SparkPost stamps each event
when it receives it: at the re-send.

Each entry is marked sending on disk (fsynced) before it is sent (`Journal.mark_sending`). An
answer ends it (re-sent); a failure that proves the request never left (DNS, connect, TLS, not
written) or a 503 makes it pending again; a failure after it was written (timeout, reset) gives
it up as ambiguous: never sent twice. The first failure stops the replay; probing resumes.
Stopping the service stops it too; an entry in flight then stays marked sending and is given up
at the next start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.journal import Entry, Journal
from trackingproxy.outage.links import RememberedLinks
from trackingproxy.outage.policy import classify
from trackingproxy.outage.records import JournaledRequest
from trackingproxy.upstream.http1 import UpstreamResponse

__all__ = ["CONCURRENCY", "PROBE_INTERVAL", "PROBE_TARGET", "RATE", "Replayer", "Sender"]

log = Logger(namespace="trackingproxy.outage")

PROBE_TARGET: Final = b"/f/a/b/c/d"
PROBE_USER_AGENT: Final = b"trackingproxy-outage-probe"
PROBE_INTERVAL: Final = 5.0
RATE: Final = 20.0
CONCURRENCY: Final = 4


class Sender(Protocol):
    """What the replayer needs of the upstream client (`trackingproxy.upstream.client`)."""

    def request(
        self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> Deferred[UpstreamResponse]: ...


class Replayer:
    """See the module docstring; `trackingproxy.outage.policy` tells it of live failures and
    answers (it is the policy's `UpstreamWatch`).

    @ivar down_since: when the upstream was first seen failing (None: it answers).
    @ivar replaying: re-sending the journal now.
    @ivar _in_flight: replays marked or sent and not yet settled.
    @ivar _next_start: the earliest time the next replay may start (the rate limit).
    @ivar _timer: the next probe or the next paced replay.
    """

    def __init__(
        self,
        clock: IReactorTime,
        upstream: Sender,
        journal: Journal,
        counters: OutageCounters,
        links: RememberedLinks,
        hosts: Callable[[], Iterable[str]],
        *,
        rate: float = RATE,
        concurrency: int = CONCURRENCY,
        probe_interval: float = PROBE_INTERVAL,
        journal_503: bool = True,
    ) -> None:
        self._clock = clock
        self._upstream = upstream
        self._journal = journal
        self._counters = counters
        self._links = links
        self._hosts = hosts
        self.rate = rate
        self.concurrency = concurrency
        self.probe_interval = probe_interval
        self._journal_503 = journal_503
        self.down_since: float | None = None
        self.replaying = False
        self._probing = False
        self._stopped = True
        self._in_flight = 0
        self._next_start = 0.0
        self._timer: IDelayedCall | None = None
        self._round = 0  # re-sent in the current replay

    # -- life -----------------------------------------------------------------------------
    def start(self) -> None:
        """Begin: with entries left from before, probe at once."""
        self._stopped = False
        if len(self._journal):
            self._schedule(0.0, self._probe)

    def stop(self) -> None:
        """No probe and no new replay any more."""
        self._stopped = True
        self.replaying = False
        self._cancel_timer()

    # -- what the policy reports (UpstreamWatch) -------------------------------------------
    def upstream_failed(self) -> None:
        if self.down_since is None:
            self.down_since = self._clock.seconds()
            log.warn(
                "Upstream unreachable: opens and remembered clicks are answered here, other "
                "clicks get 503; requests that never reached it are journaled for one re-send"
            )
        if self.replaying:
            self.replaying = False
            self._cancel_timer()
        if self._timer is None and not self._probing and len(self._journal):
            self._retry_later()

    def upstream_answered(self) -> None:
        if self.down_since is None or self._stopped:
            return
        if not len(self._journal):
            self._up()
        elif not self._probing:
            self._schedule(0.0, self._probe)

    # -- probing --------------------------------------------------------------------------
    def _probe(self) -> None:
        self._timer = None
        if self._stopped or self._probing or not len(self._journal):
            return  # nothing waits: a live answer will tell that the upstream is back
        self._probing = True
        headers = [(b"host", self._probe_host().encode("ascii")), (b"user-agent", PROBE_USER_AGENT)]
        d = self._upstream.request(b"GET", PROBE_TARGET, headers, None)
        d.addCallbacks(self._probe_answered, self._probe_failed)

    def _probe_host(self) -> str:
        oldest = self._journal.next_pending()
        if oldest is not None:
            return oldest.request().host
        return min(self._hosts(), default="localhost")

    def _probe_answered(self, response: UpstreamResponse) -> None:
        self._probing = False
        response.deliverBody(_Discard())
        if response.code == 503 and self._journal_503:
            self._retry_later()
        else:
            self._up()

    def _probe_failed(self, failure: Failure) -> None:
        self._probing = False
        self._retry_later()

    def _retry_later(self) -> None:
        if not self._stopped and self._timer is None:
            self._schedule(self.probe_interval, self._probe)

    def _up(self) -> None:
        if self.down_since is not None:
            log.info(
                "Upstream answers again after {seconds:.0f} s; {count} journaled request(s) to "
                "re-send, at most {rate:g} per second",
                seconds=self._clock.seconds() - self.down_since,
                count=len(self._journal), rate=self.rate,
            )
            self.down_since = None
        if len(self._journal) and not self._stopped and not self.replaying:
            self.replaying = True
            self._round = 0
            self._cancel_timer()
            self._pump()

    # -- replaying ------------------------------------------------------------------------
    def _pump(self) -> None:
        self._cancel_timer()  # a paced call still due, when called on an answer
        if self._stopped or not self.replaying:
            return
        while self._in_flight < self.concurrency:
            now = self._clock.seconds()
            if now < self._next_start:
                self._schedule(self._next_start - now, self._pump)
                return
            entry = self._journal.next_pending()
            if entry is None:
                if self._in_flight == 0:
                    self.replaying = False
                    log.info("Journal re-sent: {count} request(s)", count=self._round)
                return
            self._in_flight += 1
            self._next_start = max(now, self._next_start) + 1.0 / self.rate
            marked = self._journal.mark_sending(entry)
            marked.addCallbacks(
                self._send, self._mark_failed, callbackArgs=(entry,), errbackArgs=(entry,)
            )

    def _send(self, _: object, entry: Entry) -> None:
        if self._stopped or not self.replaying:
            self._settled()
            self._journal.unsent(entry)  # marked, never sent
            return
        try:
            req = entry.request()
        except (ValueError, KeyError):  # cannot happen: the line was made by add_record
            self._settled()
            self._journal.forget(entry)
            log.warn("Journal entry {id} unreadable; given up", id=entry.id)
            return
        headers = [] if req.user_agent is None else [(b"user-agent", req.user_agent)]
        host = req.host.encode("ascii")
        headers += (
            (b"host", host),
            (b"x-forwarded-for", req.client.encode("ascii", "replace")),
            (b"x-forwarded-proto", req.scheme),
            (b"x-forwarded-host", host),
        )
        d = self._upstream.request(req.method, req.target, headers, None)
        d.addCallbacks(
            self._replayed, self._replay_failed, callbackArgs=(entry, req), errbackArgs=(entry,)
        )

    def _mark_failed(self, failure: Failure, entry: Entry) -> None:
        """The sending mark could not be written: not sent; try again later."""
        self._settled()
        self._journal.unsent(entry)
        if self.replaying:
            self.replaying = False
            self._cancel_timer()
            self._retry_later()

    def _replayed(self, response: UpstreamResponse, entry: Entry, req: JournaledRequest) -> None:
        self._settled()
        response.deliverBody(_Discard())
        if response.code == 503 and self._journal_503:
            self._journal.unsent(entry)  # refused before any body: not processed
            self.upstream_failed()
            return
        self._journal.sent(entry)
        self._counters.replayed += 1
        self._round += 1
        if 300 <= response.code < 400:
            for name, value in response.raw_headers:
                if name.lower() == b"location":
                    self._links.learn(req.host, req.target, response.code, value)
                    break
        self._pump()

    def _replay_failed(self, failure: Failure, entry: Entry) -> None:
        self._settled()
        verdict = classify(failure.value) if failure.value is not None else None
        if verdict == "unreached":
            self._journal.unsent(entry)
        else:
            self._journal.forget(entry)  # maybe seen: never again
            if verdict == "ambiguous":
                self._counters.ambiguous += 1
            else:
                log.warn("Journal entry {id} cannot be sent ({error}); given up",
                         id=entry.id, error=failure.getErrorMessage())
                self._pump()
                return
        self.upstream_failed()

    def _settled(self) -> None:
        self._in_flight -= 1

    # -- timers ---------------------------------------------------------------------------
    def _schedule(self, delay: float, call: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(delay, call)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- facts ----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``down``, ``replaying`` or ``up``."""
        if self.down_since is not None:
            return "down"
        return "replaying" if self.replaying else "up"


class _Discard(TwistedProtocol):
    """Reads and drops a body (the connection stays reusable)."""

    def dataReceived(self, data: bytes) -> None:
        pass
