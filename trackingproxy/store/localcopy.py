"""A shared store with a local write-through copy in the state directory.

Every replica keeps what the shared store (Redis) holds for its domains in its own
``--state-dir`` too: a certificate loaded from or saved to the shared store is also written
to the local ``FileStore`` (``write_copy``, no lock: the shared store's lock and fence already
decided). When the shared store cannot be reached, ``load`` answers from the local copy, so a
replica restarted during a Redis outage still serves; every write and every lock fails with
``StoreUnavailable``, so no order is placed. When the shared store answers but holds nothing
for a name that has a valid local copy (a wiped or failed-over Redis, or the first start of a
single instance moved to a cluster), the local copy is written back with ``seed`` (only if the
name is still empty there), instead of ordering again. The same holds for the cluster-wide
domain list: it is remembered in ``STATE/store-domains.json`` (served during an outage, even
after a restart) and written back to a store that lost it (an empty list while none of its
names has a certificate there; a list emptied on purpose still has their certificates).
"""

from __future__ import annotations

import datetime
import itertools
import json
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from trackingproxy.store.contract import (
    AccountRecord,
    AriWindow,
    CertificateStore,
    ChallengeBoard,
    DomainList,
    Lock,
    PendingOrder,
    StoredCertificate,
    StoreUnavailable,
)
from trackingproxy.store.files import FileStore, atomic_write
from trackingproxy.store.health import StoreHealth

__all__ = ["DOMAINS_COPY", "LocalCopyStore", "SharedStore", "cached_domains", "remember_domains"]

log = Logger(namespace="trackingproxy.store.localcopy")
DOMAINS_COPY = "store-domains.json"  # in the state directory
COPY_BATCH = 10  # local copies written at a time after a bulk load (about 1 ms each)...
COPY_INTERVAL = 0.05  # ...every 50 ms: 200 a second, a fifth of the reactor at most


def remember_domains(state_dir: Path, names: Sequence[str]) -> None:
    """Keep a copy of the store's domain list in the state directory."""
    try:
        atomic_write(state_dir / DOMAINS_COPY, json.dumps(list(names)).encode())
    except OSError as e:
        log.warn("Cannot keep a copy of the store's domain list in {dir}: {error}",
                 dir=str(state_dir), error=e.strerror or str(e))


def cached_domains(state_dir: Path) -> list[str]:
    """The domain list last read from the store ([] when none was kept)."""
    try:
        names = json.loads((state_dir / DOMAINS_COPY).read_bytes())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


class SharedStore(CertificateStore, ChallengeBoard, DomainList, Protocol):
    """A store that several replicas use (RedisStore): its reachability, its change
    messages (``watch``) and a probe."""

    health: StoreHealth
    description: str

    def watch(
        self,
        on_event: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        call_in_reactor: Callable[..., None],
    ) -> Any: ...

    def ping(self) -> Deferred[None]: ...


