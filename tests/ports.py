"""Free loopback TCP ports for the servers the tests start (one helper for the whole suite).

A port is chosen some time before the server that is given it binds it (pebble's HTTP-01
port is written into its configuration; HAProxy's front ports are bound only after the
replicas started). A port taken from the kernel's ephemeral range (``bind(0)``) can be
handed, in between, to an outgoing connection (a replica connecting to redis, say), and the
server then fails to bind. So the ports come from below the ephemeral range, where the
kernel never picks a source port, chosen at random and checked free, and never twice in one
test run.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_ports"]

_LOWEST = 10000
_given: set[int] = set()
_random = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _from_kernel(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago, outside the
    ephemeral range when the system leaves room below it."""
    low = _ephemeral_low()
    if low - _LOWEST < 1000:  # no room below the ephemeral range: ask the kernel
        return _from_kernel(count)
    ports: list[int] = []
    while len(ports) < count:
        port = _random.randrange(_LOWEST, low)
        if port in _given or port in ports or not _bindable(port):
            continue
        ports.append(port)
    _given.update(ports)
    return ports


def free_port() -> int:
    """One loopback TCP port that was free a moment ago."""
    return free_ports(1)[0]
