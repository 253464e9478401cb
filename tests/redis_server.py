"""Real redis-servers on free loopback ports, for the tests of the shared store.

``RedisServer`` runs Debian's ``redis-server`` (no persistence by default) in a temporary
directory; it can be stopped, killed and started again on the same port. Given ``tls``
(``TLSFiles``, made by ``make_tls_files`` with trustme) it listens with TLS only; given
``replica_of`` it replicates another one. ``SentinelServer`` runs ``redis-server --sentinel``
monitoring one master (its config file in its own writable directory: Sentinel rewrites it).
The ``redis_server`` fixture (one server per session, flushed before every test) is imported by
the conftests that need it. Without redis-server the tests are skipped with a reason, except
under CI=true where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from attrs import frozen
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.ports import free_port

__all__ = [
    "RedisServer",
    "SentinelServer",
    "TLSFiles",
    "find_redis_server",
    "make_tls_files",
    "redis_server",
    "redis_server_session",
    "require_redis_server",
    "require_tls_support",
]

INSTALL = "apt-get install -y redis-server"


def find_redis_server() -> str | None:
    """The redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


@frozen
class TLSFiles:
    """PEM files for a TLS server: the CA that signed it, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, *names: str) -> TLSFiles:
    """A new private CA (trustme) and a server certificate for ``names`` (127.0.0.1 by
    default), written to ``directory``."""
    import trustme  # a test dependency, only needed by the TLS tests

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(*(names or ("127.0.0.1",)))
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    return files


def _tls_args(tls: TLSFiles) -> list[str]:
    return [
        "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
        "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no",
    ]


def _wait(check: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``check`` (errors count as not yet) until it holds; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} ({last})")
        time.sleep(0.02)


class RedisServer:
    """One redis-server on 127.0.0.1:``port`` (started by ``start()``).

    @ivar tls: when given, the server speaks only TLS on ``port`` (clients not asked for a
        certificate); ``client()`` and ``url`` use it.
    @ivar replica_of: the port of a master on 127.0.0.1 to replicate (same password, TLS).
    """

    def __init__(
        self,
        binary: str,
        *,
        password: str | None = None,
        port: int | None = None,
        extra: tuple[str, ...] = ("--save", "", "--appendonly", "no"),
        tls: TLSFiles | None = None,
        replica_of: int | None = None,
    ) -> None:
        self.binary = binary
        self.password = password
        self.port = port or free_port()
        self.extra = extra
        self.tls = tls
        self.replica_of = replica_of
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        """The command line (without the password)."""
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), *_tls_args(self.tls)]
        else:
            ports = ["--port", str(self.port)]
        args = [
            self.binary, *ports, "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
            "--repl-diskless-sync-delay", "0", *self.extra,
        ]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
            if self.tls:
                args += ["--tls-replication", "yes"]
            if self.password:
                args += ["--masterauth", self.password]
        return args

    @property
    def log(self) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        args = self._args()
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        probe = self.client(timeout=0.5)
        try:
            while True:
                try:
                    probe.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = self.log
                        self.stop()
                        raise RuntimeError(f"redis-server did not start:\n{log}") from None
                    time.sleep(0.01)
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop it (SIGTERM: a clean shutdown) and wait for the port to close."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill it (SIGKILL: as a crash)."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A client with the password, short timeouts and no retrying (when the server has
        TLS: its certificate verified against ``tls.ca``, its name not checked)."""
        tls: dict[str, Any] = {}
        if self.tls:  # the name is not checked: a test may serve a certificate for another
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_check_hostname": False}
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), **tls,
        )

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section`` (a fresh connection, closed again)."""
        client = self.client(timeout=0.5)
        try:
            answer: dict[str, Any] = client.info(section)
            return answer
        finally:
            client.close()

    def wait_replicating(self, timeout: float = 10.0) -> None:
        """Wait until this replica's link to its master is up and the first sync is done."""
        def synced() -> bool:
            info = self.info("replication")
            return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")
        _wait(synced, f"replica {self.port} to sync with its master", timeout)

    def wait_role(self, role: str, timeout: float = 10.0) -> None:
        """Wait until INFO says this server is ``master`` or ``slave``."""
        _wait(lambda: self.info("replication").get("role") == role,
              f"{self.port} to become {role}", timeout)

    def flushall(self) -> None:
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()


