"""A ``CertificateStore`` in dictionaries, shipped as product code for tests (ours and yours).

The same contract tests run against it, the file store and the Redis store.
"""

from __future__ import annotations

import datetime
import secrets

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

__all__ = ["MemoryStore"]


class MemoryStore:
    """A ``CertificateStore`` in dictionaries; ``clock`` gives lock expiry times."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.certs: dict[str, StoredCertificate] = {}
        self.errors: dict[str, tuple[str, datetime.datetime]] = {}
        self.orders: dict[str, PendingOrder] = {}
        self.locks: dict[str, Lock] = {}
        self.accounts: dict[str, AccountRecord] = {}

    def _check(self, lock: Lock) -> None:
        held = self.locks.get(lock.name)
        if held is None or held.token != lock.token:
            raise LockLost(f"the lock on {lock.name} was taken over")
        if held.expires <= self._clock.seconds():
            raise LockLost(f"the lock on {lock.name} expired")

    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        return succeed(self.certs.get(name))

    def save(self, lock: Lock, cert: StoredCertificate) -> Deferred[None]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        self.certs[lock.name] = cert
        self.orders.pop(lock.name, None)
        self.errors.pop(lock.name, None)
        return succeed(None)

    def save_ari(self, name: str, serial_hex: str, ari: AriWindow) -> Deferred[None]:
        current = self.certs.get(name)
        if current is not None and current.cert.serial_hex == serial_hex:
            self.certs[name] = StoredCertificate(cert=current.cert, ari=ari)
        return succeed(None)

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        self.errors[name] = (message, when)
        return succeed(None)

    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        return succeed(self.orders.get(name))

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        self.orders[lock.name] = order
        return succeed(None)

    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        now = self._clock.seconds()
        held = self.locks.get(name)
        if held is not None and held.expires > now:
            return succeed(None)
        lock = Lock(name=name, token=secrets.token_hex(16), expires=now + ttl)
        self.locks[name] = lock
        return succeed(lock)

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        try:
            self._check(lock)
        except LockLost:
            return fail()
        new = Lock(name=lock.name, token=lock.token, expires=self._clock.seconds() + ttl)
        self.locks[lock.name] = new
        return succeed(new)

    def release(self, lock: Lock) -> Deferred[None]:
        held = self.locks.get(lock.name)
        if held is not None and held.token == lock.token:
            del self.locks[lock.name]
        return succeed(None)

    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        return succeed(self.accounts.get(directory_url))

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        self.accounts[directory_url] = account
        return succeed(None)
