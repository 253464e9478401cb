"""The private internals of Twisted and pyOpenSSL that the proxy relies on are still there, with
the shape it uses: on a release whose internals differ, this fails first, with a message that
names the module that must be adapted (setup.cfg bounds both packages to the releases checked).

- trackingproxy/tls/protocol.py: TLSMemoryBIOProtocol's set-up and hooks; pyOpenSSL's memory
  BIOs of a connection.
- trackingproxy/tls/policy.py: the OpenSSL context behind a pyOpenSSL Context (groups list).
- trackingproxy/ops/tcpwrite.py: the TCP connection's write buffer and close state.
- trackingproxy/upstream/http1.py, client.py: twisted.web._newclient's failure types.
"""

from __future__ import annotations

import socket
from typing import Any

import OpenSSL
from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

import twisted
from tests.certs import ServerTLS, issue, make_ca


def _versions() -> str:
    return f"Twisted {twisted.__version__}, pyOpenSSL {OpenSSL.__version__}"


def _missing(owner: Any, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not hasattr(owner, name)]


def test_twisted_tls_internals() -> None:
    """The TLS protocol's private set-up state and hooks that tls/protocol.py overrides."""
    factory = TLSMemoryBIOFactory(
        ServerTLS(issue(make_ca(), "click.example.com")), False, Factory.forProtocol(Protocol)
    )
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, BufferingTLSTransport)
    class_names = ("_flushSendBIO", "_tlsShutdownFinished", "_checkHandshakeStatus")
    missing = _missing(BufferingTLSTransport, class_names)
    missing += _missing(factory, ("_creatorCallable",))
    missing += _missing(protocol, ("_connectWrapped", "_handshakeDone"))
    assert missing == [], (
        f"{_versions()}: Twisted's TLS internals changed ({missing}); adapt "
        "trackingproxy/tls/protocol.py, or keep twisted below this release (setup.cfg)"
    )


def test_pyopenssl_internals() -> None:
    """A pyOpenSSL Connection's memory BIOs and SSL pointer, a Context's SSL_CTX pointer, and
    the cffi binding module (OpenSSL._util)."""
    from OpenSSL import _util

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    connection = SSL.Connection(context, None)
    missing = _missing(connection, ("_into_ssl", "_from_ssl", "_ssl"))
    missing += _missing(context, ("_context",))
    missing += _missing(_util, ("ffi", "lib"))
    missing += _missing(_util.lib, ("SSL_set_bio", "BIO_new", "BIO_s_mem", "BIO_get_mem_data"))
    assert missing == [], (
        f"{_versions()}: pyOpenSSL's internals changed ({missing}); adapt "
        "trackingproxy/tls/protocol.py and tls/policy.py, or keep pyopenssl below this release"
    )


def test_twisted_tcp_internals() -> None:
    """The write buffer and close state of a TCP connection that ops/tcpwrite.py reads."""
    left, right = socket.socketpair()
    connection = tcp.Connection(left, Protocol(), reactor=MemoryReactor())
    try:
        names = (
            "_tempDataBuffer", "dataBuffer", "offset", "_writeDisconnected",
            "_writeDisconnecting", "_aborting", "producer", "writeSomeData", "disconnecting",
        )  # fmt: skip
        missing = _missing(connection, names)
        assert missing == [], (
            f"{_versions()}: Twisted's TCP connection changed ({missing}); adapt "
            "trackingproxy/ops/tcpwrite.py, or keep twisted below this release (setup.cfg)"
        )
    finally:
        left.close()
        right.close()


def test_twisted_newclient_names() -> None:
    """The failure types and helpers of twisted.web._newclient the upstream client uses."""
    from twisted.web import _newclient

    names = (
        "ParseError", "RequestNotSent", "RequestTransmissionFailed", "RequestGenerationFailed",
        "ResponseDone", "ResponseFailed", "ResponseNeverReceived", "TransportProxyProducer",
        "_ensureValidMethod", "_ensureValidURI",
    )  # fmt: skip
    missing = _missing(_newclient, names)
    assert missing == [], (
        f"{_versions()}: twisted.web._newclient changed ({missing}); adapt "
        "trackingproxy/upstream/http1.py and client.py, or keep twisted below this release"
    )
