"""Two SIGTERMs in a row (an impatient supervisor, `docker stop` then `kill`): the process
drains once and exits 0, without a traceback."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.cluster.harness import Replica, tracebacks, wait_until


def test_second_sigterm_while_draining(tmp_path: Path) -> None:
    """The second signal is ignored with one line; exit status 0; no traceback."""
    replica = Replica("r1", tmp_path, ["--acme-directory", "local", "--domain", "a.example.com",
                                       "--upstream", "http://127.0.0.1:9"])
    replica.args[1] = f"tcp:{replica.http_port}:interface=127.0.0.1"
    replica.start()
    try:
        replica.wait_listening()
        wait_until("ready", lambda: replica.status()["ready"], 20)
        replica.signal(signal.SIGTERM)
        time.sleep(0.01)
        replica.signal(signal.SIGTERM)
        assert replica.proc is not None
        assert replica.proc.wait(20) == 0
        log = replica.log_text()
        assert tracebacks(log) == [], log
        assert log.count("Received SIGTERM") == 1
    finally:
        replica.stop()
