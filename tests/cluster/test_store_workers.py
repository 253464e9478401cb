"""--workers with --store: every process is a replica of its own, so a domain added to the
store is served by all of them within 2 s, and HTTP-01 answers published by any process are
answered by every other."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster.harness import Replica, tracebacks, wait_until
from tests.redis_server import RedisServer, require_redis_server

LOCAL = ["--acme-directory", "local", "--upstream", "http://127.0.0.1:9", "--workers", "3",
         "--domain", "first.workers.test"]


def _status(port: int, host: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET /q/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(100).split()[1])


def test_domain_added_reaches_every_worker(tmp_path: Path) -> None:
    """Fresh connections (spread over the 3 processes) all serve an added domain within 2 s,
    and answer 421 within 2 s of its removal; the store's answer to a challenge too."""
    server = RedisServer(require_redis_server())
    server.start()
    replica = Replica("r1", tmp_path, [*LOCAL, "--store", server.url])
    replica.args[1] = f"tcp:{replica.http_port}:interface=127.0.0.1"  # no PROXY header here
    replica.start()
    tool = str(Path(sys.executable).with_name("trackingproxy"))
    try:
        replica.wait_listening()
        wait_until("ready", lambda: replica.status()["ready"], 20)
        time.sleep(1)  # the workers start after the parent
        assert {_status(replica.http_port, "new.workers.test") for _ in range(30)} == {421}
        subprocess.run([tool, "domains", "add", "new.workers.test", "--store", server.url],
                       check=True, capture_output=True, timeout=30)
        start = time.monotonic()
        wait_until("every process serving it",
                   lambda: all(_status(replica.http_port, "new.workers.test") != 421
                               for _ in range(30)), 2, interval=0.05)
        assert time.monotonic() - start <= 2
        token = "T" * 43
        server.client().set(f"trackingproxy:{{new.workers.test}}:challenge:{token}", b"answer",
                            px=60_000)
        answers = set()
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", replica.http_port), timeout=5) as s:
                s.sendall(f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\n"
                          "Host: new.workers.test\r\nConnection: close\r\n\r\n".encode())
                answers.add(s.recv(300).split(b"\r\n\r\n", 1)[-1])
        assert answers == {b"answer"}
        subprocess.run([tool, "domains", "remove", "new.workers.test", "--store", server.url],
                       check=True, capture_output=True, timeout=30)
        wait_until("every process refusing it",
                   lambda: all(_status(replica.http_port, "new.workers.test") == 421
                               for _ in range(30)), 2, interval=0.05)
        assert tracebacks(replica.log_text()) == []
    finally:
        replica.stop()
        server.close()
