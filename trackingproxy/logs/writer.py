"""Buffered line output for the access log: lines are collected and written in one ``write``
per flush (every 100 ms, or at 64 KiB), instead of one system call and one pass through the
twisted.logger observers per request. Destinations: a file descriptor (stdout) or a file."""

from __future__ import annotations

import os
from typing import IO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from trackingproxy.errors import ConfigError

log = Logger(namespace="trackingproxy.logs.writer")

FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 64 * 1024


class BufferedLines:
    """Collects lines; writes them on a timer of the injected clock or when the buffer is full."""

    def __init__(self, clock: IReactorTime, fd: int | None = None, stream: IO[bytes] | None = None):
        self._clock = clock
        self._fd = fd
        self._stream = stream
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._failed = False

    def __call__(self, line: str) -> None:
        data = line.encode("utf-8", "replace") + b"\n"
        self._lines.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            if self._stream is not None:
                self._stream.write(data)
                self._stream.flush()
            elif self._fd is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as e:
            if not self._failed:  # a full disk or a closed pipe must not stop the proxy
                self._failed = True
                log.error("Cannot write the access log ({error}); lines are dropped", error=e)
        else:
            self._failed = False

    def close(self) -> None:
        self.flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def open_access_log(destination: str, clock: IReactorTime) -> BufferedLines:
    """``stdout`` or a file path (opened for appending, 0640)."""
    if destination == "stdout":
        return BufferedLines(clock, fd=1)
    try:
        fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except OSError as e:
        raise ConfigError(
            f"--access-log {destination}: cannot open it ({e.strerror}); check the directory and "
            "its permissions, or use --access-log stdout"
        ) from None
    return BufferedLines(clock, stream=os.fdopen(fd, "ab"))
