"""The TLS layer of the HTTPS listener: Twisted's (BufferingTLSTransport), without the reference
cycle it leaves when a connection ends in a TLS error, and with its per-connection set-up done
once instead of several times (see `TLSServerProtocol.makeConnection`), and with the memory
its handshake left behind given back (`renew_memory_bios`).

When the peer goes away mid-handshake (slowloris, scanners, half-open clients), Twisted's
``_flushReceiveBIO`` catches the ``SSL.Error`` into a local ``Failure`` whose traceback holds
the very frame that holds it, and with it the pyOpenSSL connection (about 25 KiB of OpenSSL
state) and the TLS protocol. Only a full garbage collection frees that, and the tuned
collector (``lifecycle.tune_gc``) runs those rarely. `TLSServerProtocol` drops the failure's
traceback once Twisted has taken what it reports (type, value and the frames as text stay), so
the connection is freed by reference counting when it closes.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementedBy, providedBy

__all__ = ["TLSServerFactory", "TLSServerProtocol"]


# (protocol class, transport class) -> the declaration ``directlyProvides`` would make.
_declarations: dict[tuple[type, type], Any] = {}


def _declare_transport_interfaces(protocol: Any, transport: ITransport) -> None:
    """``directlyProvides(protocol, providedBy(transport))``, computed once per pair of classes
    (zope normalises the arguments on every call, which is slow)."""
    key = (type(protocol), type(transport))
    declared = _declarations.get(key)
    if declared is None:
        directlyProvides(protocol, providedBy(transport))
        if providedBy(transport) is implementedBy(type(transport)):  # nothing per instance
            _declarations[key] = protocol.__provides__
    else:
        protocol.__provides__ = declared


def renew_memory_bios(connection: SSL.Connection) -> bool:
    """Give ``connection`` two new, empty memory BIOs if both of its own are drained.

    A memory BIO never shrinks: after a TLS 1.3 handshake the outgoing one keeps room for the
    server's whole first flight (certificate chain, signature, tickets) and the incoming one
    for the ClientHello, memory an idle keep-alive connection holds for nothing
    (``python -m bench.tls_memory`` measures it; bench/README.md). The new pair only
    grows to the size of the requests and answers. Returns whether it renewed; the BIOs are
    pyOpenSSL's private state (pyOpenSSL 23-26), covered by tests/tls/test_protocol.py.
    """
    old_in, old_out = connection._into_ssl, connection._from_ssl
    if old_in is None or any(_lib.BIO_get_mem_data(b, _ffi.NULL) for b in (old_in, old_out)):
        return False  # a socket connection, or bytes still to read or to send
    new_in = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_in == _ffi.NULL or new_out == _ffi.NULL:  # out of memory: keep the old pair
        _lib.BIO_free(new_in)  # BIO_free(NULL) does nothing
        _lib.BIO_free(new_out)
        return False
    # SSL_set_bio takes both new BIOs and frees both old ones (none is shared).
    _lib.SSL_set_bio(connection._ssl, new_in, new_out)
    connection._into_ssl, connection._from_ssl = new_in, new_out
    return True


class TLSServerProtocol(BufferingTLSTransport):
    # Twisted's default server protocol: it aggregates small writes into one TLS record, which
    # HTTPS keep-alive needs (bench/README.md).

    def makeConnection(self, transport: ITransport) -> None:
        # TLSMemoryBIOProtocol.makeConnection (Twisted 22.x-26.x, private state), doing once
        # what it does twice or nine times: it declares the transport's interfaces with one
        # directlyProvides per interface (each replacing the last), then
        # ProtocolWrapper.makeConnection declares them all again and repeats
        # Protocol.makeConnection and registerProtocol, a cost on every new TLS connection.
        # Covered by tests/tls/test_protocol.py.
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        # Set here, with the others, not first after the handshake: an attribute added to an
        # instance late can make Python give it a dict of its own.
        self._bios_renewed = False
        _declare_transport_interfaces(self, transport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    def _flushSendBIO(self) -> None:
        # Private Twisted hook: every TLS byte leaves through here, so this is where both
        # BIOs are empty at some point soon after the handshake.
        super()._flushSendBIO()
        if self._handshakeDone and not self._bios_renewed:
            self._bios_renewed = renew_memory_bios(self._tlsConnection)

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        # Private Twisted hook (twisted.protocols.tls, 22.x-26.x): called with the Failure of
        # the TLS error, or None for a clean shutdown. Covered by tests/tls/test_protocol.py.
        super()._tlsShutdownFinished(reason)
        if reason is not None:
            reason.cleanFailure()


class TLSServerFactory(TLSMemoryBIOFactory):
    protocol: Any = TLSServerProtocol