class SentinelServer(RedisServer):
    """One Sentinel (``redis-server <conf> --sentinel``) on 127.0.0.1:``port`` monitoring
    the master on 127.0.0.1:``master_port`` as ``service`` with quorum 1 and short timeouts.

    The config file is written once, in the server's own directory, and left to Sentinel to
    rewrite (it records the replicas it found and any failover there; a restart keeps it).
    The password, if any, is the master's (Sentinel itself asks for none).
    """

    def __init__(
        self,
        binary: str,
        master_port: int,
        *,
        service: str = "mymaster",
        password: str | None = None,
        port: int | None = None,
        tls: TLSFiles | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(binary, port=port, extra=(), tls=tls)
        self.master_port = master_port
        self.service = service
        self.master_password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.conf = self.dir / "sentinel.conf"

    @property
    def url(self) -> str:
        """The store URL reaching the master through this Sentinel."""
        auth = f":{self.master_password}@" if self.master_password else ""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{self.service}/0"

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"logfile {self.dir / 'redis.log'}",
            "daemonize no",
        ]
        if self.tls:
            lines += [
                "port 0", f"tls-port {self.port}", f"tls-cert-file {self.tls.cert}",
                f"tls-key-file {self.tls.key}", f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients no", "tls-replication yes",
            ]
        else:
            lines.append(f"port {self.port}")
        name = self.service
        lines += [
            f"sentinel monitor {name} 127.0.0.1 {self.master_port} 1",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.master_password:
            lines.append(f"sentinel auth-pass {name} {self.master_password}")
        return "\n".join(lines) + "\n"

    def _args(self) -> list[str]:
        if not self.conf.exists():
            self.conf.write_text(self._config())
            self.conf.chmod(0o600)
        return [self.binary, str(self.conf), "--sentinel"]

    def master_address(self) -> tuple[str, int] | None:
        """Where Sentinel says the master of ``service`` is now."""
        client = self.client(timeout=0.5)
        try:
            answer: Any = client.sentinel_get_master_addr_by_name(self.service)
        finally:
            client.close()
        if not answer:
            return None
        host = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        return host, int(answer[1])

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas Sentinel knows of (``SENTINEL REPLICAS``), as redis-py parses them."""
        client = self.client(timeout=0.5)
        try:
            found: list[dict[str, Any]] = client.sentinel_slaves(self.service)
            return found
        finally:
            client.close()

    def wait_replicas_known(self, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until Sentinel sees ``count`` connected, healthy replicas (needed before a
        failover can promote one)."""
        def known() -> bool:
            healthy = [
                r for r in self.replicas()
                if r.get("is_slave") and not r.get("is_disconnected") and not r.get("is_sdown")
                and r.get("master-link-status") == "ok"
            ]
            return len(healthy) >= count
        _wait(known, f"Sentinel {self.port} to know {count} replica(s)", timeout)

    def wait_master(self, port: int, timeout: float = 20.0) -> None:
        """Wait until Sentinel names 127.0.0.1:``port`` as the master."""
        _wait(lambda: self.master_address() == ("127.0.0.1", port),
              f"Sentinel {self.port} to name port {port} the master", timeout)


def require_redis_server() -> str:
    """The redis-server binary; skip the test without one (fail under CI=true)."""
    binary = find_redis_server()
    if binary is None:
        cmd = ["apt-get", "install", "-y", "redis-server"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            cmd = ["sudo", "-n", *cmd]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, check=False, capture_output=True, timeout=300)
        binary = find_redis_server()
    if binary is None:
        message = f"redis-server is not installed and `{INSTALL}` failed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the shared-store tests must run)")
        pytest.skip(message)
    return binary


def require_tls_support(binary: str) -> None:
    """Skip (fail under CI=true) when ``binary`` was built without TLS: a TLS build refuses
    TLS without a CA file with "Failed to configure TLS" and exits at once."""
    args = [binary, "--port", "0", "--tls-port", str(free_port()), "--bind", "127.0.0.1",
            "--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent", "--save", ""]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=5, check=False)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        output = ""  # it started without complaint: no TLS in it
    if "Failed to configure TLS" not in output:
        message = f"{binary} has no TLS support (Debian's redis-server 7 has)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the TLS store tests must run)")
        pytest.skip(message)


_binary_or_skip = require_redis_server  # the name tests/cluster/conftest.py imports


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    server = RedisServer(require_redis_server())
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's redis-server, running (restarted if a test stopped it) and empty."""
    redis_server_session.start()
    redis_server_session.flushall()
    return redis_server_session
