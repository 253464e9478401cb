"""Optimistic writes and closes for TCP connections.

Twisted buffers every ``transport.write`` and asks epoll to report writability
(``startWriting``), even when the socket could take the bytes at once; adding EPOLLOUT is the
most expensive call in the proxy's profile (bench/README.md).
When nothing is buffered, ``write`` here sends straight away and only buffers what the kernel
did not take. Ordering is kept (only with an empty buffer), and errors fall through to Twisted's
own path, which reports the lost connection as usual.

``loseConnection`` likewise: Twisted stops reading, asks for writability and closes from
``doWrite`` once the buffer is empty, three ``epoll_ctl`` calls. When everything has already
been sent (the usual case with the writes above) the connection here stops reading and closes
on the next reactor turn, as Twisted would have, without the round trip through epoll. And no
``shutdown()`` before ``close()``: Twisted's own comment says it is not needed (sockets are
close-on-exec, so this process holds the only descriptor); it failed with ENOTCONN on every
connection the peer had closed first. On a new connection per request these are 3 of about 27
system calls, which this sandbox makes expensive.
"""

from __future__ import annotations

from twisted.internet import abstract, main, tcp
from twisted.python.failure import Failure

_original_write = abstract.FileDescriptor.write
_original_lose_connection = abstract.FileDescriptor.loseConnection


def _nothing_buffered(self: tcp.Connection) -> bool:
    return not self._tempDataBuffer and len(self.dataBuffer) == self.offset


def _write(self: tcp.Connection, data: bytes) -> None:
    if (
        data
        and self.connected
        and not self.disconnecting
        and not self._writeDisconnected
        and _nothing_buffered(self)
        and type(data) is bytes
    ):
        sent = self.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    _original_write(self, data)


def _lose_connection(self: tcp.Connection) -> None:
    if (
        self.connected
        and not self.disconnecting
        and not self._writeDisconnected
        and not self._writeDisconnecting
        and self.producer is None
        and _nothing_buffered(self)
    ):
        self.stopReading()
        self.disconnecting = True
        self.reactor.callLater(0, _close_flushed, self)  # type: ignore[attr-defined]
        return
    _original_lose_connection(self)


def _close_flushed(self: tcp.Connection) -> None:
    if not self.connected or self._aborting:
        return  # the peer or abortConnection was faster
    if self.producer is not None or not _nothing_buffered(self):
        # Written to (or given a producer) since: Twisted's path, doWrite flushes, then closes.
        self.startWriting()
        return
    self.connectionLost(Failure(main.CONNECTION_DONE))


_PATCHED = ("write", "loseConnection", "_shouldShutdown")
_saved: dict[str, object] = {}  # what tcp.Connection itself defined before install()


def install() -> None:
    """Use optimistic writes and closes for every TCP connection of this process (idempotent)."""
    if _saved:
        return
    _saved.update({name: tcp.Connection.__dict__.get(name, _saved) for name in _PATCHED})
    tcp.Connection.write = _write  # type: ignore[assignment,method-assign]
    tcp.Connection.loseConnection = _lose_connection  # type: ignore[assignment,method-assign]
    tcp.Connection._shouldShutdown = False


def installed() -> bool:
    return bool(_saved)


def uninstall() -> None:
    """Give TCP connections Twisted's own write and close back (for tests that install)."""
    saved = dict(_saved)
    _saved.clear()
    for name, value in saved.items():
        if value is _saved:  # the sentinel: not defined on the class itself, inherited
            delattr(tcp.Connection, name)
        else:
            setattr(tcp.Connection, name, value)
