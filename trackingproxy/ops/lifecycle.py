"""Graceful shutdown: count in-flight requests and wait for them (bounded) before stopping;
know the client connections, so that they are closed only once their answers are sent.

On SIGTERM twistd stops the root service: listeners stop accepting first (new connections are
refused), then the requests already accepted finish (up to ``--shutdown-timeout``). Requests
still waiting for the upstream after that get a 502 (the upstream connections are closed). Then
every client connection is closed politely: what was written is flushed first (TLS ends with
close_notify); one still open ``CLOSE_GRACE`` seconds later is aborted. Only then are the upstream
pool, the ACME issuer and the admin listener stopped. No accepted request is lost to a restart.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger

from trackingproxy.server.exchange import ClientExchange
from trackingproxy.server.listener import ListenerObserver
from trackingproxy.server.registry import SHUTDOWN, ClientConnection, ConnectionRegistry

log = Logger(namespace="trackingproxy.ops.lifecycle")




class ActiveRequests(ListenerObserver):
    """How many requests have started and not yet finished (or failed), across listeners."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.count = 0
        self._waiters: list[Deferred[bool]] = []

    def request_started(self, exchange: ClientExchange) -> None:
        self.count += 1
        exchange.notifyFinish().addBoth(self._finished)

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


CLOSE_GRACE = 2.0  # seconds a client connection gets to flush and close at shutdown
_POLL = 0.05


class OpenConnections:
    """The client connections of the listeners, reached through each listener's registry
    (`trackingproxy.server.registry`), and their polite close at shutdown."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._registries: list[ConnectionRegistry] = []

    def watch(self, registry: ConnectionRegistry) -> None:
        """Take the connections of one more listener into account."""
        self._registries.append(registry)

    def _open(self) -> list[ClientConnection]:
        return [c for registry in self._registries for c in registry]

    def notify_shutdown(self) -> None:
        """Tell every connection the server is stopping (a `ShutdownNotice`): HTTP/1.1 ones
        close after the answers they owe (idle ones now), HTTP/2 ones send GOAWAY, so clients
        take new requests to another server instead of racing the final close."""
        for connection in self._open():
            try:
                connection.shutdown_notice(SHUTDOWN)
            except Exception:
                log.failure("Telling a client connection about the shutdown failed")

    def close(self, grace: float = CLOSE_GRACE) -> Deferred[int]:
        """Close every open connection politely (buffered output is sent first); fires once all
        are closed, or after ``grace`` seconds with the number that had to be aborted."""
        for connection in self._open():
            _safely(connection.close)
        done: Deferred[int] = Deferred()
        deadline = self._clock.seconds() + grace

        def check() -> None:
            still = self._open()
            if not still:
                done.callback(0)
            elif self._clock.seconds() >= deadline:
                log.warn(
                    "{count} client connection(s) still open {grace} s after the last answer;"
                    " aborting them",
                    count=len(still),
                    grace=grace,
                )
                for connection in still:
                    _safely(connection.abort)
                done.callback(len(still))
            else:
                self._clock.callLater(_POLL, check)

        check()
        return done


def _safely(action: Any) -> None:
    try:
        action()
    except Exception:
        log.failure("Closing a client connection at shutdown failed")


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files to its hard limit (as Go programs such
    as Caddy do at start): each client connection and each upstream connection is a file, and
    the soft limit is often 1024. Returns (before, after) when it changed anything."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return None
    return soft, hard


def tune_gc() -> None:
    """Once start-up is done: move what exists now out of the collector's sight and collect the
    young generation less often. The proxy makes many short-lived objects per request and few
    cycles, so the default threshold (700) costs several percent of CPU in collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
