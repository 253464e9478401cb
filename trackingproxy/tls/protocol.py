"""The TLS layer of the HTTPS listener: Twisted's (BufferingTLSTransport, set up once per
connection, without the reference cycle it leaves when a connection ends in a TLS error: see
`trackingproxy.internals.twisted_private.TLSServerBase`), with the memory its handshake left
behind given back once its bytes have left (`renew_memory_bios`).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOFactory

from trackingproxy.internals.pyopenssl_private import renew_memory_bios
from trackingproxy.internals.twisted_private import TLSServerBase

__all__ = ["TLSServerFactory", "TLSServerProtocol"]


class TLSServerProtocol(TLSServerBase):
    def after_handshake_flush(self, connection: SSL.Connection) -> bool:
        # Both BIOs are empty at some point soon after the handshake: renew them then.
        return renew_memory_bios(connection)


class TLSServerFactory(TLSMemoryBIOFactory):
    protocol: Any = TLSServerProtocol
