"""ACME and storage faults: serving continues with what is valid, the log says what is wrong in
one line per failure, and recovery is automatic once the fault is gone.

CA faults run against a real pebble (one for the module) through ``FaultLayer`` (slow, 500s,
badNonce storms, rateLimited + Retry-After, down); a failing validation uses pebble's own DNS.
Storage faults use a real state directory; read-only and full ones a small tmpfs mounted for
the test (root only: skipped with a reason, or failing under CI=true). Each scenario starts
from a stored certificate that is due for renewal, so "the old certificate stays served" is
checked over a real TLS handshake. Clock-driven tests with doubles pin the timing rules.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.acme.conftest import Pebble, pebble_binaries, run_reactor  # noqa: F401
from tests.acme.pebble_harness import (
    CountingObtainer,
    Harness,
    in_thread,
    logs_captured,
    tls_serial,
    wait_for,
)
from tests.hostile.acme_fault_layer import FaultLayer
from tests.ports import free_port
from trackingproxy.acme.client import AcmeObtainer
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.obtainer import ObtainFailed
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.testing import (
    FakeObtainer,
    FixedRandom,
    LogCapture,
    self_signed,
)
from trackingproxy.store.contract import Lock
from trackingproxy.store.files import FileStore, atomic_write
from trackingproxy.store.memory import MemoryStore
from trackingproxy.tls.certificates import LoadedCertificate, parse_pem
from trackingproxy.tls.sni import SNIContextMap

DAY = datetime.timedelta(days=1)
NETWORK_TIMEOUT = 1  # seconds: the client's per-request timeout in these tests


# -- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pebble(
    pebble_binaries: tuple[str, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pebble]:
    """One pebble for the module (each test uses its own names and state directory)."""
    p = Pebble(pebble_binaries, tmp_path_factory.mktemp("pebble"), http_port=free_port())
    p.start()
    yield p
    p.stop()


def make_layer(pebble: Pebble) -> FaultLayer:
    return FaultLayer(
        pebble_url=f"https://127.0.0.1:{pebble.port}", ca_bundle=pebble.ca_bundle,
        cert=pebble.workdir / "pebble-api-cert.pem", key=pebble.workdir / "pebble-api-key.pem",
    )


def make_service(h: Harness, state: Path, directory_url: str, **options: Any) -> IssuingService:
    """The real issuing service, file store and ACME client, with a short network timeout."""
    store = FileStore(state, h.reactor)
    responder = HTTP01Responder(h.domains, h.reactor, shared_dir=state / "challenges",
                                refresh_interval=0.2)
    h.listen(responder)
    h.obtainer = CountingObtainer(AcmeObtainer(
        reactor=h.reactor, clock=h.reactor, directory_url=directory_url, store=store,
        responder=responder, email="ops@example.com", ca_bundle=h.pebble.ca_bundle,
        poll_timeout=15, network_timeout=NETWORK_TIMEOUT,
    ))
    options.setdefault("backoff_base", 0.5)
    options.setdefault("rng", FixedRandom(0.5))
    h.service = IssuingService(
        clock=h.reactor, store=store, obtainer=h.obtainer, sni=h.sni, domains=h.domains,
        key_generator=lambda: ec.generate_private_key(ec.SECP256R1()), **options,
    )
    return h.service


def store_old(state: Path, name: str, due: bool = True) -> LoadedCertificate:
    """Store a valid self-signed certificate for ``name``: due for renewal, or fresh."""
    now = datetime.datetime.now(datetime.UTC)
    age = 60 * DAY if due else DAY
    cert = self_signed(name, now - age, now - age + 80 * DAY)
    directory = state / "certificates" / name
    atomic_write(directory / "privkey.pem", cert.key_pem())
    atomic_write(directory / "fullchain.pem", cert.fullchain_pem())
    return cert


def served_serial(port: int, name: str) -> int:
    """The serial of the certificate served for ``name`` (handshake only, not verified)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def problems(logs: LogCapture) -> list[str]:
    """Error and critical lines, and any logged traceback (there must be none)."""
    tracebacks = [str(e.get("log_failure")) for e in logs.events if "log_failure" in e]
    return logs.lines(LogLevel.error) + logs.lines(LogLevel.critical) + tracebacks


def check_one_line_per_failure(lines: list[str], name: str, failures: int, expect: str) -> None:
    assert len(lines) == failures, lines
    for line in lines:
        assert "\n" not in line and name in line and expect in line, line
        assert "the current certificate stays in use" in line, line


