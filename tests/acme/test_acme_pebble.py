"""Integration: the issuing service against a real pebble, each scenario on a fresh reactor.

The HTTP-01 responder is served by a small twisted.web site on pebble's ``httpPort``; the TLS
side is a real listener using the SNI map, checked with Python's ``ssl`` module against
pebble's root.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher

from tests.acme.pebble_harness import (
    Harness,
    in_thread,
    logs_captured,
    tls_connect,
    tls_get,
    tls_serial,
    wait_for,
)
from trackingproxy.acme.settings import AcmeSettings, build_acme

A, B, BAD = "a.example.com", "b.example.com", "bad.example.com"


def test_first_issuance_and_restart(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """Two domains get certificates through build_acme; the served chains verify against
    pebble's root; a restart with the same state directory orders nothing and registers no
    new account."""
    pebble = pebble_factory()
    state = tmp_path / "state"
    settings = AcmeSettings(
        email="ops@example.com", directory=pebble.directory_url, ca_bundle=pebble.ca_bundle,
        state_dir=state,
    )

    @inlineCallbacks
    def first(reactor: Any) -> Generator[Deferred[Any], Any, dict[str, int]]:
        h = Harness(reactor, pebble, [A, B])
        parts = build_acme(settings, [A, B], [], h.sni, reactor)
        service, responder = parts.service, parts.responder
        h.listen(responder)
        h.service = service  # type: ignore[assignment]
        service.startService()
        try:
            yield wait_for(reactor, lambda: all(h.sni.has_certificate(d) for d in (A, B)), 60)
            yield h.fetch_root()
            serials = {}
            for name in (A, B):
                serials[name] = yield in_thread(reactor, tls_serial, h.tls_port, name, h.root)
            assert h.challenges.hits >= 2
        finally:
            yield h.close()
        return serials

    serials = run_reactor(first, timeout=90)
    account_files = list((state / "accounts").iterdir())
    assert len(account_files) == 1
    account_before = account_files[0].read_bytes()
    assert json.loads(account_before)["registration"]["uri"]

    logs = logs_captured()

    @inlineCallbacks
    def second(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A, B])
        service = h.direct_service(state)
        service.startService()
        try:
            assert all(h.sni.has_certificate(d) for d in (A, B))  # served from the store at once
            yield h.fetch_root()
            for name in (A, B):
                serial = yield in_thread(reactor, tls_serial, h.tls_port, name, h.root)
                assert serial == serials[name]
            yield deferLater(reactor, 1.0, lambda: None)  # let the ARI check load the account
        finally:
            yield h.close()
        assert h.obtainer.obtained == 0

    try:
        run_reactor(second, timeout=60)
    finally:
        globalLogPublisher.removeObserver(logs)
    assert [f.read_bytes() for f in (state / "accounts").iterdir()] == [account_before]
    assert not any("Registered ACME account" in line for line in logs.lines())


def test_renewal_in_place(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """A short-lived certificate is renewed on time; new connections get the new serial while
    the listener and an established connection stay up."""
    pebble = pebble_factory(validity=12)

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 30)
            first = h.sni.certificate_for(A)
            assert first is not None
            yield h.fetch_root()
            sock, serial = yield in_thread(reactor, tls_connect, h.tls_port, A, h.root)
            assert serial == first.leaf.serial_number
            assert (yield in_thread(reactor, tls_get, sock, A)) == b"hello over tls"
            yield wait_for(reactor, lambda: h.sni.certificate_for(A) is not first, 30)
            second = h.sni.certificate_for(A)
            assert second is not None and second.serial_hex != first.serial_hex
            new_serial = yield in_thread(reactor, tls_serial, h.tls_port, A, h.root)
            assert new_serial == second.leaf.serial_number
            # The connection made before the renewal still works, on the old certificate.
            assert (yield in_thread(reactor, tls_get, sock, A)) == b"hello over tls"
            sock.close()
        finally:
            yield h.close()

    run_reactor(scenario, timeout=60)


def test_nonce_rejection(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """With pebble rejecting 30 % of nonces, issuance still succeeds on the first attempt."""
    pebble = pebble_factory(nonce_reject=30)
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A, B])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: all(h.sni.has_certificate(d) for d in (A, B)), 60)
        finally:
            yield h.close()

    try:
        run_reactor(scenario, timeout=90)
    finally:
        globalLogPublisher.removeObserver(logs)
    assert logs.lines(LogLevel.error) == []


def test_pebble_down_at_start(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """With the CA unreachable the service keeps running and logs the failure; once the CA is
    up a retry obtains the certificate."""
    pebble = pebble_factory(start=False)
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: bool(logs.lines(LogLevel.error)), 30)
            assert "cannot reach the ACME server" in logs.lines(LogLevel.error)[0]
            assert service.running and not h.sni.has_certificate(A)
            yield in_thread(reactor, pebble.start)
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 60)
        finally:
            yield h.close()

    try:
        run_reactor(scenario, timeout=90)
    finally:
        globalLogPublisher.removeObserver(logs)


def test_failing_domain_does_not_block_others(pebble_factory, run_reactor, tmp_path) -> None:
    """A domain whose DNS points elsewhere fails validation with a clear log line; the other
    domain still gets its certificate."""
    pebble = pebble_factory()
    pebble.add_a(BAD, "127.0.0.2")
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [BAD, A])
        service = h.direct_service(tmp_path / "state", backoff_base=30)
        service.startService()
        try:
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 60)
            yield wait_for(reactor, lambda: bool(logs.lines(LogLevel.error)), 30)
            assert not h.sni.has_certificate(BAD)
        finally:
            yield h.close()

    try:
        run_reactor(scenario, timeout=90)
    finally:
        globalLogPublisher.removeObserver(logs)
    errors = logs.lines(LogLevel.error)
    assert len(errors) == 1, errors
    assert BAD in errors[0] and f"make sure DNS for {BAD} points to this host" in errors[0]
    meta = json.loads((tmp_path / "state" / "certificates" / BAD / "meta.json").read_text())
    assert BAD in meta["last_error"]


def test_strict_mode(pebble_factory, run_reactor, tmp_path: Path) -> None:
    """Issuance works against pebble in -strict mode."""
    pebble = pebble_factory(strict=True)

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(tmp_path / "state")
        service.startService()
        try:
            yield wait_for(reactor, lambda: h.sni.has_certificate(A), 60)
        finally:
            yield h.close()

    run_reactor(scenario, timeout=90)
