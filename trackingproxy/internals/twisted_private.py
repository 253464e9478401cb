"""Every use of Twisted's private internals (checked with Twisted 26.4 to 26.10; setup.cfg keeps
Twisted below 27). `missing` lists what a release lacks of it; tests/test_internals.py runs it.

- twisted.web._newclient: the failure types the upstream client reports (its HTTP/1.1 client
  protocol is a drop-in for the part of ``HTTP11ClientProtocol`` the pool uses), and the checks
  of a method and a target.
- twisted.internet._sslverify: the trust-root interface of ``optionsForClientTLS``.
- twisted.protocols.tls: `TLSServerBase`, the TLS server protocol set up once per connection
  instead of several times, with a hook once the handshake's bytes have left, and without the
  reference cycle Twisted's TLS error handling leaves.
- twisted.internet.tcp: the optimistic write and close of `trackingproxy.ops.tcpwrite`.
- the reactor's exit signal (twistd re-raises it) and the resolv.conf timer of the
  twisted.names client (left running at shutdown otherwise).
- twisted.logger's global publisher: its observers (twistd's text or JSON file observer) are
  wrapped in a filter once logging has begun (`wrap_log_observers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet import abstract, main, tcp
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web._newclient import (
    ParseError,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    TransportProxyProducer,
)
from zope.interface import directlyProvides, implementedBy, implementer, providedBy

__all__ = [
    "DECLARATIONS",
    "IOpenSSLTrustRoot",
    "ParseError",
    "ProxyProducer",
    "RequestGenerationFailed",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseFailed",
    "ResponseNeverReceived",
    "TLSServerBase",
    "TransportProxyProducer",
    "ensure_valid_method",
    "ensure_valid_uri",
    "forget_exit_signal",
    "install_optimistic_tcp",
    "missing",
    "optimistic_tcp_installed",
    "stop_resolv_conf_timer",
    "uninstall_optimistic_tcp",
    "wrap_log_observers",
]

ensure_valid_method = _newclient._ensureValidMethod
ensure_valid_uri = _newclient._ensureValidURI


_TCP_NAMES = (
    "_tempDataBuffer",
    "dataBuffer",
    "offset",
    "_writeDisconnected",
    "_writeDisconnecting",
    "_aborting",
    "writeSomeData",
    "_shouldShutdown",
)


def missing() -> list[str]:
    """The internals this module uses that the installed Twisted does not have."""
    import socket

    from twisted.internet.testing import MemoryReactor
    from twisted.logger import globalLogPublisher
    from twisted.protocols.tls import TLSMemoryBIOFactory

    lacking = [] if isinstance(getattr(globalLogPublisher, "_observers", None), list) else [
        "twisted.logger.LogPublisher._observers"
    ]
    lacking += [
        f"twisted.web._newclient.{name}"
        for name in ("_ensureValidMethod", "_ensureValidURI", "TransportProxyProducer")
        if not hasattr(_newclient, name)
    ]
    if "_producer" not in TransportProxyProducer.__init__.__code__.co_names:
        lacking.append("TransportProxyProducer._producer")
    lacking += [
        f"BufferingTLSTransport.{name}"
        for name in ("_flushSendBIO", "_tlsShutdownFinished", "_checkHandshakeStatus")
        if not hasattr(BufferingTLSTransport, name)
    ]
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    factory = TLSMemoryBIOFactory(_Creator(context), False, Factory.forProtocol(Protocol))
    if not hasattr(factory, "_creatorCallable"):
        lacking.append("TLSMemoryBIOFactory._creatorCallable")
    left, right = socket.socketpair()
    try:
        connection = tcp.Connection(left, Protocol(), reactor=MemoryReactor())
        lacking += [
            f"tcp.Connection.{name}" for name in _TCP_NAMES if not hasattr(connection, name)
        ]
    finally:
        left.close()
        right.close()
    return lacking


@implementer(IOpenSSLServerConnectionCreator)
class _Creator:
    """``context`` as the connection creator a TLSMemoryBIOFactory wants."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class ProxyProducer(TransportProxyProducer):
    """Twisted's TransportProxyProducer, with the transport it proxies readable (None once
    ``stopProxying`` was called)."""

    @property
    def proxied(self) -> Any:
        return self._producer


# -- TLS ---------------------------------------------------------------------------------------
# (protocol class, transport class) -> the declaration ``directlyProvides`` would make.
DECLARATIONS: dict[tuple[type, type], Any] = {}


def _declare_transport_interfaces(protocol: Any, transport: ITransport) -> None:
    """``directlyProvides(protocol, providedBy(transport))``, computed once per pair of classes
    (zope normalises the arguments on every call, which is slow)."""
    key = (type(protocol), type(transport))
    declared = DECLARATIONS.get(key)
    if declared is None:
        directlyProvides(protocol, providedBy(transport))
        if providedBy(transport) is implementedBy(type(transport)):  # nothing per instance
            DECLARATIONS[key] = protocol.__provides__
    else:
        protocol.__provides__ = declared


