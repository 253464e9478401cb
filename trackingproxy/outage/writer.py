# -*- test-case-name: tests.outage.test_journal -*-
"""The journal file on disk: blocking operations, run one at a time off the reactor thread.

`JournalFile` owns the file ``journal-N`` in a directory and its lock file ``journal-N.lock``
(``flock``: one process per journal; with ``--workers`` each process takes the first free
number). Files are created 0600 in a 0700 directory. ``append`` writes and fsyncs; ``rewrite``
replaces the file atomically (temporary file, fsync, rename, fsync of the directory).

`SerialRunner` runs such blocking calls through ``run`` (the reactor's thread pool in the
process, a synchronous call in tests), strictly one after the other, and gives each caller a
Deferred of its own call.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from trackingproxy.store.files import ensure_private_dir

__all__ = [
    "MAX_JOURNALS",
    "JournalFile",
    "Run",
    "SerialRunner",
    "blocking_now",
    "open_journal_file",
]

T = TypeVar("T")
Run = Callable[[Callable[[], Any]], "Deferred[Any]"]
MAX_JOURNALS = 256  # as many as --workers allows


class JournalFile:
    """One locked journal file, see the module docstring. Not thread-safe: one call at a time."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self._fd: int | None = None

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _open(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)
            self._fd = fd
        return self._fd

    def append(self, data: bytes) -> None:
        """Append ``data`` and fsync."""
        fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)

    def rewrite(self, data: bytes) -> None:
        """Replace the file's content with ``data``, atomically and durably."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._close_file()

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the file and release the lock."""
        self._close_file()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def open_journal_file(directory: Path) -> JournalFile:
    """Lock and return the first free journal in ``directory`` (created 0700); raises OSError
    when it cannot be created or every journal is taken."""
    ensure_private_dir(directory)
    for number in range(MAX_JOURNALS):
        lock_path = directory / f"journal-{number}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except OSError:
            os.close(fd)
            raise
        return JournalFile(directory / f"journal-{number}", fd)
    raise OSError(f"all {MAX_JOURNALS} journals in {directory} are in use by other processes")


class SerialRunner:
    """Runs blocking calls through ``run`` one after the other (see the module docstring)."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._tail: Deferred[None] = succeed(None)
        self.pending = 0  # calls submitted and not finished

    def submit(self, call: Callable[[], T]) -> Deferred[T]:
        """Run ``call`` after every call submitted before; its own result or failure."""
        result: Deferred[T] = Deferred()
        self.pending += 1

        def start(_: object) -> Deferred[Any]:
            return self._run(call)

        def done(outcome: T | Failure) -> None:
            self.pending -= 1
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self._tail = self._tail.addCallback(start).addBoth(done)
        return result


def blocking_now(call: Callable[[], T]) -> Deferred[T]:
    """A ``Run`` that calls at once, on the caller's thread (tests; start-up)."""
    try:
        return succeed(call())
    except Exception:
        failed: Deferred[T] = Deferred()
        failed.errback(Failure())
        return failed

