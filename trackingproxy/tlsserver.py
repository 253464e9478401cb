"""The TLS layer of the HTTPS listener: Twisted's (BufferingTLSTransport), without the reference
cycle it leaves when a connection ends in a TLS error.

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

from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

__all__ = ["TLSServerFactory", "TLSServerProtocol"]


class TLSServerProtocol(BufferingTLSTransport):
    # Twisted's default server protocol (it aggregates small writes into one TLS record: the
    # HTTPS keep-alive benchmark lost 15 % when this derived from TLSMemoryBIOProtocol).

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        # Private Twisted hook (twisted.protocols.tls, 22.x-26.x): called with the Failure of
        # the TLS error, or None for a clean shutdown. Covered by tests/test_tlsserver.py.
        super()._tlsShutdownFinished(reason)
        if reason is not None:
            reason.cleanFailure()


class TLSServerFactory(TLSMemoryBIOFactory):
    protocol: Any = TLSServerProtocol
