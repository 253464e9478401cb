"""The ACME account of one directory: loaded from the store, or registered exactly once.

Loading or registering happens under the store lock ``account-<hash of the directory URL>``,
so processes sharing the state directory and starting together register one account, not
one each: the others wait (polling on the clock) and use the stored registration. The key is
stored before registering, so a crash never leads to a second account either. The External
Account Binding HMAC key is used to sign the registration only; it is never stored or logged.
Blocking ACME calls go through ``call`` (the obtainer's single ACME thread).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator
from typing import Any

from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from attrs import frozen
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWK, JWKEC
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.acme.problems import RegistrationFailed
from trackingproxy.store.contract import AccountRecord, CertificateStore, Lock

__all__ = ["Account", "AccountManager"]

log = Logger()
Caller = Callable[..., Deferred[Any]]
"""``call(f, *args)``: run the blocking ``f(*args)`` in the ACME thread."""


@frozen
class Account:
    """A ready ACME client (directory fetched, registration known) and the account key."""

    client: acme_client.ClientV2
    key: JWK


class AccountManager:
    """Loads or registers the account for ``directory_url`` once; ``get()`` shares the result."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        store: CertificateStore,
        directory_url: str,
        call: Caller,
        make_network: Callable[[JWK], acme_client.ClientNetwork],
        email: str | None = None,
        eab: tuple[str, str] | None = None,
        lock_ttl: float = 300.0,
        lock_poll: float = 1.0,
    ) -> None:
        self._clock = clock
        self._store = store
        self.directory_url = directory_url
        self._call = call
        self._make_network = make_network
        self._email = email
        self._eab = eab
        self._lock_ttl = lock_ttl
        self._lock_poll = lock_poll
        self._account: Account | None = None
        self._waiters: list[Deferred[Account]] = []

    @property
    def lock_name(self) -> str:
        """The store lock held while loading or registering the account of this directory."""
        return "account-" + hashlib.sha256(self.directory_url.encode("utf-8")).hexdigest()[:16]

    def get(self) -> Deferred[Account]:
        """The account; concurrent callers wait for the same set-up (a failure is not kept)."""
        if self._account is not None:
            return succeed(self._account)
        waiter: Deferred[Account] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._setup().addBoth(self._ready)
        return waiter

    def _ready(self, result: Account | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Account):
            self._account = result
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @inlineCallbacks
    def forget(self) -> Generator[Deferred[Any], Any, None]:
        """The CA no longer knows the account: keep the key, register again next time."""
        record: AccountRecord | None = yield self._store.load_account(self.directory_url)
        if record is not None:
            yield self._store.save_account(self.directory_url, AccountRecord(record.key_json))
        self._account = None

    @inlineCallbacks
    def _setup(self) -> Generator[Deferred[Any], Any, Account]:
        url = self.directory_url
        record: AccountRecord | None = yield self._store.load_account(url)
        if record is not None and record.registration_json is not None:
            ready: Account = yield self._use(record)
            return ready
        # Load or register under a lock: another process may be registering right now.
        lock: Lock | None = yield self._store.acquire(self.lock_name, self._lock_ttl)
        while lock is None:
            yield deferLater(self._clock, self._lock_poll)
            record = yield self._store.load_account(url)
            if record is not None and record.registration_json is not None:
                ready = yield self._use(record)
                return ready
            lock = yield self._store.acquire(self.lock_name, self._lock_ttl)
        try:
            record = yield self._store.load_account(url)
            if record is None:
                new_key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
                record = AccountRecord(key_json=new_key.json_dumps())
                # The key is stored before registering: a crash never leads to a second account.
                yield self._store.save_account(url, record)
            account: Account = yield self._use(record)
        except BaseException:  # no yield here: a generator closed at shutdown must not yield
            self._store.release(lock).addErrback(
                lambda f: log.failure("Cannot release the account lock", f)
            )
            raise
        yield self._store.release(lock)
        return account

    @inlineCallbacks
    def _use(self, record: AccountRecord) -> Generator[Deferred[Any], Any, Account]:
        """A client for ``record``, registering the account first when it has no registration."""
        url = self.directory_url
        key = JWK.json_loads(record.key_json)
        net = self._make_network(key)
        directory = yield self._call(acme_client.ClientV2.get_directory, url, net)
        client = acme_client.ClientV2(directory, net)
        if record.registration_json is not None:
            net.account = messages.RegistrationResource.json_loads(record.registration_json)
            return Account(client, key)
        try:
            regr = yield self._call(self.register, client, key)
        except messages.Error as e:
            raise RegistrationFailed(e, eab=self._eab is not None) from e
        # The CA echoes the EAB JWS in the account object; it is not ours to keep (and acme
        # cannot serialize it back).
        regr = regr.update(body=regr.body.update(external_account_binding=None))
        net.account = regr
        yield self._store.save_account(
            url, AccountRecord(key_json=record.key_json, registration_json=regr.json_dumps())
        )
        log.info("Registered ACME account {uri} at {url}", uri=regr.uri, url=url)
        return Account(client, key)

    def register(self, client: acme_client.ClientV2, key: JWK) -> messages.RegistrationResource:
        """Register ``key`` (blocking; runs in the ACME thread); an existing account is reused."""
        eab = None
        if self._eab is not None:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(), kid=self._eab[0], hmac_key=self._eab[1],
                directory=client.directory,
            )
        reg = messages.NewRegistration.from_data(
            email=self._email, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            return client.new_account(reg)
        except acme_errors.ConflictError as e:  # the key already has an account: reuse it
            existing = messages.RegistrationResource(body=messages.Registration(), uri=e.location)
            return client.query_registration(existing)