class TLSServerBase(BufferingTLSTransport):
    """Twisted's default TLS server protocol (it aggregates small writes into one record),
    set up once per connection, calling `after_handshake_flush` with the pyOpenSSL connection
    each time bytes have left after the handshake until it returns True, and dropping the
    traceback of a TLS error's Failure once Twisted has reported it (it held the connection,
    OpenSSL state and all, in a reference cycle)."""

    after_handshake_done = False  # after_handshake_flush returned True

    def makeConnection(self, transport: ITransport) -> None:
        # TLSMemoryBIOProtocol.makeConnection, doing once what it does twice or nine times: it
        # declares the transport's interfaces with one directlyProvides per interface (each
        # replacing the last), then ProtocolWrapper.makeConnection declares them all again and
        # repeats Protocol.makeConnection and registerProtocol.
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        # Set here, with the others, not first after the handshake: an attribute added to an
        # instance late can make Python give it a dict of its own.
        self.after_handshake_done = False
        _declare_transport_interfaces(self, transport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    def after_handshake_flush(self, connection: SSL.Connection) -> bool:
        """Bytes have left after the handshake; return True to be called no more."""
        return True

    def _flushSendBIO(self) -> None:
        # Every TLS byte leaves through here.
        super()._flushSendBIO()
        if self._handshakeDone and not self.after_handshake_done:
            self.after_handshake_done = self.after_handshake_flush(self._tlsConnection)

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        # Called with the Failure of the TLS error, or None for a clean shutdown.
        super()._tlsShutdownFinished(reason)
        if reason is not None:
            reason.cleanFailure()


# -- TCP ---------------------------------------------------------------------------------------
_original_write = abstract.FileDescriptor.write
_original_lose_connection = abstract.FileDescriptor.loseConnection


def _nothing_buffered(self: tcp.Connection) -> bool:
    return not self._tempDataBuffer and len(self.dataBuffer) == self.offset


def _write(self: tcp.Connection, data: bytes) -> None:
    if (
        data
        and self.connected
        and not self.disconnecting
        and not self._writeDisconnected
        and _nothing_buffered(self)
        and type(data) is bytes
    ):
        sent = self.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    _original_write(self, data)


def _lose_connection(self: tcp.Connection) -> None:
    if (
        self.connected
        and not self.disconnecting
        and not self._writeDisconnected
        and not self._writeDisconnecting
        and self.producer is None
        and _nothing_buffered(self)
    ):
        self.stopReading()
        self.disconnecting = True
        self.reactor.callLater(0, _close_flushed, self)  # type: ignore[attr-defined]
        return
    _original_lose_connection(self)


def _close_flushed(self: tcp.Connection) -> None:
    if not self.connected or self._aborting:
        return  # the peer or abortConnection was faster
    if self.producer is not None or not _nothing_buffered(self):
        # Written to (or given a producer) since: Twisted's path, doWrite flushes, then closes.
        self.startWriting()
        return
    self.connectionLost(Failure(main.CONNECTION_DONE))


_PATCHED = ("write", "loseConnection", "_shouldShutdown")
_saved: dict[str, object] = {}  # what tcp.Connection itself defined before install()


def install_optimistic_tcp() -> None:
    """Use optimistic writes and closes for every TCP connection of this process (idempotent)."""
    if _saved:
        return
    _saved.update({name: tcp.Connection.__dict__.get(name, _saved) for name in _PATCHED})
    tcp.Connection.write = _write  # type: ignore[assignment,method-assign]
    tcp.Connection.loseConnection = _lose_connection  # type: ignore[assignment,method-assign]
    tcp.Connection._shouldShutdown = False


def optimistic_tcp_installed() -> bool:
    return bool(_saved)


def uninstall_optimistic_tcp() -> None:
    """Give TCP connections Twisted's own write and close back (for tests that install)."""
    saved = dict(_saved)
    _saved.clear()
    for name, value in saved.items():
        if value is _saved:  # the sentinel: not defined on the class itself, inherited
            delattr(tcp.Connection, name)
        else:
            setattr(tcp.Connection, name, value)


# -- the reactor and the resolver --------------------------------------------------------------
def forget_exit_signal(reactor: Any, signum: int) -> None:
    """twistd re-raises the signal that stopped the reactor (exit status 143 for SIGTERM);
    forget ``signum`` so that a stop we handled gracefully exits with status 0."""
    if getattr(reactor, "_exitSignal", None) == signum:
        reactor._exitSignal = None


def stop_resolv_conf_timer(names: Any) -> None:
    """Cancel the timers with which twisted.names client resolvers re-read resolv.conf (left
    pending at shutdown otherwise)."""
    for resolver in getattr(names, "resolvers", ()):
        call = getattr(resolver, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()


# -- logging ---------------------------------------------------------------------------------
def wrap_log_observers(wrap: Callable[[ILogObserver], ILogObserver]) -> int:
    """Replace every observer of the global log publisher (under twistd: the log file's) by
    ``wrap(observer)``; the number wrapped. Call once logging has begun."""
    from twisted.logger import globalLogPublisher

    observers: list[ILogObserver] = globalLogPublisher._observers
    observers[:] = [wrap(o) for o in observers]
    return len(observers)
