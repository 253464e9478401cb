"""The server TLS policy (Mozilla "intermediate") and building the SSL.Contexts that carry it.

A context is built once, fully configured, and never mutated after it has served a connection
(pyOpenSSL 26.2+ refuses that). A context holds no leaf certificate and no key: it carries the
policy and one intermediate chain, and is shared by every certificate issued under that chain
(Let's Encrypt: a handful for any number of domains). The SNI map gives each connection its
leaf and key (``trackingproxy.tls.sni``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from cryptography import x509
from OpenSSL import SSL

from trackingproxy.internals.pyopenssl_private import set_groups

# Mozilla intermediate, restricted to forward-secret AEAD suites (no DHE, no CBC).
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
GROUPS = b"X25519:P-256:P-384"
ALPN_PROTOCOLS = (b"h2", b"http/1.1")
SESSION_TIMEOUT = 24 * 3600

_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_SINGLE_ECDH_USE
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
)


def _select_alpn(
    offered: Sequence[bytes], supported: Sequence[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    for proto in supported:
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS


def make_context(
    chain: Sequence[x509.Certificate] = (),
    alpn: Sequence[bytes] = ALPN_PROTOCOLS,
    servername_callback: Callable[[SSL.Connection], None] | None = None,
    session_id: bytes | None = None,
) -> SSL.Context:
    """A server context with the policy applied and ``chain`` (the certificates a server sends
    after its leaf) as its extra chain; it holds no leaf and no key.

    The context a connection starts with (the one with ``servername_callback``) is the one
    that dispatches on SNI; it fails handshakes for names that have no certificate (the client
    gets a handshake_failure alert). Its session cache, session tickets and session id context
    serve every name, since OpenSSL keeps them with the connection's first context.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    # Free a connection's TLS read/write buffers while it is idle (what nginx does): most tracking
    # connections sit idle in keep-alive between a few requests.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(TLS12_CIPHERS)
    if not set_groups(ctx, GROUPS):
        raise RuntimeError("OpenSSL refused the TLS groups list")
    ctx.set_session_id(session_id or os.urandom(16))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_timeout(SESSION_TIMEOUT)
    supported = tuple(alpn)
    ctx.set_alpn_select_callback(lambda conn, offered: _select_alpn(offered, supported))
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    if servername_callback is not None:
        ctx.set_tlsext_servername_callback(servername_callback)
    return ctx
