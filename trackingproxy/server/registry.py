"""The open client connections of a listener, and the typed notice they get at shutdown.

Each HTTP/1.1 connection (which owns its HTTP/2 connection, if ALPN chose h2) registers itself
with its listener's `ConnectionRegistry` when it is made and leaves it when it is lost;
`trackingproxy.ops.lifecycle` reaches the connections only through the registries: a
`ShutdownNotice` to each (HTTP/1.1: answer what was asked with ``Connection: close``, idle
ones close now; HTTP/2: GOAWAY once the streams taken are answered), then a polite close, then
an abort for what is left after the grace period.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from attrs import frozen

__all__ = ["SHUTDOWN", "ClientConnection", "ConnectionRegistry", "ShutdownNotice"]


@frozen
class ShutdownNotice:
    """The server is stopping: take no new requests, answer those taken, then close."""

    reason: str = "the server is stopping"


SHUTDOWN = ShutdownNotice()


class ClientConnection(Protocol):
    """What the registry's users may do with a connection."""

    def shutdown_notice(self, notice: ShutdownNotice = SHUTDOWN) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class ConnectionRegistry:
    """The connections of one listener that are open now."""

    def __init__(self) -> None:
        self._open: set[ClientConnection] = set()

    def add(self, connection: ClientConnection) -> None:
        self._open.add(connection)

    def discard(self, connection: ClientConnection) -> None:
        self._open.discard(connection)

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[ClientConnection]:
        return iter(list(self._open))  # a snapshot: closing one removes it from the set
