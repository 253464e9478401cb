"""What one idle TLS server connection costs in C heap, by OpenSSL build: ``python -m
bench.tls_memory [N]``.

N TLS 1.3 handshakes (ECDSA P-256, the proxy's key-exchange groups, SSL_MODE_RELEASE_BUFFERS,
one small request and answer)
run in memory; the server side of each is kept, the client side dropped, and glibc's in-use
heap (mallinfo2: no fragmentation or RSS effects) is compared before and after. Three times:
with pyOpenSSL (the OpenSSL bundled in the installed ``cryptography`` wheel: what the proxy
uses), once as it comes and once with the memory BIOs renewed after the handshake as the proxy
does (``trackingproxy.tls.protocol.renew_memory_bios``), and with the standard library's ``ssl``
(the OpenSSL Python was built against, on Debian the system's). Run it in a venv with another
``cryptography`` to compare OpenSSL builds.

Where the rest goes (valgrind --tool=massif on this script, OpenSSL 4.0, per connection):
``SSL_new`` 6.0 KiB, the two TLS 1.3 record layers 8.8 KiB, their AES-GCM contexts 1.9 KiB.
Those 16.7 KiB are fixed by OpenSSL 3.2 and later before any buffer, session or Python object.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ssl
import sys
from typing import Any

import trustme
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from trackingproxy.internals.pyopenssl_private import renew_memory_bios
from trackingproxy.tls.policy import GROUPS


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _in_use() -> int:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _pump(a: Any, b: Any) -> None:
    for _ in range(10):
        moved = False
        for src, dst in ((a, b), (b, a)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            if data:
                dst.bio_write(data)
                moved = True
        if not moved:
            return


def pyopenssl_kib(leaf: trustme.LeafCert, n: int, renew: bool = False) -> float:
    server = SSL.Context(SSL.TLS_METHOD)
    server.use_certificate(
        crypto.load_certificate(crypto.FILETYPE_PEM, leaf.cert_chain_pems[0].bytes())
    )
    server.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, leaf.private_key_pem.bytes()))
    server.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _lib.SSL_CTX_set1_curves_list(server._context, GROUPS)  # the proxy's groups: no ML-KEM
    client = SSL.Context(SSL.TLS_METHOD)
    kept = []
    gc.collect()
    before = _in_use()
    for _ in range(n):
        s = SSL.Connection(server, None)
        s.set_accept_state()
        c = SSL.Connection(client, None)
        c.set_connect_state()
        c.set_tlsext_host_name(b"click.example.com")
        for _ in range(6):
            for side in (c, s):
                with contextlib.suppress(SSL.WantReadError):
                    side.do_handshake()
            _pump(c, s)
        if renew:
            renew_memory_bios(s)
        c.send(b"GET /q/x HTTP/1.1\r\n\r\n")
        _pump(c, s)
        s.recv(65536)
        s.send(b"HTTP/1.1 200 OK\r\n\r\n")
        _pump(c, s)
        kept.append(s)
    gc.collect()
    return (_in_use() - before) / n / 1024


def stdlib_kib(leaf: trustme.LeafCert, ca: trustme.CA, n: int) -> float:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    kept = []
    gc.collect()
    before = _in_use()
    for _ in range(n):
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        s = server.wrap_bio(s_in, s_out, server_side=True)
        c = client.wrap_bio(c_in, c_out, server_hostname="click.example.com")
        for _ in range(6):
            for side in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        c.write(b"GET /q/x HTTP/1.1\r\n\r\n")
        s_in.write(c_out.read())
        s.read(65536)
        s.write(b"HTTP/1.1 200 OK\r\n\r\n")
        kept.append((s, s_in, s_out))
    gc.collect()
    return (_in_use() - before) / n / 1024


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("click.example.com", key_type=trustme.KeyType.ECDSA)
    bundled = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    print(f"pyOpenSSL on {bundled}: {pyopenssl_kib(leaf, n):.1f} KiB per idle server connection")
    print(f"  with the BIOs renewed after the handshake: {pyopenssl_kib(leaf, n, True):.1f} KiB")
    print(f"stdlib ssl on {ssl.OPENSSL_VERSION}: {stdlib_kib(leaf, ca, n):.1f} KiB")


if __name__ == "__main__":
    main()
