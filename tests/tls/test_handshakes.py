"""Real TLS handshakes against the SNI map (in memory, no sockets): with one context per chain
and the leaf and key given per connection, each name gets its own leaf and the right chain,
ALPN, session resumption (tickets, TLS 1.2 and 1.3), the no-SNI default, the refusal of unknown
names and renewal all behave as with one context per certificate.

Clients: the standard library's ``ssl`` (the system's OpenSSL, verifying against the test root)
and, to see the exact chain sent, a pyOpenSSL client."""

from __future__ import annotations

import contextlib
import gc
import ssl
import warnings
from typing import Any

import trustme
from cryptography import x509
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tests.certs import loaded
from tests.tls.manycerts import Hierarchy, make_hierarchy
from trackingproxy.tls.certificates import LoadedCertificate
from trackingproxy.tls.sni import SNIContextMap

A, B, C, D = "a.example.com", "b.example.com", "c.example.com", "rsa.example.com"

_HIERARCHY: Hierarchy | None = None


def hierarchy() -> Hierarchy:
    global _HIERARCHY
    if _HIERARCHY is None:
        _HIERARCHY = make_hierarchy(2)
    return _HIERARCHY


class _Client:
    """A stdlib ``ssl`` client joined to one server connection of ``sni`` by memory BIOs."""

    tls: ssl.SSLObject

    def __init__(
        self,
        sni: SNIContextMap,
        trusted: bytes,
        name: str | None,
        alpn: list[str] | None = None,
        version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        resume: _Client | None = None,
    ) -> None:
        if resume is not None:  # the same client context, offering the session it got
            context, session = resume.tls.context, resume.tls.session
        else:
            context, session = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), None
            context.load_verify_locations(cadata=trusted.decode())
            context.check_hostname = name is not None
            context.minimum_version = context.maximum_version = version
            if alpn:
                context.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=name, session=session
        )
        self.server = sni.serverConnectionForTLS(None)  # type: ignore[arg-type]
        self.server.set_accept_state()

    def _to_client(self) -> bool:
        moved = False
        while True:
            try:
                data = self.server.bio_read(65536)
            except SSL.WantReadError:
                return moved
            self.incoming.write(data)
            moved = True

    def pump(self) -> None:
        """Move bytes both ways until neither side has more; raise what either side raised."""
        for _ in range(20):
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.do_handshake()
            data = self.outgoing.read()
            if data:
                self.server.bio_write(data)
                try:
                    self.server.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error:
                    self._to_client()  # the alert
                    raise
            if not self._to_client() and not data:
                return
        raise AssertionError("the handshake never settled")

    def handshake(self) -> _Client:
        self.pump()
        # TLS 1.3 tickets come after the handshake: read them.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.read()
        return self

    def exchange(self, request: bytes, answer: bytes) -> bytes:
        """Send ``request``, have the server read it and answer; return what the client read."""
        self.tls.write(request)
        self.server.bio_write(self.outgoing.read())
        assert self.server.recv(65536) == request
        self.server.sendall(answer)
        self._to_client()
        return self.tls.read(65536)

    @property
    def leaf(self) -> x509.Certificate:
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def _pyopenssl_chain(sni: SNIContextMap, name: str) -> list[x509.Certificate]:
    """The certificates (leaf first) the server sends for ``name``, as a client sees them."""
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    client.set_tlsext_host_name(name.encode())
    server = sni.serverConnectionForTLS(None)  # type: ignore[arg-type]
    server.set_accept_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                a.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(65536))
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain is not None
    return chain


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        h = hierarchy()
        self.first, self.second = h.intermediates
        self.trusted = h.root_pem
        self.rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
        self.sni = SNIContextMap([A, B, C, D])
        self.a = self.first.loaded(A)
        self.b = self.second.loaded(B)
        self.c = self.first.loaded(C)
        self.rsa = loaded(self.rsa_ca.issue_cert(D, key_type=trustme.KeyType.RSA))
        for cert in (self.a, self.b, self.c, self.rsa):
            self.sni.install(cert)

    def client(self, name: str | None, **kw: Any) -> _Client:
        trusted = self.rsa_ca.cert_pem.bytes() if name == D else self.trusted
        return _Client(self.sni, trusted, name, **kw)

    def test_each_name_gets_its_leaf_and_its_chain(self) -> None:
        """Every name is served its own leaf followed by the intermediate that issued it (the
        client verifies against the root alone), three chains sharing three contexts."""
        self.assertEqual(self.sni.chain_contexts, 3)
        for name, cert, issuer in ((A, self.a, self.first), (B, self.b, self.second),
                                   (C, self.c, self.first)):  # fmt: skip
            self.assertEqual(_pyopenssl_chain(self.sni, name), [cert.leaf, issuer.cert])
            self.assertEqual(self.client(name).handshake().leaf, cert.leaf)
        self.assertEqual(_pyopenssl_chain(self.sni, D), [self.rsa.leaf])

    def test_rsa_and_ecdsa_leaves_under_tls12(self) -> None:
        """The cipher suite follows the leaf given to the connection: ECDHE-RSA for the RSA
        certificate, ECDHE-ECDSA for the ECDSA one."""
        rsa = self.client(D, version=ssl.TLSVersion.TLSv1_2).handshake()
        ecdsa = self.client(A, version=ssl.TLSVersion.TLSv1_2).handshake()
        self.assertEqual(rsa.leaf, self.rsa.leaf)
        self.assertIn("ECDHE-RSA", str(rsa.tls.cipher()))
        self.assertIn("ECDHE-ECDSA", str(ecdsa.tls.cipher()))

    def test_alpn(self) -> None:
        """ALPN picks h2 when offered, else http/1.1, and nothing for a client without ALPN."""
        h2 = self.client(A, alpn=["http/1.1", "h2"]).handshake()
        http11 = self.client(B, alpn=["http/1.1"]).handshake()
        plain = self.client(C).handshake()
        self.assertEqual(h2.tls.selected_alpn_protocol(), "h2")
        self.assertEqual(http11.tls.selected_alpn_protocol(), "http/1.1")
        self.assertIsNone(plain.tls.selected_alpn_protocol())

    def test_session_resumption_with_tickets(self) -> None:
        """A second connection resumes the first one's session, over TLS 1.3 and TLS 1.2, for
        names under different chains."""
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            for name in (A, B, D):
                first = self.client(name, version=version).handshake()
                self.assertFalse(first.tls.session_reused)
                again = self.client(name, resume=first)
                self.assertTrue(again.handshake().tls.session_reused, (version, name))
                self.assertEqual(again.exchange(b"GET", b"200"), b"200")

    def test_client_without_sni_gets_the_first_configured_name(self) -> None:
        """No SNI: the certificate of the first configured name that has one; when it goes,
        the next one's."""
        self.assertEqual(self.client(None).handshake().leaf, self.a.leaf)
        self.sni.remove(A)
        self.assertEqual(self.client(None).handshake().leaf, self.b.leaf)

    def test_unknown_name_fails_the_handshake(self) -> None:
        """A name without a certificate fails its handshake (handshake_failure alert); the
        others keep working."""
        client = self.client("unknown.example.com")
        client.tls.context.check_hostname = False
        with self.assertRaises(SSL.Error):
            client.pump()
        with self.assertRaises(ssl.SSLError):
            client.tls.do_handshake()
        self.assertEqual(self.client(A).handshake().leaf, self.a.leaf)

    def test_renewal_switches_new_handshakes_and_spares_open_connections(self) -> None:
        """Installing a new certificate for a name serves it to new handshakes; a connection
        made before keeps working, even after its chain's context left the map."""
        before = self.client(B).handshake()
        renewed = self.first.loaded(B)
        self.assertEqual(self.sni.install(renewed), (B,))
        self.assertEqual(self.sni.chain_contexts, 2)  # the second chain has no name left
        gc.collect()
        self.assertEqual(self.client(B).handshake().leaf, renewed.leaf)
        self.assertEqual(before.leaf, self.b.leaf)
        self.assertEqual(before.exchange(b"GET /f/1", b"HTTP/1.1 200"), b"HTTP/1.1 200")
        self.assertIs(self.sni.certificate_for(B), renewed)

    def test_no_warning_and_no_conversion_per_handshake(self) -> None:
        """The servername callback gives the prebuilt OpenSSL objects: pyOpenSSL warns of
        nothing (its own objects passed to its public API would be deprecated)."""
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for name in (A, B, D, None):
                self.client(name).handshake()
        self.assertEqual([str(w.message) for w in seen], [])

    def test_mismatched_key_is_refused_at_install(self) -> None:
        """A certificate value whose key is not the leaf's is refused when installed, not at a
        handshake."""
        other = self.second.loaded(A)
        bad = LoadedCertificate(key=other.key, chain=self.a.chain, source="bad")
        with self.assertRaises(ValueError):
            self.sni.install(bad)
        self.assertIs(self.sni.certificate_for(A), self.a)
