"""A cluster on loopback: real redis-server, HAProxy, pebble, the spgo.io stand-in and N real
``twistd trackingproxy`` replicas, each a subprocess on its own free ports.

HAProxy listens on pebble's HTTP-01 port and on a front HTTPS port and spreads connections
round-robin over the replicas with the PROXY protocol (v2), as a production load balancer
would; the replicas listen with ``haproxy:tcp:`` endpoints. Each replica has its own state
directory (its local copy) and a ``--node-id``; they share the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from cryptography import x509

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
_T = TypeVar("_T")


def find_haproxy() -> str:
    """The haproxy binary; under CI=true its absence fails the test, else skips it."""
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )
    if found is None:
        message = "haproxy is not installed; install it with `apt-get install haproxy`"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the cluster tests must run)")
        pytest.skip(message)
    return found


class GaveUp(AssertionError):
    """Raised by a probe whose wait can never succeed (the process it waits for exited):
    ``wait_until`` lets it through at once instead of polling on to its timeout."""


def wait_until(what: str, probe: Callable[[], _T | None], timeout: float,
               interval: float = 0.05) -> _T:
    """Poll ``probe`` until it returns something other than None/False; fail after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except GaveUp:
            raise
        except Exception as e:  # the probe's own failure: keep polling, report the last one
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


class HAProxy:
    """HAProxy in TCP mode: each front port round-robins over its back ports, with PROXY v2
    when the front says so. Each back end is health-checked with ``GET /healthz`` on its
    admin port (a replica that died or is paused is taken out within about a second; a TCP
    check would not see a paused process: the kernel still accepts its connections). It is
    started before the replicas, as a production balancer would be, and a replica that is
    down is checked every 100 ms, so one that starts is in within about 0.1 s: before the
    CA's first validation request (a replica orders as soon as it starts)."""

    def __init__(
        self, binary: str, workdir: Path,
        fronts: dict[int, tuple[list[tuple[int, int]], bool]],
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.fronts = fronts
        self.config = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _render(self) -> str:
        lines = [
            "global", "    maxconn 2000",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 30s",
            "    timeout server 30s", "    timeout check 500ms", "    retries 2",
            "    option redispatch",
        ]
        for front, (backs, proxy) in self.fronts.items():
            lines += [f"listen front_{front}", f"    bind 127.0.0.1:{front}",
                      "    balance roundrobin", "    option httpchk GET /healthz"]
            send = "send-proxy-v2 " if proxy else ""
            lines += [
                f"    server r{i} 127.0.0.1:{port} {send}check port {admin} "
                "inter 300ms downinter 100ms fall 2 rise 1"
                for i, (port, admin) in enumerate(backs)
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.config.write_text(self._render())
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-f", str(self.config), "-db"], stdout=out, stderr=subprocess.STDOUT
        )
        for front in self.fronts:
            wait_until(f"haproxy on {front}", partial(self._listening, front), 10)

    def _listening(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise GaveUp(f"haproxy exited: {self.log.read_text()[-2000:]}")
        return _connects(port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _connects(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class StandIn:
    """demo/standin.py (the spgo.io stand-in) over HTTPS with a trustme certificate."""

    def __init__(self, workdir: Path) -> None:
        ca = trustme.CA()
        self.ca_file = workdir / "standin-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        server = ca.issue_cert("127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(workdir / "standin-cert.pem"))
        server.private_key_pem.write_to_path(str(workdir / "standin-key.pem"))
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "demo" / "standin.py"), "--cert", "standin-cert.pem",
             "--key", "standin-key.pem"], cwd=workdir, stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        self.proc.stdout.close()
        self.url = f"https://127.0.0.1:{int(line.split()[-1])}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


class Replica:
    """One ``twistd trackingproxy`` replica with its ports, state directory and log."""

    def __init__(self, node_id: str, workdir: Path, args: list[str]) -> None:
        self.node_id = node_id
        self.workdir = workdir
        self.http_port, self.https_port, self.admin_port = free_port(), free_port(), free_port()
        self.state = workdir / "state"
        self.log = workdir / "twistd.log"
        self.args = [
            "--http-port", f"haproxy:tcp:{self.http_port}:interface=127.0.0.1",
            "--https-port", f"tcp:{self.https_port}:interface=127.0.0.1",
            "--admin-port", f"tcp:{self.admin_port}:interface=127.0.0.1",
            "--state-dir", str(self.state), "--node-id", node_id,
            "--access-log", "off", *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("TRACKINGPROXY_STORE", None)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", "trackingproxy", *self.args],
            cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
        )

    def wait_listening(self, timeout: float = 20) -> None:
        wait_until(f"{self.node_id}'s admin port ({self.log})", self._admin_up, timeout)

    def _admin_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise GaveUp(f"{self.node_id} exited: {self.log.read_text()[-3000:]}")
        return _connects(self.admin_port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(5)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/status", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    def serial(self, domain: str, root: Path) -> int | None:
        """The serial this replica serves for ``domain`` (verified), or None."""
        return served_serial(self.https_port, domain, root)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def served_serial(port: int, domain: str, root: Path) -> int | None:
    context = ssl.create_default_context(cafile=str(root))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname=domain) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return None if der is None else x509.load_der_x509_certificate(der).serial_number


def issued_count(pebble_log: Path) -> int:
    """How many certificates pebble issued (its "Issued certificate" lines)."""
    return len(re.findall(r"Issued certificate", pebble_log.read_text(errors="replace")))


def tracebacks(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Traceback (most recent call last)" in line]


@contextlib.contextmanager
def stopping(*parts: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for part in reversed(parts):
            with contextlib.suppress(Exception):
                part.stop()
