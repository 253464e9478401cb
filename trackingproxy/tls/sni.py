# -*- test-case-name: tests.tls.test_sni,tests.tls.test_handshakes -*-
"""Certificate selection at handshake: the SNI map, from server name to what the handshake needs.

Everything a handshake needs is ready when a certificate is installed: the context of its
intermediate chain (``policy.make_context``: the policy, ALPN, the chain; one per distinct chain,
shared by every certificate issued under it) and its leaf and key as OpenSSL objects (made when
the certificate value was). The
servername callback is a dict lookup, then ``set_context`` and ``use_leaf`` (references, no
parsing): no disk I/O and no exceptions in it. A renewal replaces the name's entry; connections
already made keep what they were given.

Bounds, for 10,000 domains on one instance: a served name costs a few hundred bytes of map;
the leaf and key are the certificate value's own OpenSSL objects (7.4 KiB for ECDSA P-256 with
OpenSSL 4), shared, not copied; an SSL.Context per certificate would add 19 KiB each
(tests/tls/test_memory.py).
Installing a certificate is linear in its names, ``set_domains`` in domains + served names, and
the default (what a client without SNI gets) is kept in a heap, not searched for: 10,000
certificates install in about a second (tests/tls/test_sni.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import final

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from trackingproxy.internals.pyopenssl_private import use_leaf
from trackingproxy.tls.certificates import LoadedCertificate, parent
from trackingproxy.tls.policy import ALPN_PROTOCOLS, make_context

CertificateListener = Callable[[str], None]


@final
class _Chain:
    """The context shared by the certificates issued under one intermediate chain.

    @ivar der: the chain's certificates, DER, concatenated (its key in the map).
    @ivar context: the policy and the chain; no leaf, no key.
    @ivar names: how many served names use it (it is dropped at zero).
    """

    __slots__ = ("context", "der", "names")

    def __init__(self, der: bytes, context: SSL.Context) -> None:
        self.der = der
        self.context = context
        self.names = 0


@final
class _Served:
    """What a handshake for a name of one installed certificate needs, made once.

    @ivar cert: the certificate value (for ``certificate_for``).
    @ivar chain: the shared context of its chain.
    @ivar leaf: the leaf certificate as an OpenSSL object.
    @ivar key: the private key as an OpenSSL object.
    """

    __slots__ = ("cert", "chain", "key", "leaf")

    def __init__(self, cert: LoadedCertificate, chain: _Chain) -> None:
        self.cert = cert
        self.chain = chain
        self.leaf = cert.openssl_leaf  # the certificate's own objects: shared, not copied
        self.key = cert.openssl_key


def _key(name: str) -> bytes:
    # Served names are configured names: ASCII (IDNA). Anything else is never a key.
    return name.encode("ascii", "replace")


@implementer(IOpenSSLServerConnectionCreator)
class SNIContextMap:
    """Holds the served certificate per configured domain and makes TLS server connections.

    ``domains`` is the ordered list of configured names; a client without SNI gets the first one
    that has a certificate. Names that have none fail the handshake; other names keep working.

    @ivar _served: server name (bytes, as the callback gets it) -> what its handshake needs.
    @ivar _chains: chain DER -> the context shared by that chain's certificates.
    @ivar _position: configured name -> its place in ``_domains``.
    @ivar _under: parent name -> configured names under it (for wildcards), made when needed.
    @ivar _order: a heap of the places of served names (stale ones popped lazily).
    @ivar _default: what a handshake without SNI gets.
    """

    def __init__(self, domains: Iterable[str], alpn: Iterable[bytes] = ALPN_PROTOCOLS) -> None:
        self._alpn = tuple(alpn)
        self._session_id = b"trackingproxy-sessions"
        self._served: dict[bytes, _Served] = {}
        self._chains: dict[bytes, _Chain] = {}
        self._domains: tuple[str, ...] = ()
        self._position: dict[str, int] = {}
        self._under: dict[str, list[str]] | None = None
        self._order: list[int] = []
        self._default: _Served | None = None
        self._listeners: list[CertificateListener] = []
        self._dispatch = make_context(
            (), self._alpn, servername_callback=self._on_servername, session_id=self._session_id
        )
        self.set_domains(domains)

    # -- selection (hot path) -------------------------------------------------------------
    def _on_servername(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        served = self._default if name is None else self._served.get(name.lower().rstrip(b"."))
        if served is not None:
            connection.set_context(served.chain.context)
            use_leaf(connection, served.leaf, served.key)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._dispatch, None)

    # -- management ----------------------------------------------------------------------
    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains

    @property
    def chain_contexts(self) -> int:
        """How many SSL.Contexts the served certificates share (one per distinct chain)."""
        return len(self._chains)

    def set_domains(self, domains: Iterable[str]) -> None:
        """Change the configured names; certificates of removed names stop being served."""
        self._domains = tuple(domains)
        position: dict[str, int] = {}
        for i, name in enumerate(self._domains):
            position.setdefault(name, i)
        self._position = position
        self._under = None
        gone = [k for k in self._served if k.decode("ascii") not in position]
        for key in gone:
            self._release(self._served.pop(key))
        self._rebuild_order()
        self._refresh_default()

    def install(
        self, cert: LoadedCertificate, names: Iterable[str] | None = None
    ) -> tuple[str, ...]:
        """Serve ``cert`` for ``names`` (default: every configured domain it covers).

        The leaf and key are made into OpenSSL objects once, shared by the names served; the
        chain's context is shared with every certificate of the same chain; connections already
        made are left alone. Returns the names now served. Raises ValueError if the key is not
        the leaf's.
        """
        if names is None:
            targets = self._covered(cert)
        else:
            targets = tuple(n for n in names if n in self._position and cert.covers(n))
        if not targets:
            return ()
        served = self._prepare(cert, targets)
        for name in targets:
            self._put(name, served)
        self._refresh_default()
        for name in targets:
            for listener in list(self._listeners):
                listener(name)
        return targets

    def remove(self, name: str) -> None:
        old = self._served.pop(_key(name), None)
        if old is not None:
            self._release(old)
        self._refresh_default()

    def certificate_for(self, name: str) -> LoadedCertificate | None:
        served = self._served.get(_key(name))
        return None if served is None else served.cert

    def has_certificate(self, name: str) -> bool:
        return _key(name) in self._served

    def add_listener(self, listener: CertificateListener) -> None:
        """Call ``listener(name)`` whenever the certificate served for ``name`` changes."""
        self._listeners.append(listener)

    # -- bookkeeping ---------------------------------------------------------------------
    def _covered(self, cert: LoadedCertificate) -> tuple[str, ...]:
        """The configured names ``cert`` covers, in their order (work in its own names)."""
        position = self._position
        found = {n for n in cert.exact_names if n in position}
        if cert.wildcard_suffixes:
            if self._under is None:
                under: dict[str, list[str]] = {}
                for name in position:
                    above = parent(name)
                    if above is not None:
                        under.setdefault(above, []).append(name)
                self._under = under
            for suffix in cert.wildcard_suffixes:
                found.update(self._under.get(suffix, ()))
        return tuple(sorted(found, key=position.__getitem__))

    def _prepare(self, cert: LoadedCertificate, targets: tuple[str, ...]) -> _Served:
        for name in targets:
            current = self._served.get(_key(name))
            if current is not None and current.cert is cert:
                return current  # installed again: share what was made
        if not cert.key_matches:
            raise ValueError(f"{cert.source}: the private key does not match the certificate")
        extra = cert.intermediates
        der = b"".join(c.public_bytes(Encoding.DER) for c in extra)
        chain = self._chains.get(der)
        if chain is None:
            context = make_context(extra, self._alpn, session_id=self._session_id)
            chain = self._chains[der] = _Chain(der, context)
        return _Served(cert, chain)

    def _put(self, name: str, served: _Served) -> None:
        key = _key(name)
        old = self._served.get(key)
        if old is served:
            return
        self._served[key] = served
        served.chain.names += 1
        if old is None:
            heapq.heappush(self._order, self._position[name])
            if len(self._order) > 2 * len(self._served) + 64:
                self._rebuild_order()
        else:
            self._release(old)

    def _release(self, old: _Served) -> None:
        old.chain.names -= 1
        if old.chain.names == 0:
            # Connections that use it hold their own reference; new ones no longer get it.
            del self._chains[old.chain.der]

    def _rebuild_order(self) -> None:
        self._order = [self._position[k.decode("ascii")] for k in self._served]
        heapq.heapify(self._order)

    def _refresh_default(self) -> None:
        order, served, domains = self._order, self._served, self._domains
        while order and _key(domains[order[0]]) not in served:
            heapq.heappop(order)
        self._default = served[_key(domains[order[0]])] if order else None
