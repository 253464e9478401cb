"""Test doubles of a shared store (unit tests of the code that uses one)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from trackingproxy.store.contract import StoreUnavailable
from trackingproxy.store.health import StoreHealth
from trackingproxy.store.memory import MemoryStore


class FlakyShared(MemoryStore):
    """A MemoryStore that can be switched off: every call then fails with StoreUnavailable."""

    description = "redis://***@store:6379/0"

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.health = StoreHealth(self.description, clock)
        self.down = False

    def __getattribute__(self, attr: str) -> Any:
        value = super().__getattribute__(attr)
        if attr.startswith("_") or not callable(value) or not super().__getattribute__("down"):
            return value

        def unavailable(*args: object, **kwargs: object) -> Deferred[Any]:
            return fail(StoreUnavailable("store redis://***@store:6379/0: connection refused"))

        return unavailable
