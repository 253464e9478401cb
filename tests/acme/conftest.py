"""Fixtures for the ACME tests: a real pebble + pebble-challtestsrv, and a fresh reactor runner.

pebble comes from Debian's ``pebble`` package (installed here when missing). Without it the
integration tests are skipped with a reason, except under CI=true where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from tests.ports import free_port


def _find_pebble() -> tuple[str, str] | None:
    pebble, challtestsrv = shutil.which("pebble"), shutil.which("pebble-challtestsrv")
    if pebble and challtestsrv:
        return pebble, challtestsrv
    return None


@pytest.fixture(scope="session")
def pebble_binaries() -> tuple[str, str]:
    found = _find_pebble()
    if found is None:
        cmd = ["apt-get", "install", "-y", "pebble"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            cmd = ["sudo", "-n", *cmd]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, check=False, capture_output=True, timeout=300)
        found = _find_pebble()
    if found is None:
        message = "pebble is not installed and `apt-get install -y pebble` failed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the ACME integration tests must run)")
        pytest.skip(message)
    return found


class Pebble:
    """One pebble (+ challtestsrv) on free loopback ports; ``http_port`` is where it validates."""

    def __init__(
        self,
        binaries: tuple[str, str],
        workdir: Path,
        http_port: int,
        validity: int | None = None,
        nonce_reject: int = 0,
        strict: bool = False,
        eab_keys: dict[str, str] | None = None,
    ) -> None:
        self.binaries = binaries
        self.workdir = workdir
        self.http_port = http_port
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_bundle = workdir / "pebble-api-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        cert, key = workdir / "pebble-api-cert.pem", workdir / "pebble-api-key.pem"
        server.cert_chain_pems[0].write_to_path(str(cert))
        server.private_key_pem.write_to_path(str(key))
        config: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab_keys is not None,
        }
        if eab_keys is not None:
            config["externalAccountMACKeys"] = eab_keys
        if validity is not None:
            config["certificateValidityPeriod"] = validity
        self.config = workdir / "pebble-config.json"
        self.config.write_text(json.dumps({"pebble": config}))
        self.env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_AUTHZREUSE": "0",
            "PEBBLE_WFE_NONCEREJECT": str(nonce_reject),
        }
        self.strict = strict
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = workdir / "pebble.log"

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        pebble, challtestsrv = self.binaries
        out = self.log.open("ab")
        self.procs.append(subprocess.Popen(
            [challtestsrv, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-dns01", f"127.0.0.1:{self.dns_port}",
             "-management", f"127.0.0.1:{self.dns_management_port}"],
            stdout=out, stderr=subprocess.STDOUT, env=self.env,
        ))
        args = [pebble, "-config", str(self.config), "-dnsserver", f"127.0.0.1:{self.dns_port}"]
        if self.strict:
            args.append("-strict")
        self.procs.append(
            subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.directory_url, verify=str(self.ca_bundle), timeout=2)
                requests.get(f"http://127.0.0.1:{self.dns_management_port}/", timeout=2)
                return
            except requests.RequestException:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    self.stop()
                    tail = self.log.read_text()[-3000:]
                    raise RuntimeError(f"pebble did not start:\n{tail}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def root_pem(self) -> bytes:
        r = requests.get(
            f"https://127.0.0.1:{self.management_port}/roots/0",
            verify=str(self.ca_bundle), timeout=5,
        )
        r.raise_for_status()
        return r.content

    def add_a(self, host: str, address: str) -> None:
        r = requests.post(
            f"http://127.0.0.1:{self.dns_management_port}/add-a",
            json={"host": host, "addresses": [address]}, timeout=5,
        )
        r.raise_for_status()


@pytest.fixture
def pebble_factory(
    pebble_binaries: tuple[str, str], tmp_path: Path
) -> Iterator[Callable[..., Pebble]]:
    made: list[Pebble] = []

    def make(start: bool = True, **options: Any) -> Pebble:
        workdir = tmp_path / f"pebble{len(made)}"
        workdir.mkdir()
        options.setdefault("http_port", free_port())
        pebble = Pebble(pebble_binaries, workdir, **options)
        made.append(pebble)
        if start:
            pebble.start()
        return pebble

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def run_reactor() -> Callable[..., Any]:
    """``run_reactor(scenario, timeout)``: run ``scenario(reactor)`` on a fresh reactor."""

    def run(scenario: Callable[[Any], Deferred[Any]], timeout: float = 60.0) -> Any:
        from twisted.internet.selectreactor import SelectReactor

        reactor = SelectReactor()
        outcome: list[Any] = []

        def go() -> None:
            d = maybeDeferred(scenario, reactor)
            d.addBoth(outcome.append)
            d.addBoth(lambda _: reactor.stop())

        def too_long() -> None:
            outcome.append(Failure(TimeoutError(f"scenario took more than {timeout}s")))
            reactor.stop()

        reactor.callWhenRunning(go)
        reactor.callLater(timeout, too_long)
        reactor.run(installSignalHandlers=False)
        if not outcome:
            raise RuntimeError("the reactor stopped without a result")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    return run