class LocalCopyStore:
    """``shared`` for everything, ``local`` as its copy and as the fallback for reads."""

    def __init__(
        self, shared: SharedStore, local: FileStore, clock: IReactorTime, state_dir: Path
    ) -> None:
        self.shared = shared
        self.local = local
        self._state_dir = state_dir
        self._clock = clock
        self.health = shared.health
        self.description = shared.description
        self._copied: dict[str, tuple[str, AriWindow | None]] = {}
        self._later: dict[str, StoredCertificate] = {}  # copies a bulk load left to write
        self._writing: IDelayedCall | None = None

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    # -- certificates: read through, write through ------------------------------------------
    @inlineCallbacks
    def load(self, name: str) -> Generator[Deferred[Any], Any, StoredCertificate | None]:
        try:
            stored: StoredCertificate | None = yield self.shared.load(name)
        except StoreUnavailable:
            local: StoredCertificate | None = yield self.local.load(name)
            return local
        if stored is not None:
            self._copy(name, stored)
            return stored
        local = yield self.local.load(name)
        if local is None or local.cert.expired_at(self._now()):
            return None
        try:
            written: bool = yield self.shared.seed(name, local)
        except StoreUnavailable:
            return local
        if written:
            log.info(
                "{name}: the store {store} had no certificate; seeded it with the local copy "
                "(serial {serial})", name=name, store=self.description,
                serial=local.cert.serial_hex,
            )
            return local
        again: StoredCertificate | None = yield self.shared.load(name)  # another replica won
        if again is not None:
            self._copy(name, again)
        return again

    @inlineCallbacks
    def load_many(
        self, names: Sequence[str]
    ) -> Generator[Deferred[Any], Any, dict[str, StoredCertificate]]:
        """``shared.load_many`` (pipelined), copied locally; the names it lacks go through
        ``load`` (local copy, seeding); with the store unreachable, the local copies."""
        try:
            found: dict[str, StoredCertificate] = yield self.shared.load_many(names)
        except StoreUnavailable:
            local: dict[str, StoredCertificate] = yield self.local.load_many(names)
            return local
        self._later.update(found)  # written after, at a pace: serving comes first
        self._write_later()
        for name in names:
            if name not in found:
                one: StoredCertificate | None = yield self.load(name)
                if one is not None:
                    found[name] = one
        return found

    def _write_later(self) -> None:
        if self._writing is None and self._later:
            self._writing = self._clock.callLater(COPY_INTERVAL, self._write_some)

    def _write_some(self) -> None:
        self._writing = None
        for name in list(itertools.islice(self._later, COPY_BATCH)):
            self._copy(name, self._later[name])
        self._write_later()

    def _copy(self, name: str, stored: StoredCertificate) -> None:
        """Keep the local copy equal to the shared one (a no-op when it already is; what it
        holds is read from its meta.json, not parsed again)."""
        self._later.pop(name, None)  # this one is newer than a copy still to write
        wanted = (stored.cert.serial_hex, stored.ari)
        if name not in self._copied:
            mine = self.local.copy_facts(name)
            if mine is not None:
                self._copied[name] = mine
        if self._copied.get(name) == wanted:
            return
        try:
            self.local.write_copy(name, stored)
        except OSError as e:
            log.warn("{name}: cannot keep the local copy in the state directory: {error}",
                     name=name, error=e.strerror or str(e))
            return
        self._copied[name] = wanted

    @inlineCallbacks
    def save(self, lock: Lock, cert: StoredCertificate) -> Generator[Deferred[Any], Any, None]:
        yield self.shared.save(lock, cert)
        self._copy(lock.name, cert)

    @inlineCallbacks
    def save_ari(
        self, name: str, serial_hex: str, ari: AriWindow
    ) -> Generator[Deferred[Any], Any, None]:
        yield self.shared.save_ari(name, serial_hex, ari)
        yield self.local.save_ari(name, serial_hex, ari)

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        self.local.record_error(name, message, when)
        return self.shared.record_error(name, message, when)

    def seed(self, name: str, cert: StoredCertificate) -> Deferred[bool]:
        return self.shared.seed(name, cert)

    def serials(self, names: Sequence[str]) -> Deferred[dict[str, str]]:
        return self.shared.serials(names)

    # -- orders, locks and accounts: the shared store only ----------------------------------
    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        return self.shared.load_order(name)

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        return self.shared.save_order(lock, order)

    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        return self.shared.acquire(name, ttl)

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        return self.shared.refresh(lock, ttl)

    def release(self, lock: Lock) -> Deferred[None]:
        return self.shared.release(lock)

    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        return self.shared.load_account(directory_url)

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        return self.shared.save_account(directory_url, account)

    # -- HTTP-01 answers and the domain list: the shared store only -------------------------
    def put_challenge(
        self, host: str, token: str, key_authorization: bytes, ttl: float
    ) -> Deferred[None]:
        return self.shared.put_challenge(host, token, key_authorization, ttl)

    def get_challenge(self, host: str, token: str) -> Deferred[bytes | None]:
        return self.shared.get_challenge(host, token)

    def delete_challenge(self, host: str, token: str) -> Deferred[None]:
        return self.shared.delete_challenge(host, token)

    @inlineCallbacks
    def list_domains(self) -> Generator[Deferred[Any], Any, list[str]]:
        names: list[str] = yield self.shared.list_domains()
        if not names:
            names = yield self._restore_domains()
        if names != cached_domains(self._state_dir):
            remember_domains(self._state_dir, names)
        return names

    @inlineCallbacks
    def _restore_domains(self) -> Generator[Deferred[Any], Any, list[str]]:
        """The store's list is empty: if the store lost it (none of the remembered names has
        a certificate there either), write the remembered list back."""
        remembered = cached_domains(self._state_dir)
        if not remembered:
            return []
        stored: dict[str, str] = yield self.shared.serials(remembered)
        if stored:
            return []  # emptied on purpose (`trackingproxy domains remove`)
        for name in remembered:
            yield self.shared.add_domain(name)
        log.info("The store {store} had lost its domain list; wrote back the {count} name(s) "
                 "this replica remembered", store=self.description, count=len(remembered))
        return remembered

    def add_domain(self, name: str) -> Deferred[bool]:
        return self.shared.add_domain(name)

    # -- events and probes: the shared store's ---------------------------------------------
    def watch(
        self,
        on_event: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        call_in_reactor: Callable[..., None],
    ) -> Any:
        return self.shared.watch(on_event, on_subscribed, call_in_reactor)

    def ping(self) -> Deferred[None]:
        return self.shared.ping()

    def remove_domain(self, name: str) -> Deferred[bool]:
        return self.shared.remove_domain(name)
