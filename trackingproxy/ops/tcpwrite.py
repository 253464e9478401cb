"""Optimistic writes and closes for TCP connections (a process-wide patch of Twisted's TCP
connection, which `trackingproxy.internals.twisted_private` holds; this module turns it on
and off).

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

from trackingproxy.internals.twisted_private import (
    install_optimistic_tcp,
    optimistic_tcp_installed,
    uninstall_optimistic_tcp,
)

__all__ = ["install", "installed", "uninstall"]


def install() -> None:
    """Use optimistic writes and closes for every TCP connection of this process (idempotent)."""
    install_optimistic_tcp()


def installed() -> bool:
    return optimistic_tcp_installed()


def uninstall() -> None:
    """Give TCP connections Twisted's own write and close back (for tests that install)."""
    uninstall_optimistic_tcp()
