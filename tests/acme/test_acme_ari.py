"""Integration: ACME Renewal Information through a fake ARI layer in front of pebble.

pebble 2.4 has no ARI; ``AriProxy`` adds it (see its docstring). One scenario covers the
renewal time following the window, ``replaces`` on the renewal order, and the fall-back to a
plain order when the CA answers ``alreadyReplaced``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Generator
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher

from tests.acme.ari_proxy import AriProxy
from tests.acme.pebble_harness import Harness, logs_captured, wait_for
from trackingproxy.acme.client import ari_cert_id
from trackingproxy.acme.testing import FixedRandom

A = "a.example.com"


def test_ari_window_replaces_and_already_replaced(pebble_factory, run_reactor, tmp_path) -> None:
    """With ARI offered: the renewal happens in the middle of the CA's window (not by the
    lifetime rule), its order carries ``replaces`` with the old certificate's id, and the
    Retry-After is kept as the next ARI check. When the CA answers ``alreadyReplaced``, the
    client orders again without ``replaces`` and gets the certificate, without an error."""
    pebble = pebble_factory()
    windows: dict[str, tuple[datetime.datetime, datetime.datetime]] = {}
    # The first certificate gets a window 2-4 s after the CA is asked, the second one "now".
    offsets = [(2.0, 4.0), (0.0, 1.0)]

    def window(cert_id: str) -> tuple[datetime.datetime, datetime.datetime]:
        if cert_id not in windows:
            # Whole seconds: the proxy sends RFC 3339 times without fractions.
            asked = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
            start, end = offsets[len(windows)]
            windows[cert_id] = (asked + datetime.timedelta(seconds=start),
                                asked + datetime.timedelta(seconds=end))
        return windows[cert_id]
    proxy = AriProxy(
        pebble_url=f"https://127.0.0.1:{pebble.port}", ca_bundle=pebble.ca_bundle,
        cert=pebble.workdir / "pebble-api-cert.pem", key=pebble.workdir / "pebble-api-key.pem",
        window=window, retry_after=7200,
    )
    state = tmp_path / "state"
    logs = logs_captured()

    @inlineCallbacks
    def scenario(reactor: Any) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        proxy.start(reactor)
        h = Harness(reactor, pebble, [A])
        service = h.direct_service(state, directory_url=proxy.url, rng=FixedRandom(0.5))
        seen: dict[str, Any] = {}
        try:
            # The window is set before the first certificate exists: ids are known only after.
            def served_id() -> str | None:
                cert = h.sni.certificate_for(A)
                return None if cert is None else ari_cert_id(cert.leaf)

            service.startService()
            yield wait_for(reactor, lambda: served_id() is not None, 30)
            first = h.sni.certificate_for(A)
            assert first is not None
            first_id = served_id()
            assert first_id is not None
            # The issuer asks for ARI right after installing the certificate.
            yield wait_for(reactor, lambda: first_id in proxy.ari_requests, 10)
            seen["window"] = windows[first_id]
            meta = state / "certificates" / A / "meta.json"
            yield wait_for(reactor, lambda: json.loads(meta.read_text())["ari"] is not None, 5)
            seen["meta"] = json.loads(meta.read_text())
            yield wait_for(reactor, lambda: h.sni.certificate_for(A) is not first, 30)
            second = h.sni.certificate_for(A)
            assert second is not None
            seen["first_id"] = first_id

            # Second renewal: the CA says the certificate was already replaced.
            proxy.refuse_replaces = True
            second_id = ari_cert_id(second.leaf)
            yield wait_for(reactor, lambda: h.sni.certificate_for(A) is not second, 30)
            seen["second_id"] = second_id
        finally:
            yield h.close()
            yield proxy.stop()
        return seen

    try:
        seen = run_reactor(scenario, timeout=60)
    finally:
        globalLogPublisher.removeObserver(logs)

    assert logs.lines(LogLevel.error) == [], logs.lines(LogLevel.error)
    assert [(o.replaces, o.refused) for o in proxy.orders] == [
        (None, False),
        (seen["first_id"], False),
        (seen["second_id"], True),
        (None, False),
    ]
    start, end = seen["window"]
    renewed_at = datetime.datetime.fromtimestamp(proxy.orders[1].at, datetime.UTC)
    middle = start + (end - start) / 2
    assert abs((renewed_at - middle).total_seconds()) < 0.5, (renewed_at, start, end)
    # The window and the next ARI check (Retry-After: 2 h) are stored with the certificate.
    ari = seen["meta"]["ari"]
    assert ari is not None
    next_check = datetime.datetime.fromisoformat(ari["next_check"])
    delta = (next_check - (start - datetime.timedelta(seconds=2))).total_seconds()
    assert 7200 <= delta < 7200 + 2, delta
    assert datetime.datetime.fromisoformat(ari["start"]) == start


def test_ari_cert_id_matches_rfc_example() -> None:
    """The certificate identifier sent as ``replaces`` follows RFC 9773 (AKI.serial)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    # RFC 9773 section 4.1: keyIdentifier 69:88:5B:...:D4 and serial 0x87654321.
    aki = x509.AuthorityKeyIdentifier(
        bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4"), None, None
    )
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(0x87654321)
        .not_valid_before(datetime.datetime(2030, 1, 1))
        .not_valid_after(datetime.datetime(2030, 2, 1))
        .add_extension(aki, critical=False).sign(key, hashes.SHA256())
    )
    # Serial 0x87654321 has its top bit set: DER adds a leading zero byte.
    assert ari_cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
