"""Keeping a replica in step with the shared store: certificates and the domain list.

A certificate written by any replica reaches this one's TLS listener within moments:
- the store PUBLISHes ``cert <name>`` with every write; this replica reloads that name;
- after every (re)subscription (start, a reconnect after a Redis restart or failover) it
  resyncs everything: it may have missed messages while it was not subscribed;
- every ``safety_interval`` seconds (60) it compares the stored serials with the served ones
  in one round trip, in case a message was lost anyway.
It also probes the store every ``probe_interval`` seconds, so the store's state (up or down,
logged once per change, exported as metrics) is known even when nothing is written, and a
store that comes back triggers a resync (which re-seeds an emptied store from local copies).
``domains`` messages re-read the cluster-wide domain list and hand it to ``on_domains``.
Nothing here runs on the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.store.contract import StoreUnavailable
from trackingproxy.store.localcopy import SharedStore

__all__ = ["StoreSync"]

log = Logger(namespace="trackingproxy.acme.sync")


class Reloads(Protocol):
    """The issuer: what it serves, and reloading names from the store."""

    domains: tuple[str, ...]

    @property
    def loaded(self) -> bool:
        """Whether its start-up load of the stored certificates has finished."""

    def served_serials(self) -> dict[str, str]: ...

    def reload(self, name: str) -> Deferred[None]: ...


class StoreSync(Service):
    """Subscribes to the store's events and keeps ``issuer`` (and the domain list) current."""

    name = "store-sync"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        shared: SharedStore,  # with its local copy (LocalCopyStore): see _read_domains
        issuer: Reloads,
        call_in_reactor: Callable[..., None],
        on_domains: Callable[[list[str]], None] | None = None,
        probe_interval: float = 5.0,
        safety_interval: float = 60.0,
    ) -> None:
        self._clock = clock
        self._shared = shared
        self._issuer = issuer
        self._call_in_reactor = call_in_reactor
        self._on_domains = on_domains
        self._probe_interval = probe_interval
        self._safety_interval = safety_interval
        self._watch: Any = None
        self._timer: IDelayedCall | None = None
        self._last_safety = 0.0
        self._was_up: bool | None = None
        self._busy: Deferred[None] | None = None
        self._again = False

    def startService(self) -> None:
        super().startService()
        self._was_up = self._shared.health.up
        self._last_safety = self._clock.seconds()
        self._watch = self._shared.watch(self._event, self._subscribed, self._call_in_reactor)
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    # -- events (on the reactor thread) -------------------------------------------------------
    def _event(self, kind: str, arg: str) -> None:
        if not self.running:
            return
        if kind == "cert" and arg in self._issuer.domains:
            self._guard(self._issuer.reload(arg), f"{arg}: cannot load the new certificate")
        elif kind == "domains":
            self._guard(self._read_domains(), "cannot read the store's domain list")

    def _subscribed(self) -> None:
        if self.running:
            self.resync()

    def resync(self) -> Deferred[None]:
        """Reload the domain list and every served name (one resync at a time; a request
        made while one runs starts another once it ends)."""
        if self._busy is not None:
            self._again = True
            return self._busy
        d = self._resync()
        self._busy = d

        def done(result: object) -> object:
            self._busy = None
            if self._again and self.running:
                self._again = False
                self.resync()
            return result

        d.addBoth(done)
        return self._guard(d, "resync with the store failed")

    @inlineCallbacks
    def _resync(self) -> Generator[Deferred[Any], Any, None]:
        """The domain list, then only the names whose stored serial is not the one served or
        that the store lost (their reload seeds it from the local copy): one pipelined read of
        the serials, not a load of 10,000 certificates. While the issuer's start-up load runs,
        names it has not served yet are left to it."""
        yield self._read_domains()
        names = self._issuer.domains
        served = self._issuer.served_serials()
        stored: dict[str, str] = yield self._shared.serials(list(names))
        stale = _differing(served, stored, names, unserved=self._issuer.loaded)
        stale += [n for n in names if n in served and n not in stored]
        yield DeferredList([self._issuer.reload(n) for n in stale], consumeErrors=True)
        self._shared.health.synced(self._clock.seconds())

    @inlineCallbacks
    def _read_domains(self) -> Generator[Deferred[Any], Any, None]:
        if self._on_domains is None:
            return
        names: list[str] = yield self._shared.list_domains()
        self._on_domains(names)

    # -- probe and safety check ---------------------------------------------------------------
    def _schedule(self) -> None:
        if self.running:
            self._timer = self._clock.callLater(self._probe_interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        d = self._probe()
        d.addBoth(lambda _: self._schedule())

    @inlineCallbacks
    def _probe(self) -> Generator[Deferred[Any], Any, None]:
        try:
            yield self._shared.ping()
        except StoreUnavailable:
            self._was_up = False
            return
        except Exception:
            log.failure("Probing the store failed")
            return
        came_back = self._was_up is False
        self._was_up = True
        now = self._clock.seconds()
        if came_back:
            yield self.resync()
        elif now - self._last_safety >= self._safety_interval:
            self._last_safety = now
            yield self._safety_check()

    @inlineCallbacks
    def _safety_check(self) -> Generator[Deferred[Any], Any, None]:
        served = self._issuer.served_serials()
        try:
            stored: dict[str, str] = yield self._shared.serials(list(self._issuer.domains))
        except StoreUnavailable:
            return
        stale = _differing(served, stored, self._issuer.domains, unserved=self._issuer.loaded)
        for name in stale:
            log.info("{name}: the store holds another certificate than the one served; "
                     "loading it (a change message was missed)", name=name)
        yield DeferredList([self._issuer.reload(n) for n in stale], consumeErrors=True)
        self._shared.health.synced(self._clock.seconds())

    def _guard(self, d: Deferred[Any], what: str) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable):
                return  # the store's state change is logged once, by its health
            log.failure(what, failure)

        d.addErrback(failed)
        return d


def _differing(
    served: dict[str, str], stored: dict[str, str], names: Iterable[str], unserved: bool = True
) -> list[str]:
    """Names whose stored serial is not the one served (with ``unserved``, also a stored one
    that is not served; a store that lost a name is re-seeded by its next load)."""
    return [
        n for n in names
        if n in stored and stored[n] != served.get(n) and (unserved or n in served)
    ]
