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
import weakref
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from zope.interface import implementer

from trackingproxy.server.exchange import ClientExchange
from trackingproxy.server.listener import ListenerObserver

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
    """The client connections of the listeners (without wrapping them: nothing is added to a
    connection's reads or writes), and their polite close at shutdown."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._protocols: weakref.WeakSet[IProtocol] = weakref.WeakSet()

    def track(self, factory: IProtocolFactory) -> IProtocolFactory:
        """``factory``, remembering every connection (outermost protocol) it builds."""
        return _TrackedFactory(factory, self._protocols)

    def notify_shutdown(self) -> None:
        """Tell every connection the server is stopping (``shutdown_notice``): HTTP/1.1 ones
        close after the answers they owe (idle ones now), HTTP/2 ones send GOAWAY, so clients
        take new requests to another server instead of racing the final close."""
        for p in list(self._protocols):
            if not _is_open(p):
                continue
            app = getattr(p, "wrappedProtocol", p)  # under TLS: the HTTP connection
            notice = getattr(app, "shutdown_notice", None)
            if notice is not None:
                try:
                    notice()
                except Exception:
                    log.failure("Telling a client connection about the shutdown failed")

    def close(self, grace: float = CLOSE_GRACE) -> Deferred[int]:
        """Close every open connection politely (buffered output is sent first); fires once all
        are closed, or after ``grace`` seconds with the number that had to be aborted."""
        protocols = [p for p in list(self._protocols) if _is_open(p)]
        for p in protocols:
            _close(p, "loseConnection")
        done: Deferred[int] = Deferred()
        deadline = self._clock.seconds() + grace

        def check() -> None:
            still = [p for p in protocols if _is_open(p)]
            if not still:
                done.callback(0)
            elif self._clock.seconds() >= deadline:
                log.warn(
                    "{count} client connection(s) still open {grace} s after the last answer;"
                    " aborting them",
                    count=len(still),
                    grace=grace,
                )
                for p in still:
                    _close(p, "abortConnection")
                done.callback(len(still))
            else:
                self._clock.callLater(_POLL, check)

        check()
        return done


@implementer(IProtocolFactory)
class _TrackedFactory:
    def __init__(self, factory: IProtocolFactory, protocols: weakref.WeakSet[IProtocol]) -> None:
        self._factory = factory
        self._protocols = protocols

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        protocol = self._factory.buildProtocol(addr)
        if protocol is not None:
            self._protocols.add(protocol)
        return protocol

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self._factory, "logPrefix", None)
        return str(prefix()) if prefix is not None else type(self._factory).__name__


def _socket_level(protocol: IProtocol) -> Any:
    """The transport at the bottom of ``protocol``'s stack (the TCP connection)."""
    transport: Any = getattr(protocol, "transport", None)
    while getattr(transport, "transport", None) is not None:
        transport = transport.transport
    return transport


def _is_open(protocol: IProtocol) -> bool:
    transport = _socket_level(protocol)
    return transport is not None and not getattr(transport, "disconnected", True)


def _close(protocol: IProtocol, how: str) -> None:
    """``protocol.loseConnection()`` or ``abortConnection()`` when it is itself a transport
    (TLS, PROXY protocol wrappers), else the same on its transport (plain TCP)."""
    target: Any = protocol if hasattr(protocol, how) else getattr(protocol, "transport", None)
    try:
        getattr(target, how)()
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
