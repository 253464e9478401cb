"""Opening the shared store (``--store``) at start-up.

The redis-py client is blocking: every call runs on a small dedicated thread pool (never the
ACME client's thread, never the reactor thread), so an HTTP-01 lookup never waits behind an
ACME call. Start-up is the one place where the store is used synchronously: the connection is
probed (one line naming the problem when it fails), Redis's persistence settings are checked
where ``CONFIG GET`` is allowed, and the cluster-wide domain list is read. A store that cannot
be reached at start is fatal only when there is nothing to serve meanwhile: with a valid
certificate in the local copy the replica starts, serves it and keeps retrying.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from trackingproxy.errors import ConfigError
from trackingproxy.store.contract import StoredCertificate, StoreUnavailable
from trackingproxy.store.files import FileStore
from trackingproxy.store.localcopy import LocalCopyStore, cached_domains, remember_domains
from trackingproxy.store.redis import RedisStore, result_of, synchronous
from trackingproxy.store.settings import StoreSettings
from trackingproxy.store.url import connect, probe

__all__ = ["OpenedStore", "StorePoolService", "open_shared_store"]

log = Logger(namespace="trackingproxy.store.shared")
_T = TypeVar("_T")
POOL_THREADS = 4


class StorePoolService(Service):
    """Stops the store's thread pool when the process stops."""

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        if not self._pool.started:
            self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()


@frozen
class OpenedStore:
    """The store the issuer uses, the shared part (for events) and what start-up found."""

    store: LocalCopyStore
    shared: RedisStore
    pool_service: StorePoolService
    domains: tuple[str, ...]  # the store's domain list at start (empty when unreachable)
    state_dir: Path  # where the local copy lives


def _now_of(clock: IReactorTime) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)


def _valid_local(local: FileStore, names: Iterable[str], now: datetime.datetime) -> list[str]:
    found = []
    for name in names:
        stored: StoredCertificate | None = result_of(local.load(name))
        if stored is not None and not stored.cert.expired_at(now):
            found.append(name)
    return found


def open_shared_store(
    settings: StoreSettings,
    *,
    reactor: Any,
    local: FileStore,
    node_id: str,
    domains: Iterable[str],
    state_dir: Path,
    connector: Callable[..., Any] = connect,
) -> OpenedStore:
    """Connect, probe and wrap the store; ConfigError when it is unusable and nothing local
    can be served meanwhile."""
    description = settings.masked
    client = connector(settings.url, settings.ca_bundle)
    pool = ThreadPool(minthreads=1, maxthreads=POOL_THREADS, name="trackingproxy-store")

    def in_pool(f: Callable[[], _T]) -> Deferred[_T]:
        return deferToThreadPool(reactor, pool, f)

    def make(run: Callable[[Callable[[], Any]], Deferred[Any]]) -> RedisStore:
        return RedisStore(
            client, run=run, clock=reactor, prefix=settings.prefix, node_id=node_id,
            description=description,
        )

    shared, at_start = make(in_pool), make(synchronous)
    store_domains: tuple[str, ...] = ()
    try:
        probe(client, description)
        for warning in result_of(at_start.settings_warnings()):
            log.warn("{warning}", warning=warning)
        listed: list[str] = result_of(at_start.list_domains())
        store_domains = tuple(listed)
        remember_domains(state_dir, listed)
        shared.health.mark_up()
    except StoreUnavailable as e:
        store_domains = tuple(cached_domains(state_dir))
        configured = list(dict.fromkeys([*domains, *store_domains]))
        serving = _valid_local(local, configured, _now_of(reactor))
        if not serving:
            raise ConfigError(
                f"--store: {e}; fix the URL, the password or the network (no valid local "
                "certificate to serve meanwhile)"
            ) from None
        shared.health.mark_down(str(e))
        log.warn(
            "Starting without the store: serving the local copies of {count} certificate(s) "
            "and retrying the store in the background", count=len(serving),
        )
    log.info("Store: {store} (prefix {prefix!r}), this replica is {node}",
             store=description, prefix=settings.prefix, node=node_id)
    return OpenedStore(
        LocalCopyStore(shared, local, reactor, state_dir), shared, StorePoolService(pool),
        store_domains, state_dir,
    )
