"""Slow and half-open clients against the real process (``twistd trackingproxy`` as a
subprocess, so the RSS measured is the proxy's own): slowloris is cut by ``--header-timeout``,
idle keep-alive connections by ``--idle-timeout``, and 5,000 slow clients at once (half-open:
connect and send nothing; or one byte of a request line; plain and TLS) cost a bounded amount
of memory that is given back once they are cut, while normal requests keep being answered.
Repeated waves show the difference between a leak (every wave adds) and memory the process
keeps for reuse (later waves cost nothing more); here neither: RSS returns near the baseline
after each wave (``trackingproxy.ops.malloctrim``: ``malloc_trim`` after many closes; closed
connections are freed without the garbage collector).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import issue, make_ca, write_pair
from tests.ports import free_port
from trackingproxy.ops.malloctrim import TRIM_DELAY

DOMAIN = "click.example.com"
HEADER_TIMEOUT = 3.0
IDLE_TIMEOUT = 4.0
SLOW_CLIENTS = 5000
TLS_SHARE = 1000  # of the slow clients, how many connect to the HTTPS port
RSS_CEILING_MIB = 200  # growth over the baseline while 5,000 slow clients are connected
ROUNDS = 3
# Measured on Debian 12 / glibc 2.36: about 56 MiB with the clients connected, every wave alike,
# and 6 to 10 MiB over the baseline a few seconds after they are cut (before the allocator trim:
# +66, +82, +90 MiB after waves 1 to 3, and each wave's peak 10 to 20 MiB above the last).
WAVE_GROWTH_MIB = 10  # a later wave's peak over the first wave's peak
AFTER_MARGIN_MIB = 20  # RSS over the baseline once a wave is cut and the trim has run




def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, int]]:
    """(pid, http port, https port) of a twistd trackingproxy with short timeouts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 20000) if hard != resource.RLIM_INFINITY else 20000
    if want < 2 * SLOW_CLIENTS + 500:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is too low for {SLOW_CLIENTS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    tmp = tmp_path_factory.mktemp("slow")
    cert, key = write_pair(issue(make_ca(), DOMAIN), tmp, "proxy")
    http, https = free_port(), free_port()
    log = (tmp / "proxy.log").open("wb")
    args = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "trackingproxy",
        "--domain",
        DOMAIN,
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--no-acme",
        "--upstream",
        "https://127.0.0.1:9",
        "--http-port",
        f"tcp:{http}:interface=127.0.0.1:backlog=4096",
        "--https-port",
        f"tcp:{https}:interface=127.0.0.1:backlog=4096",
        "--admin-port",
        "none",
        "--access-log",
        "off",
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--idle-timeout",
        str(IDLE_TIMEOUT),
    ]
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _status(http, "/q/ready", host="unknown.example") == 421:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp / "proxy.log").read_text()[-3000:])
            time.sleep(0.2)
        yield proc.pid, http, https
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _status(port: int, path: str, host: str = DOMAIN) -> int:
    """One request answered by the proxy itself (an unknown host gets 421: no upstream needed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return int(data[9:12])


def _closed_after(sock: socket.socket, limit: float, trickle: bytes = b"") -> float | None:
    """Seconds until the proxy closes ``sock`` (sending ``trickle`` a byte every 0.2 s), or None
    when it is still open after ``limit`` seconds."""
    start = time.monotonic()
    sock.setblocking(False)
    i = 0
    while time.monotonic() - start < limit:
        if i < len(trickle):
            try:
                sock.send(trickle[i : i + 1])
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - start
            i += 1
        try:
            data = sock.recv(4096)
            if data == b"":
                return time.monotonic() - start
        except BlockingIOError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def test_slowloris_is_cut_by_the_header_timeout(proxy: tuple[int, int, int]) -> None:
    """Headers trickled a byte every 0.2 s (never finished in time) are cut after
    --header-timeout, although the client keeps sending."""
    _, http, _ = proxy
    trickle = f"GET /q/slow HTTP/1.1\r\nHost: {DOMAIN}\r\n".encode() + b"X-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", http)) as s:
        took = _closed_after(s, HEADER_TIMEOUT + 5, trickle)
    assert took is not None and took < HEADER_TIMEOUT + 1.5, took


def test_idle_keepalive_is_cut_by_the_idle_timeout(proxy: tuple[int, int, int]) -> None:
    """A keep-alive connection that got its answer and then says nothing is closed after
    --idle-timeout; a connection that never sends anything is closed too."""
    _, http, _ = proxy
    with (
        socket.create_connection(("127.0.0.1", http)) as s,
        socket.create_connection(("127.0.0.1", http)) as silent,
    ):
        s.sendall(b"GET /q/a HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 421")
        took = _closed_after(s, IDLE_TIMEOUT + 5)
        silent_took = _closed_after(silent, 1)  # measured from now, it already waited
    assert took is not None and IDLE_TIMEOUT - 1 < took < IDLE_TIMEOUT + 1.5, took
    assert silent_took is not None, "a connection that never sent anything was not cut"


async def _open_slow(port: int, count: int, first_byte: bool) -> list[asyncio.StreamWriter]:
    writers = []
    for start in range(0, count, 250):
        batch = [asyncio.open_connection("127.0.0.1", port) for _ in range(min(250, count - start))]
        for reader_writer in await asyncio.gather(*batch):
            _, writer = reader_writer
            if first_byte:
                writer.write(b"G")
            writers.append(writer)
        await asyncio.sleep(0)
    return writers


async def _wait_closed(writers: list[asyncio.StreamWriter], limit: float) -> int:
    """How many of ``writers`` the proxy had not closed within ``limit`` seconds."""

    async def closed(writer: asyncio.StreamWriter) -> bool:
        reader: asyncio.StreamReader = writer._protocol._stream_reader  # type: ignore[attr-defined]
        try:
            await asyncio.wait_for(reader.read(), limit)
        except TimeoutError:
            return False
        except (ConnectionResetError, OSError):
            pass
        return True

    results = await asyncio.gather(*(closed(w) for w in writers))
    for w in writers:
        w.transport.abort()
    return results.count(False)


def test_5000_slow_clients_memory_stays_bounded(proxy: tuple[int, int, int]) -> None:
    """5,000 slow clients at once (half of the plain ones send one byte of a request line, the
    others nothing; 1,000 on the TLS port send no handshake), in three waves: the proxy keeps
    answering, its RSS grows by less than RSS_CEILING_MIB, every one of them is cut by the
    timeouts and the descriptors come back to the baseline; a later wave's peak RSS is within
    WAVE_GROWTH_MIB of the first's (no leak), and a few seconds after each wave is cut RSS is
    back within AFTER_MARGIN_MIB of the baseline (the memory is given back, not kept)."""
    pid, http, https = proxy
    for _ in range(20):  # warm up the allocator and the code paths before the baseline
        _status(http, "/q/warm", host="unknown.example")
    base_rss, base_fds = rss_mib(pid), open_fds(pid)

    async def scenario() -> tuple[float, int, int]:
        plain = SLOW_CLIENTS - TLS_SHARE
        writers = await _open_slow(http, plain // 2, first_byte=True)
        writers += await _open_slow(http, plain - plain // 2, first_byte=False)
        writers += await _open_slow(https, TLS_SHARE, first_byte=False)
        await asyncio.sleep(0.5)
        peak, fds = rss_mib(pid), open_fds(pid)
        served = await asyncio.to_thread(_status, http, "/q/during", "unknown.example")
        assert served == 421
        still_open = await _wait_closed(writers, max(HEADER_TIMEOUT, IDLE_TIMEOUT) + 4)
        return peak, fds, still_open

    def settled() -> float:
        """RSS once the proxy's trim ran (TRIM_DELAY after the 1,000th close), polled."""
        deadline = time.monotonic() + TRIM_DELAY + 6
        while True:
            rss = rss_mib(pid)
            if rss - base_rss < AFTER_MARGIN_MIB / 2 or time.monotonic() > deadline:
                return rss
            time.sleep(0.5)

    rounds = []
    for _ in range(ROUNDS):
        peak, peak_fds, still_open = asyncio.run(scenario())
        rounds.append((peak, peak_fds, still_open, settled(), open_fds(pid)))
    summary = "; ".join(
        f"round {i + 1}: RSS {p:.1f} MiB with them, {a:.1f} after, fds {pf} -> {af}"
        for i, (p, pf, _, a, af) in enumerate(rounds)
    )
    print(
        f"\n{SLOW_CLIENTS} slow clients; baseline RSS {base_rss:.1f} MiB, fds {base_fds}; {summary}"
    )
    first_peak = rounds[0][0]
    for peak, peak_fds, still_open, after_rss, after_fds in rounds:
        assert peak_fds >= base_fds + SLOW_CLIENTS * 0.95, "the slow clients were not all connected"
        assert still_open == 0, f"{still_open} slow clients were not cut by the timeouts"
        assert peak - base_rss < RSS_CEILING_MIB, (base_rss, peak)
        assert after_fds <= base_fds + 5, (base_fds, after_fds)
        # No leak: a wave costs what the first one did, not more on top of it.
        assert peak - first_peak < WAVE_GROWTH_MIB, summary
        # Given back: once they are cut RSS returns near the baseline.
        assert after_rss - base_rss < AFTER_MARGIN_MIB, summary
