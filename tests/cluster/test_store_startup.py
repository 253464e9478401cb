"""--store at start-up: an unusable store is one line and exit 1 when there is nothing to
serve meanwhile; with a valid local copy the replica serves it and keeps retrying; the
store's password never appears in the log, /status, /metrics or the status page."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import REPO, Replica, tracebacks, wait_until
from tests.ports import free_port
from tests.redis_server import RedisServer, require_redis_server

TWISTD = str(Path(sys.executable).with_name("twistd"))
DOMAIN = "start.cluster.test"
LOCAL = ["--acme-directory", "local", "--domain", DOMAIN, "--upstream", "http://127.0.0.1:9"]


def _run(tmp_path: Path, store: str) -> subprocess.CompletedProcess[str]:
    port = free_port()
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "trackingproxy", *LOCAL, "--store", store,
         "--state-dir", str(tmp_path / "state"), "--admin-port", "none",
         "--http-port", f"tcp:{port}:interface=127.0.0.1",
         "--https-port", f"tcp:{free_port()}:interface=127.0.0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )


def _one_line_exit(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "--store" in line]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def http_server() -> Iterator[int]:
    """A TCP server on loopback that answers every connection like an HTTP server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(2)
    listener.close()


def test_unreachable_store_without_local_copy(tmp_path: Path) -> None:
    """Nothing listens at the store's address: one line naming it, exit 1."""
    _one_line_exit(_run(tmp_path, f"redis://127.0.0.1:{free_port()}/0"), "unreachable")


def test_wrong_password(tmp_path: Path) -> None:
    """A wrong password: one line saying so, without the password, exit 1."""
    server = RedisServer(require_redis_server(), password="right-secret")
    server.start()
    try:
        line = _one_line_exit(
            _run(tmp_path, f"redis://:wrong-secret@127.0.0.1:{server.port}/0"), "password"
        )
        assert "wrong-secret" not in line and "right-secret" not in line
    finally:
        server.close()


def test_not_a_redis_server(tmp_path: Path, http_server: int) -> None:
    """An HTTP server where the store should be: one line saying it is no Redis, exit 1."""
    _one_line_exit(_run(tmp_path, f"redis://127.0.0.1:{http_server}/0"), "not a Redis")


def test_bad_url(tmp_path: Path) -> None:
    """A URL of another scheme: one line naming the accepted forms, exit 1."""
    _one_line_exit(_run(tmp_path, "http://127.0.0.1:6379/0"), "redis://")


def test_local_copy_served_while_the_store_is_down_then_seeded(tmp_path: Path) -> None:
    """With a valid certificate in the state directory the replica starts although the
    store is unreachable, serves it, and seeds the store once it appears."""
    port = free_port()
    first = Replica("local", tmp_path, LOCAL)  # no --store: the certificate lands in state/
    first.start()
    try:
        first.wait_listening()
        wait_until("a local certificate", lambda: first.status()["ready"], 20)
    finally:
        first.stop()
    replica = Replica("r1", tmp_path, [*LOCAL, "--store", f"redis://:pw@127.0.0.1:{port}/0"])
    replica.start()
    server = RedisServer(require_redis_server(), password="pw", port=port)
    try:
        replica.wait_listening()
        wait_until("the local copy served", lambda: replica.status()["ready"], 10)
        assert replica.status()["cluster"]["store_up"] is False
        server.start()
        wait_until("the store seen again", lambda: replica.status()["cluster"]["store_up"], 15)
        client = server.client()
        wait_until("the local copy seeded into the store",
                   lambda: client.hget(f"trackingproxy:{{{DOMAIN}}}:cert", "serial"), 15)
        log = replica.log_text()
        assert "Starting without the store" in log and "reachable again" in log
        assert tracebacks(log) == []
    finally:
        replica.stop()
        server.close()


def test_password_is_never_shown(tmp_path: Path) -> None:
    """The store's password is in none of: the log, /status, /metrics, the status page."""
    server = RedisServer(require_redis_server(), password="s3cret-pass-word")
    server.start()
    replica = Replica("r1", tmp_path, [*LOCAL, "--store", server.url])
    replica.start()
    try:
        replica.wait_listening()
        wait_until("ready", lambda: replica.status()["ready"], 20)
        status = replica.status()
        assert status["cluster"]["store"] == f"redis://:***@127.0.0.1:{server.port}/0"
        base = f"http://127.0.0.1:{replica.admin_port}"
        for page in ("/status", "/metrics", "/"):
            with urllib.request.urlopen(base + page, timeout=5) as r:
                assert b"s3cret-pass-word" not in r.read(), page
        assert "s3cret-pass-word" not in replica.log_text()
        assert "***" in replica.log_text()
    finally:
        replica.stop()
        server.close()
