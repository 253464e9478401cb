"""The optimistic TCP writes and closes (trackingproxy.ops.tcpwrite, installed by these tests;
the twistd entry point installs it for the real process): on real loopback sockets, every byte written before ``loseConnection`` arrives,
then a clean EOF, whether the kernel took the bytes at once or Twisted had to buffer them."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from trackingproxy.ops import tcpwrite


class _Sender(Protocol):
    """Server side: runs ``script(transport)`` as soon as the connection is made."""

    def __init__(self, script: Any, lost: Deferred[list[Failure]]) -> None:
        self.script = script
        self.lost = lost

    def connectionMade(self) -> None:
        self.script(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback([reason])  # in a list: a Failure given to callback() would errback


class _Collector(Protocol):
    def __init__(self, done: Deferred[tuple[bytes, Failure]]) -> None:
        self.chunks: list[bytes] = []
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback((b"".join(self.chunks), reason))


class OptimisticCloseTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        if not tcpwrite.installed():
            tcpwrite.install()
            self.addCleanup(tcpwrite.uninstall)

    def _serve(
        self, script: Any
    ) -> tuple[Deferred[tuple[bytes, Failure]], Deferred[list[Failure]]]:
        server_lost: Deferred[list[Failure]] = Deferred()
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Factory.forProtocol(lambda: _Sender(script, server_lost)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        received: Deferred[tuple[bytes, Failure]] = Deferred()
        client = ClientFactory.forProtocol(lambda: _Collector(received))
        reactor.connectTCP("127.0.0.1", port.getHost().port, client)  # type: ignore[attr-defined]
        return received, server_lost

    @inlineCallbacks
    def _check_delivery(self, payload: bytes, script: Any):
        received, server_lost = self._serve(script)
        data, reason = yield received
        [lost] = yield server_lost
        self.assertEqual(len(data), len(payload))
        self.assertEqual(data, payload)
        reason.trap(ConnectionDone)
        lost.trap(ConnectionDone)

    def test_small_answer_then_close(self) -> Any:
        payload = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

        def script(transport: Any) -> None:
            transport.write(payload)
            transport.loseConnection()

        return self._check_delivery(payload, script)

    def test_large_answer_then_close(self) -> Any:
        """More than the socket takes at once: Twisted's buffered path closes after the flush."""
        payload = bytes(range(256)) * (4 * 1024)  # 1 MiB

        def script(transport: Any) -> None:
            transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            transport.write(payload)
            self.assertIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
            transport.loseConnection()

        return self._check_delivery(payload, script)

    def test_write_after_close_in_the_same_turn_still_arrives(self) -> Any:
        """As with Twisted: bytes written after loseConnection, before the close happens, go out."""

        def script(transport: Any) -> None:
            transport.write(b"first ")
            transport.loseConnection()
            transport.write(b"second")

        return self._check_delivery(b"first second", script)

    def test_producer_registered_after_close_is_flushed_through_twisted(self) -> Any:
        class Once:
            def __init__(self, transport: Any) -> None:
                self.transport = transport

            def resumeProducing(self) -> None:
                self.transport.unregisterProducer()
                self.transport.write(b"produced")

            def pauseProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        def script(transport: Any) -> None:
            transport.loseConnection()
            transport.registerProducer(Once(transport), False)

        return self._check_delivery(b"produced", script)

    @inlineCallbacks
    def test_flushed_close_skips_epoll_and_shutdown(self):
        seen: dict[str, Any] = {}

        def script(transport: Any) -> None:
            transport.write(b"x")
            transport.loseConnection()
            seen["reading"] = transport in reactor.getReaders()  # type: ignore[attr-defined]
            seen["writing"] = transport in reactor.getWriters()  # type: ignore[attr-defined]
            seen["connected"] = transport.connected
            seen["shutdown"] = transport._shouldShutdown

        received, server_lost = self._serve(script)
        yield received
        [lost] = yield server_lost
        lost.trap(ConnectionDone)
        self.assertEqual(
            seen, {"reading": False, "writing": False, "connected": True, "shutdown": False}
        )

    @inlineCallbacks
    def test_abort_after_close_loses_the_connection_once(self):
        losses: list[Failure] = []

        def script(transport: Any) -> None:
            transport.protocol.connectionLost = losses.append
            transport.loseConnection()
            transport.abortConnection()

        received, _ = self._serve(script)
        yield received
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(losses), 1)
