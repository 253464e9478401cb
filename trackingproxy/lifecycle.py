"""Graceful shutdown: count in-flight requests and wait for them (bounded) before stopping.

On SIGTERM twistd stops the root service: listeners stop accepting first, then the requests
already accepted finish (up to ``--shutdown-timeout``), and only then the upstream pool, the ACME
issuer and the remaining connections are closed. No accepted request is lost to a restart.
"""

from __future__ import annotations

import gc

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

log = Logger(namespace="trackingproxy.lifecycle")


class ActiveRequests:
    """How many requests have started and not yet finished (or failed), across listeners."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.count = 0
        self._waiters: list[Deferred[bool]] = []

    def started(self, request: Request) -> None:
        self.count += 1
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: object) -> None:
        self.count -= 1
        if self.count == 0:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(True)

    def wait_idle(self, timeout: float) -> Deferred[bool]:
        """Fires True once no request is in flight, or False after ``timeout`` seconds."""
        if self.count == 0:
            return succeed(True)
        waiter: Deferred[bool] = Deferred()
        self._waiters.append(waiter)
        timer: IDelayedCall = self._clock.callLater(timeout, self._expire, waiter)

        def cancel_timer(result: bool) -> bool:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addCallback(cancel_timer)

    def _expire(self, waiter: Deferred[bool]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.called:
            log.warn(
                "Shutdown timeout reached with {count} request(s) still in flight",
                count=self.count,
            )
            waiter.callback(False)


def tune_gc() -> None:
    """Once start-up is done: move what exists now out of the collector's sight and collect the
    young generation less often. The proxy makes many short-lived objects per request and few
    cycles, so the default threshold (700) costs several percent of CPU in collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
