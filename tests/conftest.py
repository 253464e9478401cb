"""Test-wide set-up: any traceback logged while a test runs fails that test (trial's test cases
do this themselves; this fixture gives plain pytest tests, hypothesis ones included, the same
rule). The suite runs on Twisted's own TCP writes; the optimistic ones of
`trackingproxy.ops.tcpwrite`, a process-wide patch that the twistd entry point installs (and
logs), are covered by the tests that start the real twistd process, by
tests/ops/test_tcpwrite.py, and by the whole suite with TP_TCPWRITE=1."""

import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.ops import tcpwrite

if os.environ.get("TP_TCPWRITE") == "1":
    tcpwrite.install()


@pytest.fixture(autouse=True)
def no_traceback_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if an error with a traceback is logged while it runs. (Trial's test
    cases are left to trial, which fails them for any logged error they do not flush.)"""
    cls = getattr(request.node, "cls", None)
    if cls is not None and issubclass(cls, SynchronousTestCase):
        yield
        return
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observe)
    if failures and request.node.get_closest_marker("logs_failures") is None:
        lines = [formatEvent(e) or repr(e.get("log_failure")) for e in failures]
        pytest.fail("logged with a traceback:\n" + "\n".join(lines), pytrace=False)