def clear_a(pebble: Pebble, host: str) -> None:
    import requests

    requests.post(f"http://127.0.0.1:{pebble.dns_management_port}/clear-a",
                  json={"host": host}, timeout=5).raise_for_status()


def require_root() -> None:
    reason = "mounting a tmpfs needs root"
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: the storage fault tests must run)")
        pytest.skip(reason)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; always unmounted afterwards."""
    require_root()
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(path: Path) -> Path:
    """Fill the filesystem of ``path`` with one file; returns it (delete it to free space)."""
    filler = path / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    with pytest.raises(OSError) as full:
        (path / "probe").write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    with contextlib.suppress(FileNotFoundError):
        (path / "probe").unlink()
    return filler


# -- the shared scenario: a fault, the old certificate served, recovery ---------------------
def run_fault(
    pebble: Pebble,
    run_reactor: Any,  # noqa: F811
    state: Path,
    name: str,
    inject: Any,
    clear: Any,
    expect: str,
    min_failures: int = 2,
    layer: FaultLayer | None = None,
    recorded: bool = True,
) -> dict[str, Any]:
    """Start with a due certificate for ``name`` and the fault injected; check the old one is
    served while attempts fail (each logged in one line, and ``recorded`` in meta.json when
    the store is writable), then clear the fault and check a new certificate, verified
    against pebble's root, is served without a restart."""
    old = store_old(state, name)
    logs = logs_captured()
    seen: dict[str, Any] = {}

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        if layer is not None:
            layer.start(reactor)
        h = Harness(reactor, pebble, [name])
        service = make_service(h, state, layer.url if layer is not None else
                               pebble.directory_url)
        try:
            yield inject(reactor)
            service.startService()
            serial = yield in_thread(reactor, served_serial, h.tls_port, name)
            assert serial == old.leaf.serial_number
            yield wait_for(reactor,
                           lambda: service.renewal_states()[name].failures >= min_failures, 20)
            serial = yield in_thread(reactor, served_serial, h.tls_port, name)
            assert serial == old.leaf.serial_number  # still the old one after the failures
            seen["failures"] = service.renewal_states()[name].failures
            seen["lines"] = problems(logs)
            meta = state / "certificates" / name / "meta.json"
            seen["last_error"] = json.loads(meta.read_text())["last_error"] if recorded else ""
            yield clear(reactor)
            yield wait_for(reactor, lambda: h.sni.certificate_for(name) is not None
                           and h.sni.certificate_for(name).serial_hex != old.serial_hex, 30)
            yield h.fetch_root()
            serial = yield in_thread(reactor, tls_serial, h.tls_port, name, h.root)
            assert serial != old.leaf.serial_number
            state_after = service.renewal_states()[name]
            assert state_after.failures == 0 and state_after.last_error is None
            seen["after"] = problems(logs)
        finally:
            yield h.close()
            if layer is not None:
                yield layer.down()

    try:
        run_reactor(scenario, timeout=45)
    finally:
        globalLogPublisher.removeObserver(logs)
    check_one_line_per_failure(seen["lines"], name, seen["failures"], expect)
    assert seen["after"] == seen["lines"], "errors logged after the recovery"
    if recorded:
        assert expect in seen["last_error"]
    stored = parse_pem((state / "certificates" / name / "fullchain.pem").read_bytes(),
                       (state / "certificates" / name / "privkey.pem").read_bytes(), "state")
    assert stored.serial_hex != old.serial_hex
    return seen


def _fire(_: Any) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d


# -- CA faults -------------------------------------------------------------------------------
CA_FAULTS = {
    "slow": "did not answer in time",
    "500": "answered HTTP 500",
    "500-problem": "serverInternal",
    "badNonce": "badNonce",
}


