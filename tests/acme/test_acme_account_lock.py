"""Account set-up across processes: two sharing one state directory register one account."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acme import messages
from acme.client import ClientNetwork
from josepy.jwa import ES256
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.account import AccountManager
from trackingproxy.store.files import FileStore

URL = "https://ca.example/dir"
DIRECTORY = messages.Directory({
    "newNonce": "https://ca.example/nonce",
    "newAccount": "https://ca.example/new-account",
    "newOrder": "https://ca.example/new-order",
})


class SlowRegistration(AccountManager):
    """No network: the directory is canned and each registration waits for the test."""

    def __init__(self, clock: Clock, state: Path, registrations: list[Deferred[Any]]) -> None:
        super().__init__(
            clock=clock, store=FileStore(state, clock), directory_url=URL, call=self.fake_call,
            make_network=lambda key: ClientNetwork(key=key, alg=ES256), lock_poll=1.0,
        )
        self.registrations = registrations

    def fake_call(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if getattr(f, "__name__", "") == "get_directory":
            return succeed(DIRECTORY)
        if getattr(f, "__func__", None) is AccountManager.register:
            d: Deferred[Any] = Deferred()
            self.registrations.append(d)
            return d
        raise AssertionError(f"unexpected ACME call {f!r}")


class AccountLockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.state)
        self.registrations: list[Deferred[Any]] = []

    def registered(self, uri: str) -> messages.RegistrationResource:
        return messages.RegistrationResource(body=messages.Registration(), uri=uri)

    def test_two_processes_register_one_account(self) -> None:
        """Two processes starting together with no stored account register one account; the
        second waits for the first and uses its key and registration."""
        first = SlowRegistration(self.clock, self.state, self.registrations)
        second = SlowRegistration(self.clock, self.state, self.registrations)
        d1, d2 = first.get(), second.get()
        self.assertEqual(len(self.registrations), 1)
        self.clock.advance(5)  # registration is slow: the second keeps waiting
        self.assertEqual(len(self.registrations), 1)
        self.assertNoResult(d2)
        self.registrations[0].callback(self.registered("https://ca.example/acct/1"))
        one = self.successResultOf(d1)
        self.clock.advance(1)
        two = self.successResultOf(d2)
        self.assertEqual(len(self.registrations), 1)
        self.assertEqual(one.client.net.account.uri, "https://ca.example/acct/1")
        self.assertEqual(two.client.net.account.uri, "https://ca.example/acct/1")
        self.assertEqual(one.key, two.key)
        self.assertEqual(len(list((self.state / "accounts").iterdir())), 1)
        # The account lock is released: nothing is left in the locks directory.
        self.assertEqual(list((self.state / "locks").iterdir()), [])

    def test_failed_registration_releases_lock(self) -> None:
        """When the first process's registration fails, the waiting one registers (with the
        stored key) instead of waiting for the lock to expire."""
        first = SlowRegistration(self.clock, self.state, self.registrations)
        second = SlowRegistration(self.clock, self.state, self.registrations)
        d1, d2 = first.get(), second.get()
        self.registrations[0].errback(messages.Error.with_code("serverInternal"))
        self.failureResultOf(d1)
        self.clock.advance(1)
        self.assertEqual(len(self.registrations), 2)
        self.registrations[1].callback(self.registered("https://ca.example/acct/2"))
        two = self.successResultOf(d2)
        self.assertEqual(two.client.net.account.uri, "https://ca.example/acct/2")

    def test_stale_lock_of_dead_process_expires(self) -> None:
        """A lock left by a process that died while registering is taken after its expiry."""
        store = FileStore(self.state, self.clock)
        obtainer = SlowRegistration(self.clock, self.state, self.registrations)
        self.assertIsNotNone(self.successResultOf(store.acquire(obtainer.lock_name, 300)))
        d = obtainer.get()
        self.clock.pump([1.0] * 299)
        self.assertEqual(self.registrations, [])
        self.clock.pump([1.0] * 2)
        self.assertEqual(len(self.registrations), 1)
        self.registrations[0].callback(self.registered("https://ca.example/acct/3"))
        self.successResultOf(d)
