"""Integration: External Account Binding against a pebble that requires it.

Each start goes through ``build_acme`` with ``AcmeSettings`` (what the command line builds),
on a fresh reactor, sharing one state directory.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher

from tests.acme.pebble_harness import Harness, logs_captured, wait_for
from trackingproxy.acme.settings import AcmeSettings, build_acme
from trackingproxy.acme.testing import LogCapture

A = "a.example.com"
KID = "kid-trackingproxy"


def _hmac_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")


def _event_text(capture: LogCapture) -> str:
    """Every captured event: formatted, and every field's repr (a secret hides in neither)."""
    return "\n".join(capture.lines() + [repr(sorted(e.items())) for e in capture.events])


def test_eab_required(pebble_factory, run_reactor, tmp_path: Path, caplog) -> None:
    """With EAB required: no EAB, then a wrong HMAC key, are each refused with one error line
    naming --eab-kid/--eab-hmac-key; the right kid and key get a certificate; the HMAC key is
    in no log event (Twisted's or the acme library's) and in no file of the state directory."""
    caplog.set_level(logging.DEBUG)
    key = _hmac_key()
    wrong = _hmac_key()
    pebble = pebble_factory(eab_keys={KID: key})
    state = tmp_path / "state"
    logs = logs_captured()

    def attempt(eab: tuple[str, str] | None, expect_cert: bool) -> None:
        settings = AcmeSettings(
            email="ops@example.com", directory=pebble.directory_url, ca_bundle=pebble.ca_bundle,
            state_dir=state, eab_kid=eab[0] if eab else None, eab_hmac_key=eab[1] if eab else None,
        )
        before = len(logs.lines(LogLevel.error))

        @inlineCallbacks
        def scenario(reactor: Any) -> Generator[Deferred[Any], Any, None]:
            h = Harness(reactor, pebble, [A])
            parts = build_acme(settings, [A], [], h.sni, reactor)
            service, responder = parts.service, parts.responder
            h.listen(responder)
            h.service = service  # type: ignore[assignment]
            service.startService()
            try:
                if expect_cert:
                    yield wait_for(reactor, lambda: h.sni.has_certificate(A), 30)
                else:
                    yield wait_for(
                        reactor, lambda: len(logs.lines(LogLevel.error)) > before, 30
                    )
                    assert not h.sni.has_certificate(A)
            finally:
                yield h.close()

        run_reactor(scenario, timeout=60)

    try:
        attempt(None, expect_cert=False)
        attempt((KID, wrong), expect_cert=False)
        attempt((KID, key), expect_cert=True)
    finally:
        globalLogPublisher.removeObserver(logs)

    errors = logs.lines(LogLevel.error)
    assert len(errors) == 2, errors
    for line in errors:
        assert "\n" not in line
        assert "--eab-kid" in line and "--eab-hmac-key" in line, line
    assert "externalAccountRequired" in errors[0]
    assert "Registered ACME account" in "\n".join(logs.lines(LogLevel.info))

    for secret in (key, wrong):
        assert secret not in _event_text(logs)
        assert secret not in caplog.text
        for path in state.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert any(state.glob("certificates/*/fullchain.pem"))


@pytest.mark.parametrize("value", ["short", "not base64!"])
def test_eab_key_validated_without_echo(value: str) -> None:
    """A malformed --eab-hmac-key is refused at start-up without repeating the key."""
    from trackingproxy.errors import ConfigError

    settings = AcmeSettings(directory="https://ca.example/dir", eab_kid=KID, eab_hmac_key=value)
    with pytest.raises(ConfigError) as caught:
        settings.validate()
    assert value not in str(caught.value)
    assert value not in repr(settings)
