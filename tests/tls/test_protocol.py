"""The HTTPS listener's TLS layer: a connection that ends in a TLS error (the peer gone
mid-handshake) is freed by reference counting, without the garbage collector."""

from __future__ import annotations

import contextlib
import gc
import os
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, directlyProvidedBy, directlyProvides, providedBy

from tests.certs import ServerTLS, issue, make_ca
from trackingproxy.internals import twisted_private
from trackingproxy.internals.pyopenssl_private import renew_memory_bios
from trackingproxy.tls.protocol import TLSServerFactory

# The start of a ClientHello: the peer goes away before the rest.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20


def _server_factory(
    factory_class: type[TLSMemoryBIOFactory], wrapped: type[Protocol], **kw: Any
) -> TLSMemoryBIOFactory:
    """A started server TLS factory with a fresh certificate for click.example.com."""
    leaf = issue(make_ca(), "click.example.com")
    factory = factory_class(ServerTLS(leaf), False, Factory.forProtocol(wrapped), **kw)
    factory.doStart()
    return factory


def _cut_mid_handshake(
    factory_class: type[TLSMemoryBIOFactory],
) -> tuple[weakref.ref[Any], weakref.ref[Any]]:
    protocol = _server_factory(factory_class, Protocol).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(PARTIAL_HELLO)
    refs = weakref.ref(protocol), weakref.ref(protocol._tlsConnection)
    protocol.connectionLost(Failure(ConnectionLost("peer gone")))
    del protocol
    return refs


class TLSServerTests(SynchronousTestCase):
    def test_cut_handshake_is_freed_without_the_collector(self) -> None:
        gc.disable()
        self.addCleanup(gc.enable)
        gc.collect()
        tls_protocol, openssl_connection = _cut_mid_handshake(TLSServerFactory)
        self.assertIsNone(tls_protocol())
        self.assertIsNone(openssl_connection())

    def test_small_writes_are_still_aggregated(self) -> None:
        """The protocol is Twisted's default one underneath (BufferingTLSTransport): small
        writes of one reactor turn leave as one TLS record."""
        self.assertTrue(issubclass(TLSServerFactory.protocol, BufferingTLSTransport))
        self.assertTrue(issubclass(TLSServerFactory.protocol, TLSMemoryBIOFactory.protocol))

    def test_twisted_alone_leaves_a_cycle(self) -> None:
        """Why the subclass exists: with Twisted's own factory the same connection is only
        freed by a collection. (If Twisted fixes this, the subclass can go.)"""
        gc.disable()
        self.addCleanup(gc.enable)
        gc.collect()
        tls_protocol, openssl_connection = _cut_mid_handshake(TLSMemoryBIOFactory)
        self.assertIsNotNone(openssl_connection())
        gc.collect()
        self.assertIsNone(tls_protocol())


class _Marked(Interface):
    """An interface one transport instance provides on top of its class."""


class _CountsConnections(Protocol):
    made = 0

    def connectionMade(self) -> None:
        self.made += 1


def _connected(factory_class: type[TLSMemoryBIOFactory], transport: StringTransport) -> Any:
    protocol = _server_factory(factory_class, _CountsConnections).buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol


