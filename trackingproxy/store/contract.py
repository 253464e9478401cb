"""Persistence of ACME state: the certificate store interface and its values.

The store is the single source of truth shared by every process (and, later, every replica)
pointed at one state directory: per ACME directory the account key and registration, per
domain the private key, the full chain, metadata (ARI window, last error) and a resumable
order, plus a per-name lock with an owner token and an expiry. Implementations:
``trackingproxy.store.files.FileStore`` (the state directory) and
``trackingproxy.acme.testing.MemoryStore`` (tests).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred

from trackingproxy.tls.certificates import LoadedCertificate

__all__ = [
    "AccountRecord",
    "AriWindow",
    "CertificateStore",
    "ChallengeBoard",
    "DomainList",
    "Lock",
    "LockLost",
    "PendingOrder",
    "StoreUnavailable",
    "StoredCertificate",
]


class LockLost(Exception):
    """A write was refused because the caller's lock expired, was taken over, or its fence is
    older than the one stored with the data (a newer holder wrote since)."""


class StoreUnavailable(Exception):
    """The store cannot be reached, is too slow, or refuses writes (read-only); the message is
    one line naming the store (password masked) and the cause. Nothing was written."""


@frozen
class Lock:
    """Proof that the holder may order ``name`` until ``expires`` (local clock seconds, an
    estimate: a shared store enforces expiry on its own clock).

    ``fence`` grows with every acquisition of ``name`` (across holders): a write commits only
    while the lock is held with ``token`` and ``fence`` is not older than the fence stored with
    the data, so a paused former holder can never overwrite what a newer one wrote.
    """

    name: str
    token: str
    expires: float
    fence: int = 0


@frozen
class AriWindow:
    """An ACME Renewal Information answer (RFC 9773) for one certificate."""

    start: datetime.datetime
    end: datetime.datetime
    # When to ask again (the answer's Retry-After), tz-aware UTC.
    next_check: datetime.datetime | None = None


@frozen
class StoredCertificate:
    """What the store holds for a domain: the served pair and what we know about it."""

    cert: LoadedCertificate
    ari: AriWindow | None = None


@frozen
class PendingOrder:
    """An order placed but not finished: a successor resumes it instead of ordering anew."""

    order_url: str
    key_pem: bytes
    directory_url: str


@frozen
class AccountRecord:
    """An ACME account: the private key (JWK JSON) and, once registered, its resource JSON."""

    key_json: str
    registration_json: str | None = None


class CertificateStore(Protocol):
    """Deferred-returning persistence; every write of a domain's data needs its lock."""

    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        """The certificate stored for ``name``; None when missing, unreadable or corrupt."""

    def load_many(self, names: Sequence[str]) -> Deferred[dict[str, StoredCertificate]]:
        """The certificates stored for ``names``, by name; missing, unreadable or corrupt ones
        are absent. One round trip per batch where the store is remote (start-up with 10,000
        domains)."""

    def save(self, lock: Lock, cert: StoredCertificate) -> Deferred[None]:
        """Store the certificate of ``lock.name`` and drop its pending order.

        Fails with LockLost (and writes nothing) when the lock is no longer held.
        """

    def save_ari(self, name: str, serial_hex: str, ari: AriWindow) -> Deferred[None]:
        """Record the ARI window of the stored certificate if its serial is ``serial_hex``."""

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        """Remember the last failure for ``name`` (metadata for humans and tools)."""

    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        """The pending (resumable) order for ``name``, if any."""

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        """Store the pending order of ``lock.name`` (before finalizing); LockLost if not held."""

    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        """Take the lock on ``name`` for ``ttl`` seconds; None when someone else holds it."""

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        """Extend a held lock; fails with LockLost when it was lost."""

    def release(self, lock: Lock) -> Deferred[None]:
        """Give the lock up (a no-op when it was already lost)."""

    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        """The account stored for an ACME directory."""

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        """Store the account for an ACME directory (the key before registering, then both)."""

    def seed(self, name: str, cert: StoredCertificate) -> Deferred[bool]:
        """Store ``cert`` for ``name`` only when nothing is stored for it (moving a single
        instance to a cluster, re-seeding a wiped store); True when it was written."""

    def serials(self, names: Sequence[str]) -> Deferred[dict[str, str]]:
        """The serial (hex) of the certificate stored per name, for the names that have one
        (a cheap generation check: one round trip for all names on a shared store)."""


class ChallengeBoard(Protocol):
    """HTTP-01 answers shared by every replica (a store that several machines use)."""

    def put_challenge(
        self, host: str, token: str, key_authorization: bytes, ttl: float
    ) -> Deferred[None]:
        """Publish the answer for ``token`` on ``host`` for ``ttl`` seconds (store's clock)."""

    def get_challenge(self, host: str, token: str) -> Deferred[bytes | None]:
        """The published answer, or None."""

    def delete_challenge(self, host: str, token: str) -> Deferred[None]:
        """Withdraw the answer (the order is no longer pending)."""


class DomainList(Protocol):
    """The cluster-wide list of served domains kept in the store
    (``trackingproxy domains add|remove``)."""

    def list_domains(self) -> Deferred[list[str]]:
        """The names, sorted."""

    def add_domain(self, name: str) -> Deferred[bool]:
        """Add ``name`` (normalised by the caller); False when it was already there."""

    def remove_domain(self, name: str) -> Deferred[bool]:
        """Remove ``name``; False when it was not there."""
