# -*- test-case-name: tests.outage.test_links -*-
"""Remembered click redirects: the ``Location`` SparkPost answered for an exact request target.

Keyed by (Host, target: path and query, byte for byte); the key is kept as a 16-byte BLAKE2b
digest, so the tracking tokens themselves are not held here. Bounded in number (``capacity``,
least recently used dropped first) and in age (``max_age``, 24 h by default: an entry older than
that is never answered and is dropped when met). Only what the upstream sent is stored; nothing
is derived from the request, so a remembered answer can never become an open redirect.

Memory: about 250 bytes per link plus the length of its ``Location`` (100,000 links with
200-byte landing URLs take about 45 MB).
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b
from typing import Final

from twisted.internet.interfaces import IReactorTime

__all__ = ["MAX_AGE", "MAX_LOCATION", "REDIRECTS", "RememberedLinks"]

MAX_AGE: Final = 24 * 3600.0
MAX_LOCATION: Final = 8192  # a longer Location is not remembered
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


def _key(host: str, target: bytes) -> bytes:
    return blake2b(host.encode("ascii", "replace") + b"\x00" + target, digest_size=16).digest()


class RememberedLinks:
    """The redirects learned from the upstream, see the module docstring.

    @ivar _links: key -> (learned at, status code, Location), least recently used first.
    """

    def __init__(self, clock: IReactorTime, capacity: int, max_age: float = MAX_AGE) -> None:
        self._clock = clock
        self._capacity = capacity
        self._max_age = max_age
        self._links: OrderedDict[bytes, tuple[float, int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._links)

    def learn(self, host: str, target: bytes, code: int, location: bytes) -> None:
        """Remember that the upstream answered ``code`` with ``location`` for ``target``."""
        if (
            code not in REDIRECTS
            or not location
            or len(location) > MAX_LOCATION
            or b"\r" in location
            or b"\n" in location
            or b"\x00" in location
        ):
            return
        links = self._links
        key = _key(host, target)
        links[key] = (self._clock.seconds(), code, location)
        links.move_to_end(key)
        while len(links) > self._capacity:
            links.popitem(last=False)

    def recall(self, host: str, target: bytes) -> tuple[int, bytes] | None:
        """(status code, Location) remembered for exactly this target, if not too old."""
        key = _key(host, target)
        found = self._links.get(key)
        if found is None:
            return None
        learned, code, location = found
        if self._clock.seconds() - learned >= self._max_age:
            del self._links[key]
            return None
        self._links.move_to_end(key)
        return code, location
