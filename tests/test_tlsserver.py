"""The HTTPS listener's TLS layer: a connection that ends in a TLS error (the peer gone
mid-handshake) is freed by reference counting, without the garbage collector."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.certs import issue, make_ca
from trackingproxy.tlsserver import TLSServerFactory

# The start of a ClientHello: the peer goes away before the rest.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20


def _cut_mid_handshake(
    factory_class: type[TLSMemoryBIOFactory],
) -> tuple[weakref.ref[Any], weakref.ref[Any]]:
    leaf = issue(make_ca(), "click.example.com")
    pem = leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes()
    options = PrivateCertificate.loadPEM(pem).options()
    factory = factory_class(options, False, Factory.forProtocol(Protocol))
    factory.doStart()
    protocol = factory.buildProtocol(None)
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
