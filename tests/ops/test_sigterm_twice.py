"""Two SIGTERMs in a row (an impatient supervisor, `docker stop` then `kill`): the process
drains once and exits 0, without a traceback."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.cluster.harness import Replica, tracebacks, wait_until


def test_second_sigterm_while_draining(tmp_path: Path) -> None:
    """The second signal is ignored with one line; exit status 0; no traceback."""
    silent = socket.socket()  # an upstream that accepts (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    upstream = f"http://127.0.0.1:{silent.getsockname()[1]}"
    replica = Replica("r1", tmp_path, ["--acme-directory", "local", "--domain", "a.example.com",
                                       "--upstream", upstream, "--shutdown-timeout", "2"])
    replica.args[1] = f"tcp:{replica.http_port}:interface=127.0.0.1"
    replica.start()
    try:
        replica.wait_listening()
        wait_until("ready", lambda: replica.status()["ready"], 20)
        # A request in flight (waiting for the silent upstream) keeps the drain going for
        # the shutdown timeout, so the second signal surely arrives while it runs.
        slow = socket.create_connection(("127.0.0.1", replica.http_port))
        slow.sendall(b"GET /f/x HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        wait_until("the request in flight",
                   lambda: replica.status()["requests"]["in_flight"] == 1, 10)
        replica.signal(signal.SIGTERM)
        wait_until("the drain", lambda: "waiting for 1 request(s)" in replica.log_text(), 10)
        replica.signal(signal.SIGTERM)
        assert replica.proc is not None
        assert replica.proc.wait(20) == 0
        slow.close()
        log = replica.log_text()
        assert tracebacks(log) == [], log
        assert log.count("Received SIGTERM") == 1
        assert "Already stopping (signal 15 ignored)" in log
    finally:
        replica.stop()
        silent.close()
