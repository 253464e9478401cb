"""The parts of ``make cluster-demo`` that ``demo/run_demo.py`` does not have: a real
redis-server, HAProxy in front of the replicas, the replicas themselves, and ways to look at
them (the certificate each serves, its /status, the store's keys, what pebble issued).

Every process is started through run_demo's ``Children`` (so it is stopped by its PID at the
end, on failure and on Ctrl-C); a process the demo stops or kills on purpose is taken out of
``Children`` first, so that ``Children.check`` does not report it as a failure.
"""

from __future__ import annotations

import datetime
import http.client
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
from functools import partial
from pathlib import Path
from typing import Any

import redis
from cryptography import x509

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demo.run_demo import (  # noqa: E402
    Children,
    DemoError,
    MissingTool,
    Pebble,
    served_certificate,
    twistd_command,
    wait_for,
)

PREFIX = "trackingproxy:"
LOCK_TTL = 6  # seconds: a killed replica's order lock expires quickly here (default 120)
DEBIAN_PATHS = {"redis-server": "/usr/bin/redis-server", "haproxy": "/usr/sbin/haproxy"}
PACKAGES = {"redis-server": "redis-server", "haproxy": "haproxy", "pebble": "pebble",
            "pebble-challtestsrv": "pebble"}


def key(domain: str, part: str) -> str:
    """A store key of ``domain``: ``cert`` (hash), ``lock`` (string), ``order`` (hash)."""
    return f"{PREFIX}{{{domain}}}:{part}"


def find_tools() -> dict[str, str]:
    """The programs the demo runs, by name; MissingTool (one line) naming the packages."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool in PACKAGES:
        path = shutil.which(tool) or DEBIAN_PATHS.get(tool)
        if path is not None and os.access(path, os.X_OK):
            found[tool] = path
        else:
            missing.append(tool)
    if missing:
        packages = sorted({PACKAGES[t] for t in missing})
        raise MissingTool(
            f"{', '.join(missing)} not installed: run `make debs` "
            f"(or `sudo apt-get install {' '.join(packages)}`)"
        )
    return found


def text(value: object) -> str | None:
    """A Redis reply (bytes) as text; None stays None."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def clean_env() -> dict[str, str]:
    """This environment without TRACKINGPROXY_* settings (only the demo's options count),
    with the checkout on PYTHONPATH (for the twistd plugin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKINGPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def forget(children: Children, proc: subprocess.Popen[bytes]) -> None:
    """Stop tracking ``proc``: it is being stopped or killed on purpose."""
    children.procs = [entry for entry in children.procs if entry[1] is not proc]


def end(children: Children, proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to ``proc`` (by its PID) and wait for it to exit."""
    forget(children, proc)
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_first(children: Children, prefix: str) -> None:
    """Stop (SIGTERM, together) the children whose name starts with ``prefix``, before the
    rest: replicas finish a running order while pebble and Redis are still there."""
    chosen = [proc for name, proc, _ in children.procs if name.startswith(prefix)]
    for proc in chosen:
        if proc.poll() is None:
            proc.terminate()
    for proc in chosen:
        forget(children, proc)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Redis:
    """Debian's redis-server on 127.0.0.1:``port``, append-only file in ``dir``."""

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.port = port
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def command(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--maxmemory-policy", "noeviction",
            "--dir", str(self.dir), "--daemonize", "no",
        ]

    def start(self, children: Children) -> None:
        self.proc = children.start("redis", self.command)
        client = self.client()
        try:
            wait_for("redis-server to answer PING", lambda: _pinged(client), 15, children)
        finally:
            client.close()

    def stop(self, children: Children) -> None:
        """A clean shutdown (SIGTERM): it writes its append-only file and exits."""
        if self.proc is not None:
            end(children, self.proc, signal.SIGTERM)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           socket_connect_timeout=2)

    def wait_no_lock(self, timeout: float) -> None:
        """Wait (``timeout`` s at most) until no replica holds an order lock."""
        client = self.client()
        try:
            deadline = time.monotonic() + timeout
            while any(client.scan_iter(match=key("*", "lock"))):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
        finally:
            client.close()


def _pinged(client: redis.Redis) -> bool | None:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return None


