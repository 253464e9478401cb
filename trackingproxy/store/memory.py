# -*- test-case-name: tests.store.test_store_contract,tests.store.test_memory_board -*-
"""A ``CertificateStore`` in dictionaries, shipped as product code for tests (ours and yours).

The same contract tests run against it, the file store and the Redis store. It is also a
``ChallengeBoard`` and a ``DomainList`` (answers expire on the injected clock), for unit tests
of the code that uses a shared store.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from trackingproxy.store.contract import (
    AccountRecord,
    AriWindow,
    Lock,
    LockLost,
    PendingOrder,
    StoredCertificate,
)
from trackingproxy.store.scripts import EXPIRED, OLDER, TAKEN, refusal

__all__ = ["MemoryStore"]


class MemoryStore:
    """A ``CertificateStore``, ``ChallengeBoard`` and ``DomainList`` in dictionaries.

    @ivar certs: the stored certificate per name.
    @ivar fences: the fence of the holder that wrote ``certs[name]`` (absent: 0).
    @ivar orders: the pending order per name; ``order_fences`` the fence that wrote it.
    @ivar locks: the current lock per name (expired ones stay until replaced or released).
    @ivar lock_fences: the last fence handed out per name.
    @ivar errors: the last recorded failure per name.
    @ivar accounts: the account per ACME directory URL.
    @ivar challenges: HTTP-01 answers per (host, token), with their expiry (clock seconds).
    @ivar domains: the domain list.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.certs: dict[str, StoredCertificate] = {}
        self.fences: dict[str, int] = {}
        self.errors: dict[str, tuple[str, datetime.datetime]] = {}
        self.orders: dict[str, PendingOrder] = {}
        self.order_fences: dict[str, int] = {}
        self.locks: dict[str, Lock] = {}
        self.lock_fences: dict[str, int] = {}
        self.accounts: dict[str, AccountRecord] = {}
        self.challenges: dict[tuple[str, str], tuple[bytes, float]] = {}
        self.domains: set[str] = set()

    def _floor(self, name: str) -> int:
        return max(self.fences.get(name, 0), self.order_fences.get(name, 0))

    def _check(self, lock: Lock) -> None:
        held = self.locks.get(lock.name)
        if held is None:
            raise refusal(EXPIRED, lock)
        if held.token != lock.token:
            raise refusal(TAKEN, lock)
        if held.expires <= self._clock.seconds():
            raise refusal(EXPIRED, lock)
        if lock.fence < self._floor(lock.name):
            raise refusal(OLDER, lock)

    # -- certificates ---------------------------------------------------------------------
    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        return succeed(self.certs.get(name))

    def load_many(self, names: Sequence[str]) -> Deferred[dict[str, StoredCertificate]]:
        return succeed({n: self.certs[n] for n in names if n in self.certs})

    def save(self, lock: Lock, cert: StoredCertificate) -> Deferred[None]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        self.certs[lock.name] = cert
        self.fences[lock.name] = lock.fence
        self.orders.pop(lock.name, None)
        self.order_fences.pop(lock.name, None)
        self.errors.pop(lock.name, None)
        return succeed(None)

    def seed(self, name: str, cert: StoredCertificate) -> Deferred[bool]:
        if name in self.certs:
            return succeed(False)
        self.certs[name] = cert
        self.fences[name] = 0
        return succeed(True)

    def serials(self, names: Sequence[str]) -> Deferred[dict[str, str]]:
        return succeed({n: self.certs[n].cert.serial_hex for n in names if n in self.certs})

    def save_ari(self, name: str, serial_hex: str, ari: AriWindow) -> Deferred[None]:
        current = self.certs.get(name)
        if current is not None and current.cert.serial_hex == serial_hex:
            self.certs[name] = StoredCertificate(cert=current.cert, ari=ari)
        return succeed(None)

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        self.errors[name] = (message, when)
        return succeed(None)

    # -- resumable orders -----------------------------------------------------------------
    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        return succeed(self.orders.get(name))

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        self.orders[lock.name] = order
        self.order_fences[lock.name] = lock.fence
        return succeed(None)

    # -- locks ----------------------------------------------------------------------------
    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        now = self._clock.seconds()
        held = self.locks.get(name)
        if held is not None and held.expires > now:
            return succeed(None)
        fence = max(self.lock_fences.get(name, 0), self._floor(name)) + 1
        self.lock_fences[name] = fence
        lock = Lock(name=name, token=secrets.token_hex(16), expires=now + ttl, fence=fence)
        self.locks[name] = lock
        return succeed(lock)

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        held = self.locks.get(lock.name)
        if held is None or held.expires <= self._clock.seconds():
            return fail(refusal(EXPIRED, lock))
        if held.token != lock.token:
            return fail(refusal(TAKEN, lock))
        new = Lock(
            name=lock.name, token=lock.token, expires=self._clock.seconds() + ttl,
            fence=held.fence,
        )
        self.locks[lock.name] = new
        return succeed(new)

    def release(self, lock: Lock) -> Deferred[None]:
        held = self.locks.get(lock.name)
        if held is not None and held.token == lock.token:
            del self.locks[lock.name]
        return succeed(None)

    # -- accounts -------------------------------------------------------------------------
    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        return succeed(self.accounts.get(directory_url))

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        self.accounts[directory_url] = account
        return succeed(None)

    # -- HTTP-01 answers (ChallengeBoard) -------------------------------------------------
    def put_challenge(
        self, host: str, token: str, key_authorization: bytes, ttl: float
    ) -> Deferred[None]:
        self.challenges[(host, token)] = (key_authorization, self._clock.seconds() + ttl)
        return succeed(None)

    def get_challenge(self, host: str, token: str) -> Deferred[bytes | None]:
        found = self.challenges.get((host, token))
        if found is None or found[1] <= self._clock.seconds():
            self.challenges.pop((host, token), None)
            return succeed(None)
        return succeed(found[0])

    def delete_challenge(self, host: str, token: str) -> Deferred[None]:
        self.challenges.pop((host, token), None)
        return succeed(None)

    # -- the domain list (DomainList) -----------------------------------------------------
    def list_domains(self) -> Deferred[list[str]]:
        return succeed(sorted(self.domains))

    def add_domain(self, name: str) -> Deferred[bool]:
        if name in self.domains:
            return succeed(False)
        self.domains.add(name)
        return succeed(True)

    def remove_domain(self, name: str) -> Deferred[bool]:
        if name not in self.domains:
            return succeed(False)
        self.domains.discard(name)
        return succeed(True)
