"""Certificate selection at handshake: a dict from server name to a prebuilt SSL.Context.

The map is read on every handshake and replaced entry by entry when a certificate changes; no
disk I/O and no exceptions inside the servername callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from trackingproxy.tls.certificates import LoadedCertificate
from trackingproxy.tls.policy import ALPN_PROTOCOLS, make_context

CertificateListener = Callable[[str], None]


@implementer(IOpenSSLServerConnectionCreator)
class SNIContextMap:
    """Holds the served certificate per configured domain and makes TLS server connections.

    ``domains`` is the ordered list of configured names; a client without SNI gets the first one
    that has a certificate. Names that have none fail the handshake; other names keep working.
    """

    def __init__(self, domains: Iterable[str], alpn: Iterable[bytes] = ALPN_PROTOCOLS) -> None:
        self._domains: list[str] = list(domains)
        self._alpn = tuple(alpn)
        self._session_id = b"trackingproxy-sessions"
        self._contexts: dict[bytes, SSL.Context] = {}
        self._certs: dict[str, LoadedCertificate] = {}
        self._default: SSL.Context | None = None
        self._listeners: list[CertificateListener] = []
        self._dispatch = make_context(
            None, self._alpn, servername_callback=self._on_servername, session_id=self._session_id
        )

    # -- selection (hot path) -------------------------------------------------------------
    def _on_servername(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        ctx = self._default if name is None else self._contexts.get(name.lower().rstrip(b"."))
        if ctx is not None:
            connection.set_context(ctx)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._dispatch, None)

    # -- management ----------------------------------------------------------------------
    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self._domains)

    def set_domains(self, domains: Iterable[str]) -> None:
        """Change the configured names; certificates of removed names stop being served."""
        self._domains = list(domains)
        for name in list(self._certs):
            if name not in self._domains:
                del self._certs[name]
                self._contexts.pop(name.encode("ascii"), None)
        self._refresh_default()

    def install(
        self, cert: LoadedCertificate, names: Iterable[str] | None = None
    ) -> tuple[str, ...]:
        """Serve ``cert`` for ``names`` (default: every configured domain it covers).

        One new context is built for the certificate and shared by the names it serves; the
        contexts of established connections are left alone. Returns the names now served.
        """
        targets = tuple(names) if names is not None else cert.covered(self._domains)
        targets = tuple(n for n in targets if n in self._domains and cert.covers(n))
        if not targets:
            return ()
        ctx = make_context(cert, self._alpn, session_id=self._session_id)
        for name in targets:
            self._certs[name] = cert
            self._contexts[name.encode("ascii")] = ctx
        self._refresh_default()
        for name in targets:
            for listener in list(self._listeners):
                listener(name)
        return targets

    def remove(self, name: str) -> None:
        self._certs.pop(name, None)
        self._contexts.pop(name.encode("ascii"), None)
        self._refresh_default()

    def certificate_for(self, name: str) -> LoadedCertificate | None:
        return self._certs.get(name)

    def has_certificate(self, name: str) -> bool:
        return name in self._certs

    def add_listener(self, listener: CertificateListener) -> None:
        """Call ``listener(name)`` whenever the certificate served for ``name`` changes."""
        self._listeners.append(listener)

    def _refresh_default(self) -> None:
        self._default = None
        for name in self._domains:
            ctx = self._contexts.get(name.encode("ascii"))
            if ctx is not None:
                self._default = ctx
                return