class TransportInterfacesTests(SynchronousTestCase):
    """TLSServerProtocol.makeConnection ends as Twisted's does (interfaces declared, the wrapped
    protocol connected once, the protocol registered), declaring once per class pair."""

    def _same_as_twisted(self, transport: StringTransport) -> None:
        twisted_protocol = _connected(TLSMemoryBIOFactory, transport)
        ours = _connected(TLSServerFactory, transport)
        self.assertEqual(list(directlyProvidedBy(ours)), list(directlyProvidedBy(twisted_protocol)))
        self.assertTrue(list(directlyProvidedBy(ours)))
        self.assertEqual((ours.wrappedProtocol.made, twisted_protocol.wrappedProtocol.made), (1, 1))
        self.assertIs(ours.transport, transport)
        self.assertIsNotNone(ours.getHandle())
        self.assertIs(ours.wrappedProtocol.transport, ours)
        self.assertIn(ours, ours.factory.protocols)

    def test_first_and_cached_connections_match_twisted(self) -> None:
        twisted_private.DECLARATIONS.clear()
        self._same_as_twisted(StringTransport())
        self.assertEqual(len(twisted_private.DECLARATIONS), 1)
        self._same_as_twisted(StringTransport())

    def test_transport_with_its_own_interfaces_is_not_cached(self) -> None:
        twisted_private.DECLARATIONS.clear()
        transport = StringTransport()
        directlyProvides(transport, _Marked)
        self._same_as_twisted(transport)
        self.assertEqual(twisted_private.DECLARATIONS, {})
        self._same_as_twisted(StringTransport())
        self.assertNotIn(_Marked, list(providedBy(_connected(TLSServerFactory, StringTransport()))))


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class MemoryBIORenewalTests(SynchronousTestCase):
    """After the handshake the server connection trades its grown memory BIOs for new ones,
    once, without losing a byte either way."""

    def setUp(self) -> None:
        self.clock = Clock()
        factory = _server_factory(TLSServerFactory, _Echo, clock=self.clock)
        self.server = factory.buildProtocol(None)
        self.wire = StringTransport()
        self.server.makeConnection(self.wire)
        self.first_bios = (
            self.server._tlsConnection._into_ssl,
            self.server._tlsConnection._from_ssl,
        )
        client_context = SSL.Context(SSL.TLS_METHOD)
        client_context.set_min_proto_version(SSL.TLS1_3_VERSION)
        self.client = SSL.Connection(client_context, None)
        self.client.set_connect_state()
        self.client.set_tlsext_host_name(b"click.example.com")

    def _pump(self) -> bytes:
        """Move bytes both ways until neither side has any; return what the client read."""
        received = b""
        for _ in range(200):
            self.clock.advance(0)
            moved = False
            with contextlib.suppress(SSL.WantReadError):
                self.client.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                out = self.client.bio_read(1 << 20)
                if out:
                    self.server.dataReceived(out)
                    moved = True
            back = self.wire.value()
            self.wire.clear()
            if back:
                self.client.bio_write(back)
                moved = True
            while True:
                try:
                    received += self.client.recv(1 << 20)
                except SSL.WantReadError:
                    break
            if not moved:
                return received
        raise AssertionError("the connection never went quiet")

    def _echo(self, payload: bytes) -> bytes:
        sent = 0
        received = b""
        while sent < len(payload):
            sent += self.client.send(payload[sent : sent + 16384])
            received += self._pump()
        return received + self._pump()

    def test_renewed_once_after_the_handshake_and_bytes_still_flow(self) -> None:
        self._pump()
        self.assertTrue(self.server._handshakeDone)
        self.assertTrue(self.server.after_handshake_done)
        renewed = (self.server._tlsConnection._into_ssl, self.server._tlsConnection._from_ssl)
        self.assertNotEqual(renewed[0], self.first_bios[0])
        self.assertNotEqual(renewed[1], self.first_bios[1])
        payload = os.urandom(300_000)
        self.assertEqual(self._echo(payload), payload)
        again = (self.server._tlsConnection._into_ssl, self.server._tlsConnection._from_ssl)
        self.assertEqual(again, renewed)

    def test_not_renewed_while_a_bio_holds_bytes(self) -> None:
        self._pump()
        connection = self.server._tlsConnection
        self.client.send(b"unread request")
        connection.bio_write(self.client.bio_read(65536))
        self.assertFalse(renew_memory_bios(connection))
        self.assertEqual(connection.recv(100), b"unread request")
        connection.send(b"unsent answer")
        self.assertFalse(renew_memory_bios(connection))
        self.client.bio_write(connection.bio_read(65536))
        self.assertEqual(self.client.recv(100), b"unsent answer")
        self.assertTrue(renew_memory_bios(connection))
        self.assertEqual(self._echo(b"after"), b"after")
