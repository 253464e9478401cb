# -*- test-case-name: tests.store.test_redis_store -*-
"""Whether the shared store answers, as the replica last saw it.

Every call of the Redis store marks it up or down; each change is logged once (not once per
failed call) and handed to an optional listener (metrics, the status page). ``synced`` records
when this replica last compared what it serves with what the store holds.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["StoreHealth"]

log = Logger(namespace="trackingproxy.store.health")


class StoreHealth:
    """The reachability of one store (used on the reactor thread only).

    @ivar description: the store's URL, password masked.
    @ivar up: True once a call succeeded, False after one failed, None before any call.
    @ivar since: clock seconds of the last change of ``up`` (None before any call).
    @ivar reason: why it is down (None while up).
    @ivar last_sync: clock seconds of the last successful resync (None before one).
    @ivar listener: called with (up, reason) after every change of ``up``.
    """

    def __init__(
        self,
        description: str,
        clock: IReactorTime,
        listener: Callable[[bool, str | None], None] | None = None,
    ) -> None:
        self.description = description
        self._clock = clock
        self.listener = listener
        self.up: bool | None = None
        self.since: float | None = None
        self.reason: str | None = None
        self.last_sync: float | None = None

    def mark_up(self) -> None:
        """A call succeeded."""
        if self.up is True:
            return
        was_down = self.up is False
        self._change(True, None)
        if was_down:
            log.info("store {store} is reachable again", store=self.description)

    def mark_down(self, reason: str) -> None:
        """A call failed because the store is unavailable (``reason``: one line)."""
        if self.up is False:
            return
        cause = self._cause(reason)
        self._change(False, cause)
        log.warn(
            "store {store} is unreachable: {cause}; serving the certificates already loaded, "
            "placing no orders",
            store=self.description,
            cause=cause,
        )

    def synced(self, now: float) -> None:
        """This replica compared what it serves with the store at ``now``."""
        self.last_sync = now

    def _cause(self, reason: str) -> str:
        """``reason`` without a leading ``store <description>:`` (a StoreUnavailable message)."""
        prefix = f"store {self.description}: "
        return reason[len(prefix):] if reason.startswith(prefix) else reason

    def _change(self, up: bool, reason: str | None) -> None:
        self.up = up
        self.reason = reason
        self.since = self._clock.seconds()
        if self.listener is not None:
            self.listener(up, reason)
