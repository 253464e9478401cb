"""Keeping a store lock alive while the work it protects runs.

An order can outlast the lock's time to live (slow validation, a CA under load, polling up
to its timeout): ``LockKeeper`` extends the lock every ``ttl / 3`` on the injected clock, so
another process only takes over from a holder that died (and stopped refreshing).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.store.contract import CertificateStore, Lock, LockLost

__all__ = ["LockKeeper"]

log = Logger()


class LockKeeper:
    """Refreshes ``lock`` every ``ttl / 3`` until ``stop()``; ``lock`` is the latest version.

    ``abandoned`` is set by the owner when it gives the work up (at shutdown): whatever the
    work produces afterwards must be ignored.
    """

    def __init__(
        self, clock: IReactorTime, store: CertificateStore, lock: Lock, ttl: float
    ) -> None:
        self._clock = clock
        self._store = store
        self._ttl = ttl
        self.lock = lock
        self.lost: str | None = None
        self.abandoned = False
        self._timer: IDelayedCall | None = None
        self._stopped = False
        self._schedule()

    def _schedule(self) -> None:
        if not self._stopped:
            self._timer = self._clock.callLater(self._ttl / 3, self._refresh)

    def _refresh(self) -> None:
        self._timer = None
        d: Deferred[Lock] = self._store.refresh(self.lock, self._ttl)
        d.addCallbacks(self._refreshed, self._failed)

    def _refreshed(self, lock: Lock) -> None:
        self.lock = lock
        self._schedule()

    def _failed(self, failure: Failure) -> None:
        if failure.check(LockLost):
            self.lost = str(failure.value)
            if not self._stopped:
                log.warn("{name}: {problem}; another process may take the order over",
                         name=self.lock.name, problem=self.lost)
            self._stopped = True
            return
        log.failure("{name}: cannot extend the order lock; trying again", failure,
                    name=self.lock.name)
        self._schedule()

    def stop(self) -> None:
        """Refresh no more (the owner releases the lock itself)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
