"""The real ``twistd trackingproxy`` in a subprocess, on free loopback ports, in front of a
stand-in upstream: for tests that drive it with signals and read what it printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.harness import TWISTD, proxy_args
from tests.ports import free_ports
from tests.standin import StandIn

ROOT = Path(__file__).resolve().parent.parent


class Collect(ProcessProtocol):
    """Collects the process's stdout and stderr; ``ended`` fires with its exit status."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else -1
        self.ended.callback(code)

    @property
    def pid(self) -> int:
        assert self.transport is not None
        pid: int = self.transport.pid  # type: ignore[attr-defined]
        return pid




def spawn(
    test: TestCase, tmp: Path, ca: trustme.CA, standin: StandIn, *extra: str
) -> tuple[Collect, int, int]:
    """Start twistd with the harness's arguments plus ``extra``; returns the process and its
    HTTP and HTTPS ports. The process is killed at the test's cleanup if still running."""
    http_port, https_port = free_ports(2)
    args = proxy_args(tmp, ca, standin, *extra)
    args[args.index("--http-port") + 1] = f"tcp:{http_port}:interface=127.0.0.1"
    args[args.index("--https-port") + 1] = f"tcp:{https_port}:interface=127.0.0.1"
    proto = Collect()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, sys.executable, [*TWISTD, *args], env=env, path=str(tmp)
    )
    test.addCleanup(_kill, proto)
    return proto, http_port, https_port


def _kill(proto: Collect) -> Deferred[int] | None:
    if not proto.ended.called and proto.transport is not None:
        proto.transport.signalProcess("KILL")
        return proto.ended
    return None


async def wait_for_output(
    proto: Collect, marker: bytes, timeout: float = 30.0, count: int = 1
) -> None:
    """Wait until stdout holds ``marker`` ``count`` times (AssertionError after ``timeout`` s
    or when the process ended first)."""
    waited = 0.0
    while proto.out.count(marker) < count:
        if proto.ended.called or waited >= timeout:
            raise AssertionError(
                f"{marker!r} not printed (x{count})\n" + (proto.out + proto.err).decode()
            )
        await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
        waited += 0.05
