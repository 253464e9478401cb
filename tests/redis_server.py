"""A real redis-server on a free loopback port, for the tests of the shared store.

``RedisServer`` runs Debian's ``redis-server`` (no persistence by default) in a temporary
directory; it can be stopped, killed and started again on the same port. The ``redis_server``
fixture (one server per session, flushed before every test) is imported by the conftests that
need it. Without redis-server the tests are skipped with a reason, except under CI=true where
they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.ports import free_port

__all__ = [
    "RedisServer",
    "find_redis_server",
    "redis_server",
    "redis_server_session",
    "require_redis_server",
]

INSTALL = "apt-get install -y redis-server"


def find_redis_server() -> str | None:
    """The redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


class RedisServer:
    """One redis-server on 127.0.0.1:``port`` (started by ``start()``)."""

    def __init__(
        self,
        binary: str,
        *,
        password: str | None = None,
        port: int | None = None,
        extra: tuple[str, ...] = ("--save", "", "--appendonly", "no"),
    ) -> None:
        self.binary = binary
        self.password = password
        self.port = port or free_port()
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"), *self.extra,
        ]
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
                        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
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
        """A client with the password, short timeouts and no retrying."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
        )

    def flushall(self) -> None:
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()


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
