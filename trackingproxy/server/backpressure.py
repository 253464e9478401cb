"""What a client connection registers with its transport to hear of back-pressure.

A connection (HTTP/1.1 or HTTP/2) is its transport's streaming producer for its whole life:
the transport pauses it when the client does not read what it is sent. It registers this
small object rather than itself: TLS keeps its last producer after the connection has ended,
and through this object, cut when the connection ends or closes, it holds no reference cycle
back to the connection (which is then freed by reference counting, not by the collector).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ConnectionProducer", "Pausable"]


class Pausable(Protocol):
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class ConnectionProducer:
    """Forwards the transport's pause and resume to ``conn`` until ``conn`` is set to None."""

    __slots__ = ("conn",)

    def __init__(self, conn: Pausable) -> None:
        self.conn: Pausable | None = conn

    def pauseProducing(self) -> None:
        if self.conn is not None:
            self.conn.pauseProducing()

    def resumeProducing(self) -> None:
        if self.conn is not None:
            self.conn.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the transport is closing: connectionLost follows