class HAProxy:
    """HAProxy in TCP mode: round robin over the replicas on two front ports.

    The HTTP front (pebble's HTTP-01 port) sends a PROXY v2 header to the replicas'
    ``haproxy:tcp:`` listeners and checks them with one (check-send-proxy). The HTTPS front
    passes TLS through untouched to the replicas' plain ``tcp:`` HTTPS listeners (which the
    demo also reaches directly, for a handshake with each replica).
    """

    def __init__(self, binary: str, workdir: Path, http_port: int, https_port: int) -> None:
        self.binary = binary
        self.config = workdir / "haproxy.cfg"
        self.http_port = http_port
        self.https_port = https_port

    def render(self, replicas: list[Replica]) -> str:
        lines = [
            "global", "    maxconn 2000", "    log stdout format raw local0 info",
            "defaults", "    mode tcp", "    log global", "    option tcplog",
            "    option dontlognull", "    timeout connect 2s", "    timeout client 30s",
            "    timeout server 30s", "    retries 2", "    option redispatch",
            "",
            "# pebble validates HTTP-01 here: any replica answers (the challenges are in Redis)",
            "listen acme_http01", f"    bind 127.0.0.1:{self.http_port}", "    balance roundrobin",
        ]
        lines += [
            f"    server {r.node_id} 127.0.0.1:{r.http_port} send-proxy-v2 check "
            "check-send-proxy inter 500ms fall 2 rise 1" for r in replicas
        ]
        lines += ["", "# the tracking domains over HTTPS: TLS ends in the replicas",
                  "listen https_front", f"    bind 127.0.0.1:{self.https_port}",
                  "    balance roundrobin"]
        lines += [
            f"    server {r.node_id} 127.0.0.1:{r.https_port} check inter 500ms fall 2 rise 1"
            for r in replicas
        ]
        return "\n".join(lines) + "\n"

    def start(self, children: Children, replicas: list[Replica]) -> None:
        self.config.write_text(self.render(replicas))
        check = subprocess.run(  # noqa: S603 (fixed argument list, no shell)
            [self.binary, "-c", "-q", "-f", str(self.config)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if check.returncode != 0:
            raise DemoError(f"haproxy rejects {self.config}: {check.stderr.strip()}")
        children.start("haproxy", [self.binary, "-db", "-f", str(self.config)])
        for port in (self.http_port, self.https_port):
            wait_for(f"haproxy on port {port}", partial(_connects, port), 15, children)


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


class Replica:
    """One ``twistd trackingproxy`` replica: its node id, ports, state directory and log."""

    def __init__(self, node_id: str, workdir: Path, ports: list[int], common: list[str]) -> None:
        self.node_id = node_id
        self.http_port, self.https_port, self.admin_port = ports
        self.log = workdir / f"{node_id}.log"
        self.args = [
            "--nodaemon", "--pidfile=", "trackingproxy", "--node-id", node_id,
            "--state-dir", f"{node_id}-state",
            "--http-port", f"haproxy:tcp:{self.http_port}:interface=127.0.0.1",
            "--https-port", f"tcp:{self.https_port}:interface=127.0.0.1",
            "--admin-port", f"tcp:{self.admin_port}:interface=127.0.0.1",
            *common,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, children: Children) -> None:
        self.proc = children.start(self.node_id, [*twistd_command(), *self.args],
                                   env=clean_env())

    def wait_listening(self, children: Children) -> None:
        wait_for(f"{self.node_id}'s admin port (see {self.log})",
                 lambda: _connects(self.admin_port), 30, children)

    def kill9(self, children: Children) -> None:
        if self.proc is not None:
            end(children, self.proc, signal.SIGKILL)
            self.proc = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def serial(self, domain: str, root: Path) -> int:
        """The serial this replica serves for ``domain`` (verified); raises if none."""
        return served_certificate(domain, self.https_port, root).serial_number

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/status"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def cluster_facts(self, up: bool, synced_after: float = 0.0) -> dict[str, Any] | None:
        """The "cluster" object of /status once it says the store is ``up`` (and, with
        ``synced_after``, once this replica resynced with the store after that time)."""
        facts: dict[str, Any] = self.status().get("cluster") or {}
        if facts.get("store_up") is not up:
            return None
        if synced_after and not (facts.get("store_last_sync") or 0) >= synced_after:
            return None
        return facts

    def store_up_metric(self) -> str:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        found = re.search(r"^trackingproxy_store_up(?:\{[^}]*\})? (\S+)$", text, re.M)
        return found.group(1) if found else "?"

    def log_lines(self, needle: str) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if needle in line]


def describe_facts(facts: dict[str, Any]) -> str:
    """``store_up`` and ``store_last_sync`` of /status "cluster", as JSON and clock time."""
    value = facts.get("store_up")
    up = str(value).lower() if isinstance(value, bool) else "null"
    when = facts.get("store_last_sync")
    if isinstance(when, int | float):
        at = datetime.datetime.fromtimestamp(when, datetime.UTC)
        return f"store_up {up}, store_last_sync {at:%H:%M:%S} UTC ({time.time() - when:.0f} s ago)"
    return f"store_up {up}, store_last_sync {when}"


def same_serial(replicas: list[Replica], domain: str, root: Path) -> int | None:
    """The serial every replica in ``replicas`` serves for ``domain``, if they agree."""
    serials = {r.serial(domain, root) for r in replicas}
    return serials.pop() if len(serials) == 1 else None


class Issued:
    """What pebble issued: its "Issued certificate serial S for order O" lines, and the
    name in each certificate (asked from its management API)."""

    def __init__(self, pebble: Pebble, log: Path) -> None:
        self.pebble = pebble
        self.log = log
        self._names: dict[str, str] = {}

    def serials(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return re.findall(r"Issued certificate serial ([0-9a-fA-F]+)", text)

    def count(self) -> int:
        return len(self.serials())

    def for_domain(self, domain: str) -> int:
        return sum(1 for s in self.serials() if self._name(s) == domain)

    def _name(self, serial: str) -> str:
        if serial not in self._names:
            url = f"https://127.0.0.1:{self.pebble.management_port}/cert-status-by-serial/{serial}"
            with urllib.request.urlopen(
                url, context=self.pebble.api_context, timeout=5
            ) as r:
                pem = json.loads(r.read())["Certificate"].encode()
            cert = x509.load_pem_x509_certificate(pem)
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self._names[serial] = ",".join(names.value.get_values_for_type(x509.DNSName))
        return self._names[serial]


def front_request(port: int, domain: str, path: str, context: ssl.SSLContext) -> int:
    """GET ``path`` from ``domain`` over HTTPS via HAProxy's front ``port``: the status."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=domain) as tls,
    ):
        conn = http.client.HTTPConnection(domain, port, timeout=5)
        conn.sock = tls
        conn.request("GET", path, headers={"User-Agent": "cluster-demo"})
        response = conn.getresponse()
        response.read()
        return response.status
