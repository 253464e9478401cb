"""Giving the memory of closed connections back to the system with glibc's ``malloc_trim``.

A TLS connection costs about 25 KiB of OpenSSL state allocated with ``malloc``. When a wave of
connections (a burst of clicks, thousands of slow or half-open clients) has been closed, glibc
keeps the freed memory: it only returns the top of the heap on its own, and what the closed
connections leave free is scattered between chunks still in use. ``malloc_trim(0)`` also hands
back those free pages in the middle of the heap (``madvise``), which brings the RSS back near
where it was before the wave. (Closed connections are freed by reference counting, without
the garbage collector: see `trackingproxy.tls.protocol` and `trackingproxy.server.http1`. A
full collection here would stall the reactor for too long.)

:class:`AllocatorTrim` counts closed connections; once ``after`` of them have closed it trims
``delay`` seconds later, on the reactor: never on the path of a request, and at most once per
``delay`` seconds however fast connections churn (keep-alive traffic closes few connections
and so rarely triggers it). Where the C library is not glibc (musl: Alpine images) there is no
trim function and no trimmer.

The service tree builds the trimmer and hands it to the listeners' sites, which report every
closed connection; it is a Service, so stopping the tree cancels a pending trim (and
connections closed during shutdown schedule none). The clock and the trim function are
injected, so tests use a ``Clock`` and a recording function.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from trackingproxy.server.listener import ListenerObserver

__all__ = ["AllocatorTrim", "glibc_malloc_trim"]

TRIM_AFTER = 1000  # closed connections
TRIM_DELAY = 5.0  # seconds after the count is reached: batches a wave's closes into one trim


def glibc_malloc_trim() -> Callable[[], object] | None:
    """``malloc_trim(0)`` of the running glibc, or None under another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


class AllocatorTrim(Service, ListenerObserver):
    """See the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        trim: Callable[[], object],
        after: int = TRIM_AFTER,
        delay: float = TRIM_DELAY,
    ) -> None:
        self._clock = clock
        self._trim = trim
        self._after = after
        self._delay = delay
        self._closed = 0
        self._timer: IDelayedCall | None = None
        self._running = True
        self.trims = 0

    def connection_closed(self) -> None:
        """One connection closed (cheap: a counter, and at most one timer per ``delay``)."""
        self._closed += 1
        if self._closed >= self._after and self._timer is None and self._running:
            self._timer = self._clock.callLater(self._delay, self._run)

    def _run(self) -> None:
        self._timer = None
        self._closed = 0
        self.trims += 1
        self._trim()

    def stop(self) -> None:
        """Cancel a pending trim; schedule none until start()."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def start(self) -> None:
        """Schedule trims again (a stopped trimmer still counts closes)."""
        self._running = True

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> None:
        super().stopService()
        self.stop()