@pytest.mark.parametrize("fault", sorted(CA_FAULTS))
def test_ca_misbehaving(fault: str, pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """The CA is slow (beyond the client's timeout), answers 500s (with or without a problem
    document) or rejects every nonce: the old certificate stays served, each failed attempt
    is one log line naming the problem, and the certificate is renewed once the CA is well."""
    layer = make_layer(pebble)
    layer.delay = NETWORK_TIMEOUT + 1.5

    def inject(_: Any) -> Deferred[None]:
        layer.fault = fault
        return _fire(None)

    def clear(_: Any) -> Deferred[None]:
        layer.fault = None
        return _fire(None)

    run_fault(pebble, run_reactor, tmp_path / "state", f"{fault.lower()}.ca.example.com",
              inject, clear, CA_FAULTS[fault], layer=layer)


def test_ca_down(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """The CA refuses connections: the old certificate stays, "cannot reach" is logged once
    per attempt, and renewal succeeds once the CA listens again (same port, no restart)."""
    layer = make_layer(pebble)

    def clear(_: Any) -> Deferred[None]:
        layer.up()
        return _fire(None)

    run_fault(pebble, run_reactor, tmp_path / "state", "down.ca.example.com",
              lambda _: layer.down(), clear, "cannot reach the ACME server", layer=layer)


def test_validation_fails(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """DNS for the name points elsewhere: validation fails with the CA's problem and the DNS
    hint in one line; once DNS is fixed the next attempt validates and renews."""
    name = "dns.ca.example.com"

    def inject(reactor: Any) -> Deferred[None]:
        return in_thread(reactor, pebble.add_a, name, "127.0.0.2")

    def clear(reactor: Any) -> Deferred[None]:
        return in_thread(reactor, clear_a, pebble, name)

    run_fault(pebble, run_reactor, tmp_path / "state", name, inject, clear,
              f"make sure DNS for {name} points to this host", min_failures=1)


def test_rate_limited_retry_after(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """newOrder answered ``rateLimited`` with Retry-After: 3: the next order is not placed
    before those 3 s (the backoff alone would retry after 0.5 s), the log line says so, and
    the certificate is renewed afterwards."""
    layer = make_layer(pebble)
    layer.retry_after = 3

    def inject(_: Any) -> Deferred[None]:
        layer.fault = "rateLimited"
        return _fire(None)

    def clear(_: Any) -> Deferred[None]:
        layer.fault = None
        return _fire(None)

    seen = run_fault(pebble, run_reactor, tmp_path / "state", "limited.ca.example.com",
                     inject, clear, "rateLimited", min_failures=1, layer=layer)
    assert seen["failures"] == 1
    assert "waiting as it asked" in seen["lines"][0]
    orders = layer.requests_to("/order-plz")
    assert [o.status for o in orders] == [429, 201], orders
    assert orders[1].at - orders[0].at >= layer.retry_after - 0.05, orders


# -- storage faults ----------------------------------------------------------------------------
def _corrupt(directory: Path, how: str) -> None:
    chain = directory / "fullchain.pem"
    if how == "truncated":
        data = chain.read_bytes()
        chain.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        chain.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n"
                          b"-----END CERTIFICATE-----\n")
    else:  # a key that does not match the certificate
        other = self_signed(directory.name, datetime.datetime.now(datetime.UTC),
                            datetime.datetime.now(datetime.UTC) + DAY)
        (directory / "privkey.pem").write_bytes(other.key_pem())


@pytest.mark.parametrize("how", ["truncated", "garbage", "mismatched-key"])
def test_bad_stored_certificate(
    how: str, pebble: Pebble, run_reactor: Any, tmp_path: Path  # noqa: F811
) -> None:
    """A truncated or corrupt PEM, or a key that does not match its certificate: start-up goes
    on, the other domain is served, the bad file is reported once (however often the store is
    read while the CA is down), and a new certificate replaces it when the CA is back."""
    state = tmp_path / "state"
    bad, good = f"{how}.store.example.com", "good.store.example.com"
    kept = store_old(state, good, due=False)
    store_old(state, bad)
    _corrupt(state / "certificates" / bad, how)
    layer = make_layer(pebble)
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        layer.start(reactor)
        yield layer.down()
        h = Harness(reactor, pebble, [bad, good])
        service = make_service(h, state, layer.url)
        try:
            service.startService()
            serial = yield in_thread(reactor, served_serial, h.tls_port, good)
            assert serial == kept.leaf.serial_number
            assert not h.sni.has_certificate(bad)
            yield wait_for(reactor, lambda: service.renewal_states()[bad].failures >= 2, 20)
            layer.up()
            yield wait_for(reactor, lambda: h.sni.has_certificate(bad), 30)
            yield h.fetch_root()
            yield in_thread(reactor, tls_serial, h.tls_port, bad, h.root)
        finally:
            yield h.close()
            yield layer.down()

    try:
        run_reactor(scenario, timeout=45)
    finally:
        globalLogPublisher.removeObserver(logs)
    reports = [line for line in logs.lines(LogLevel.warn) if "is unusable" in line]
    assert len(reports) == 1, reports
    assert bad in reports[0] and "\n" not in reports[0]
    directory = state / "certificates" / bad
    parse_pem((directory / "fullchain.pem").read_bytes(), (directory / "privkey.pem").read_bytes(),
              "state")


def test_bad_state_json(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """A truncated account file, order file and meta.json: start-up goes on with the stored
    certificate served, each bad file is reported once, a new account is registered and the
    renewal is ordered afresh."""
    state = tmp_path / "state"
    name = "json.store.example.com"
    old = store_old(state, name)
    layer = make_layer(pebble)
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        layer.start(reactor)
        account = FileStore(state, reactor)._account_path(layer.url)
        atomic_write(account, b'{"directory": "https://ca.example/dir", "key": {"kty": "EC"')
        directory = state / "certificates" / name
        atomic_write(directory / "order.json", b'{"order_url": ')
        atomic_write(directory / "meta.json", b'{"serial": "ab", "ari": {"start": "yesterday"')
        h = Harness(reactor, pebble, [name])
        service = make_service(h, state, layer.url)
        try:
            service.startService()
            serial = yield in_thread(reactor, served_serial, h.tls_port, name)
            assert serial == old.leaf.serial_number
            yield wait_for(reactor, lambda: h.sni.certificate_for(name) is not None
                           and h.sni.certificate_for(name).serial_hex != old.serial_hex, 30)
        finally:
            yield h.close()
            yield layer.down()

    try:
        run_reactor(scenario, timeout=45)
    finally:
        globalLogPublisher.removeObserver(logs)
    assert problems(logs) == []
    reports = [line for line in logs.lines(LogLevel.warn) if "is unusable" in line]
    assert sorted(Path(line.split()[2]).name for line in reports) == [
        account.name for account in (state / "accounts").iterdir()
    ] + ["meta.json", "order.json"], reports
    assert [r.path for r in layer.requests_to("/sign-me-up")] == ["/sign-me-up"]


def test_disk_full_after_the_order(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """The disk fills up while the CA finalizes: the issued certificate cannot be stored, the
    old one stays served and the failure is one line; once space is freed the stored order is
    resumed and its certificate downloaded again: the CA issues one certificate, not two."""
    with tmpfs(tmp_path / "state", "64k") as state:
        layer = make_layer(pebble)
        filler: list[Path] = []

        def fill_on_finalize(method: str, path: str) -> None:
            if path.startswith("/finalize-order/") and not filler:
                filler.append(fill(state))

        layer.hooks.append(fill_on_finalize)

        def clear(_: Any) -> Deferred[None]:
            filler[0].unlink()
            return _fire(None)

        run_fault(pebble, run_reactor, state, "late.store.example.com", _fire, clear,
                  "No space left on device", min_failures=2, layer=layer, recorded=False)
        finalized = [r for r in layer.seen if r.path.startswith("/finalize-order/")]
        assert len(finalized) == 1, layer.seen
        downloads = [r.path for r in layer.seen if r.path.startswith("/certZ/")]
        assert len(downloads) >= 2 and len(set(downloads)) == 1, downloads


def test_state_dir_read_only(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """A read-only state directory (a tmpfs remounted ro): the stored certificate is served,
    each failed attempt is one line naming the read-only file system (no busy loop), and once
    the directory is writable again the certificate is renewed and stored."""
    with tmpfs(tmp_path / "state", "1m") as state:

        def inject(_: Any) -> Deferred[None]:
            remount(state, "ro")
            return _fire(None)

        def clear(_: Any) -> Deferred[None]:
            remount(state, "rw")
            return _fire(None)

        seen = run_fault(pebble, run_reactor, state, "ro.store.example.com", inject, clear,
                         "Read-only file system", min_failures=2, recorded=False)
        assert seen["failures"] <= 4, seen  # backing off, not retrying in a loop


def test_state_dir_full(pebble: Pebble, run_reactor: Any, tmp_path: Path) -> None:  # noqa: F811
    """A full state directory (a 64 KiB tmpfs filled up): the stored certificate is served,
    each failed attempt is one line saying no space is left, and once space is freed the
    certificate is renewed and stored."""
    with tmpfs(tmp_path / "state", "64k") as state:
        filler: list[Path] = []

        def inject(_: Any) -> Deferred[None]:
            filler.append(fill(state))
            return _fire(None)

        def clear(_: Any) -> Deferred[None]:
            filler[0].unlink()
            return _fire(None)

        seen = run_fault(pebble, run_reactor, state, "full.store.example.com", inject, clear,
                         "No space left on device", min_failures=2, recorded=False)
        assert seen["failures"] <= 4, seen


# -- the timing rules on a Clock -----------------------------------------------------------------
class _FailingStore(MemoryStore):
    """A store whose writes fail with ``error`` while it is set (a read-only or full disk)."""

    error: OSError | None = None
    release_error: OSError | None = None

    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        if self.error is not None:
            d: Deferred[Lock | None] = Deferred()
            d.errback(self.error)
            return d
        return super().acquire(name, ttl)

    def release(self, lock: Lock) -> Deferred[None]:
        if self.release_error is not None:
            d: Deferred[None] = Deferred()
            d.errback(self.release_error)
            return d
        return super().release(lock)


class TimingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp())
        self.store = _FailingStore(self.clock)
        self.obtainer = FakeObtainer()
        self.sni = SNIContextMap(["a.example.com"])
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def start(self) -> IssuingService:
        service = IssuingService(
            clock=self.clock, store=self.store, obtainer=self.obtainer, sni=self.sni,
            domains=["a.example.com"], rng=FixedRandom(0.5),
            key_generator=lambda: ec.generate_private_key(ec.SECP256R1()),
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def test_retry_after_beyond_backoff(self) -> None:
        """A rateLimited answer with Retry-After in 2 h: nothing is ordered before, the next
        order is placed right then (the backoff alone would retry after 1 minute)."""
        self.start()
        retry_at = self.now() + datetime.timedelta(hours=2)
        self.obtainer.calls[0][1].errback(ObtainFailed(
            "a.example.com: ACME error rateLimited: slow down", retry_at, "rateLimited"))
        self.clock.advance(2 * 3600 - 1)
        self.assertEqual(len(self.obtainer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.obtainer.calls), 2)

    def test_backoff_doubles_to_six_hours(self) -> None:
        """Repeated failures are retried after 1, 2, 4, ... minutes, at most 6 hours apart."""
        self.start()
        gaps = []
        for _ in range(12):
            asked = self.clock.seconds()
            self.obtainer.calls[-1][1].errback(ObtainFailed("a.example.com: connection refused"))
            calls = len(self.obtainer.calls)
            while len(self.obtainer.calls) == calls:
                self.clock.advance(1)
            gaps.append(self.clock.seconds() - asked)
        self.assertEqual(gaps[:4], [60, 120, 240, 480])
        self.assertEqual(max(gaps), 6 * 3600)

    def test_store_failure_backs_off(self) -> None:
        """A store that cannot be written (read-only, full): the failure is one error line and
        the next attempt backs off like any other failure; no busy loop, no traceback."""
        self.store.error = OSError(errno.EROFS, "Read-only file system", "/state/locks")
        service = self.start()
        self.assertEqual(service.renewal_states()["a.example.com"].failures, 1)
        self.clock.advance(59)
        self.assertEqual(service.renewal_states()["a.example.com"].failures, 1)
        self.clock.advance(1)
        self.assertEqual(service.renewal_states()["a.example.com"].failures, 2)
        lines = self.logs.lines(LogLevel.error)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Read-only file system", lines[0])
        self.assertFalse(any("log_failure" in e for e in self.logs.events))
        self.store.error = None
        self.clock.advance(120)
        self.assertEqual(len(self.obtainer.calls), 1)

    def test_lock_release_failure_is_one_line(self) -> None:
        """The directory turns read-only during an order: the certificate is still served,
        releasing the lock fails with one warning (it expires by itself), no traceback."""
        self.start()
        self.store.release_error = OSError(errno.EROFS, "Read-only file system")
        request, d = self.obtainer.calls[0]
        cert = self_signed(request.name, self.now(), self.now() + 90 * DAY, key=request.key)
        d.callback(cert.fullchain_pem())
        self.assertTrue(self.sni.has_certificate("a.example.com"))
        lines = self.logs.lines(LogLevel.warn)
        self.assertEqual(len([x for x in lines if "cannot release the order lock" in x]), 1, lines)
        self.assertFalse(any("log_failure" in e for e in self.logs.events))


def test_http_error_without_problem_document() -> None:
    """A 503 from something in front of the CA (no problem document): one line naming the
    status and URL, and its Retry-After is honoured."""
    import requests
    from acme import errors as acme_errors

    from trackingproxy.acme.problems import explain

    response = requests.Response()
    response.status_code, response.reason = 503, "Service Unavailable"
    response.url = "https://ca.example/acme/new-order"
    response.headers["Retry-After"] = "120"
    response.request = requests.Request("POST", response.url).prepare()
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    error = explain(acme_errors.ClientError(response), "a.example.com", "https://ca.example/dir",
                    now)
    assert error.message == (
        "a.example.com: the ACME server https://ca.example/dir answered HTTP 503 Service "
        "Unavailable to POST https://ca.example/acme/new-order without an ACME problem "
        "document; retrying later"
    )
    assert error.retry_after == now + datetime.timedelta(seconds=120)
    assert error.problem_type == "http-503"
