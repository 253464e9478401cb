"""Every use of pyOpenSSL's private internals (checked with pyOpenSSL 25 and 26; setup.cfg keeps
it below 27). `missing` lists what a release lacks of it; tests/test_internals.py runs it.

- A connection's memory BIOs and SSL pointer, and the binding (``OpenSSL._util``): giving an
  idle connection new, empty BIOs once the handshake is over (`renew_memory_bios`).
- A context's SSL_CTX pointer: the key-exchange groups list, which pyOpenSSL does not wrap
  (`set_groups`).
- A connection's SSL pointer and the OpenSSL objects inside pyOpenSSL's ``X509`` and ``PKey``:
  giving a connection its leaf certificate and key in the servername callback without a
  conversion or a warning per handshake (`use_leaf`).
"""

from __future__ import annotations

from OpenSSL import SSL, _util, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = ["missing", "renew_memory_bios", "set_groups", "use_leaf"]


def missing() -> list[str]:
    """The internals this module uses that the installed pyOpenSSL does not have."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    connection = SSL.Connection(context, None)
    lacking = [
        f"Connection.{n}" for n in ("_into_ssl", "_from_ssl", "_ssl") if not hasattr(connection, n)
    ]
    lacking += [f"Context.{n}" for n in ("_context",) if not hasattr(context, n)]
    lacking += [f"X509.{n}" for n in ("_x509",) if not hasattr(crypto.X509(), n)]
    lacking += [f"PKey.{n}" for n in ("_pkey",) if not hasattr(crypto.PKey(), n)]
    lacking += [f"OpenSSL._util.{n}" for n in ("ffi", "lib") if not hasattr(_util, n)]
    lacking += [
        f"OpenSSL._util.lib.{n}"
        for n in ("SSL_set_bio", "BIO_new", "BIO_s_mem", "BIO_get_mem_data", "BIO_free",
                  "SSL_CTX_set1_curves_list", "SSL_use_certificate", "SSL_use_PrivateKey",
                  "ERR_clear_error")
        if not hasattr(_lib, n)
    ]  # fmt: skip
    return lacking


def set_groups(context: SSL.Context, groups: bytes) -> bool:
    """Set the key-exchange groups of ``context`` (``b"X25519:P-256"``); whether OpenSSL took it."""
    return bool(_lib.SSL_CTX_set1_curves_list(context._context, groups) == 1)


def renew_memory_bios(connection: SSL.Connection) -> bool:
    """Give ``connection`` two new, empty memory BIOs if both of its own are drained.

    A memory BIO never shrinks: after a TLS 1.3 handshake the outgoing one keeps room for the
    server's whole first flight (certificate chain, signature, tickets) and the incoming one
    for the ClientHello, memory an idle keep-alive connection holds for nothing
    (``python -m bench.tls_memory`` measures it; bench/README.md). The new pair only
    grows to the size of the requests and answers. Returns whether it renewed; the BIOs are
    pyOpenSSL's private state, covered by tests/tls/test_protocol.py.
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


def use_leaf(connection: SSL.Connection, certificate: crypto.X509, key: crypto.PKey) -> bool:
    """Give ``connection`` its own leaf certificate and private key, made once beforehand.

    What ``Connection.use_certificate`` and ``use_privatekey`` do (``SSL_use_certificate``,
    ``SSL_use_PrivateKey``: a reference, no copy), without their cost per handshake: given a
    ``cryptography`` object they convert it (a DER round trip each time), given pyOpenSSL's own
    objects they warn (DeprecationWarning). Called in the servername callback after
    ``set_context``: it never raises; returns whether OpenSSL took both (if not, the handshake
    fails for want of a certificate, as for a name without one).
    """
    ssl = connection._ssl
    if (
        _lib.SSL_use_certificate(ssl, certificate._x509) == 1
        and _lib.SSL_use_PrivateKey(ssl, key._pkey) == 1
    ):
        return True
    _lib.ERR_clear_error()
    return False
