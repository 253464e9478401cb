"""The load generators and what they report: wrk, h2load, and a Python client for idle connections.

All clients run pinned to the client CPU. wrk takes the host from the URL (for the TCP address,
the TLS server name and the Host header), so it runs in a private mount namespace where
/etc/hosts maps bench.test to 127.0.0.1; h2load uses `--connect-to` instead.

Scenarios and their tools:
  http-ka        wrk, HTTP/1.1 keep-alive, plain HTTP
  https-ka       wrk, HTTP/1.1 keep-alive over TLS
  h2             h2load, HTTP/2 over TLS, one stream at a time per connection
  https-resume   wrk with `Connection: close`: a new connection per request; wrk resumes the TLS
                 session on every reconnect
  https-full     h2load invoked again and again with `-c N -n N`: every request on a fresh
                 client, so every connection is a full handshake
  latency        h2load --rps on one keep-alive HTTPS connection (evenly paced: several paced
                 clients would fire in step, in bursts), through the proxy and direct
  idle           2,000 TLS keep-alive connections that made one request each, then sit idle
"""

# ruff: noqa: S603, S607  (a benchmark harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from attrs import frozen

from bench.servers import CLIENT_CPU, DOMAIN

PATH = "/q/bench-0123456789abcdef"


@frozen
class Load:
    """What one load run measured on the client side."""

    requests: int  # completed with a 2xx/3xx answer
    failures: int  # non-2xx/3xx answers, socket errors, timeouts
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    note: str = ""


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Load:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if done is None:
        raise ValueError(f"wrk output not understood:\n{out}")
    total = int(done.group(1))
    seconds = _wrk_ms(done.group(2) + done.group(3)) / 1000
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non_ok = int(bad.group(1)) if bad else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(g) for g in sock.groups()) if sock else 0
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return Load(
        requests=total - non_ok,
        failures=non_ok + errors,
        seconds=seconds,
        p50_ms=_wrk_ms(pct["50"]) if "50" in pct else None,
        p99_ms=_wrk_ms(pct["99"]) if "99" in pct else None,
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _h2load_log(path: Path) -> tuple[int, int, list[float]]:
    """(ok, not ok, latencies in ms) from an h2load --log-file (start us, status, duration us)."""
    ok = bad = 0
    lat: list[float] = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if 200 <= int(parts[1]) < 400:
            ok += 1
            lat.append(int(parts[2]) / 1000)
        else:
            bad += 1
    return ok, bad, lat


def _h2load_failures(out: str) -> int:
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed", out)
    if m is None:
        raise ValueError(f"h2load output not understood:\n{out}")
    return int(m.group(1))


class Clients:
    """Runs the load generators against ``port`` on 127.0.0.1, pinned to the client CPU."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._hosts = workdir / "hosts"
        self._hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {DOMAIN}\n")
        self._namespace = self._pick_namespace()

    def _pick_namespace(self) -> list[str]:
        """How to run wrk so that bench.test resolves to 127.0.0.1 (a private /etc/hosts)."""
        script = ["sh", "-c", f'mount --bind {self._hosts} /etc/hosts && exec "$@"', "sh"]
        tries = [["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]]
        if os.geteuid() != 0:
            tries.reverse()
        for prefix in tries:
            probe = [*prefix, *script, "getent", "hosts", DOMAIN]
            res = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
            if res.returncode == 0 and "127.0.0.1" in res.stdout:
                return [*prefix, *script]
        res = subprocess.run(
            ["getent", "hosts", DOMAIN], capture_output=True, text=True, check=False
        )
        if "127.0.0.1" in res.stdout:
            return []
        raise RuntimeError(
            f"wrk needs {DOMAIN} to resolve to 127.0.0.1: mount namespaces (unshare) are not "
            f"available here; add '127.0.0.1 {DOMAIN}' to /etc/hosts"
        )

    def _run(self, argv: Sequence[str], timeout: float) -> str:
        res = subprocess.run(
            ["taskset", "-c", CLIENT_CPU, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({res.returncode}): {res.stderr or res.stdout}")
        return res.stdout

    def wrk(
        self, port: int, tls: bool, conns: int, seconds: float, close: bool = False
    ) -> Load:
        scheme = "https" if tls else "http"
        seconds = max(1, round(seconds))  # wrk takes whole seconds only
        argv = [*self._namespace, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
        argv += ["--timeout", "5s"]
        if close:
            argv += ["-H", "Connection: close"]
        out = self._run([*argv, f"{scheme}://{DOMAIN}:{port}{PATH}"], seconds + 30)
        return parse_wrk(out)

    def _h2load(self, port: int, args: Sequence[str], timeout: float) -> tuple[str, Path]:
        fd, name = tempfile.mkstemp(prefix="h2load-", suffix=".log", dir=self._workdir)
        os.close(fd)
        url = f"https://{DOMAIN}:{port}{PATH}"
        argv = ["h2load", "-t1", *args, "--connect-to", f"127.0.0.1:{port}", "--log-file", name]
        return self._run([*argv, url], timeout), Path(name)

    def h2(self, port: int, conns: int, seconds: float) -> Load:
        args = [f"-c{conns}", "-m1", "-D", f"{seconds:g}"]
        out, log = self._h2load(port, args, seconds + 30)
        ok, bad, lat = _h2load_log(log)
        log.unlink()
        if "Application protocol: h2" not in out:
            raise RuntimeError(f"h2load did not negotiate HTTP/2:\n{out}")
        return Load(ok, bad + _h2load_failures(out), seconds, percentile(lat, 0.5),
                    percentile(lat, 0.99))

    def fresh(self, port: int, conns: int, seconds: float) -> Load:
        """Full handshakes: fresh h2load clients, one request per connection, until time is up."""
        ok = bad = 0
        lat: list[float] = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            out, log = self._h2load(port, ["--h1", f"-c{conns}", f"-n{conns}"], 60)
            o, b, la = _h2load_log(log)
            log.unlink()
            ok, bad, lat = ok + o, bad + b + _h2load_failures(out), lat + la
        elapsed = time.monotonic() - start
        return Load(ok, bad, elapsed, percentile(lat, 0.5), percentile(lat, 0.99))

    def paced(self, port: int, rate: int, conns: int, seconds: float) -> Load:
        """HTTPS keep-alive at a fixed offered load: ``rate`` req/s spread over ``conns``.

        A request due while the previous one on its connection is unanswered waits for it (and
        its latency counts from when it is sent), so keep the load well below saturation.
        """
        per_client = max(1, rate // conns)
        args = ["--h1", f"-c{conns}", f"--rps={per_client}", "-D", f"{seconds:g}"]
        out, log = self._h2load(port, args, seconds + 30)
        ok, bad, lat = _h2load_log(log)
        log.unlink()
        return Load(ok, bad + _h2load_failures(out), seconds, percentile(lat, 0.5),
                    percentile(lat, 0.99), note=f"{per_client * conns} req/s offered")


# -- idle connections -------------------------------------------------------------------------
async def _open_idle(port: int, count: int, parallel: int, deadline: float) -> tuple[list[
        asyncio.StreamWriter], int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = f"GET {PATH} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode()
    gate = asyncio.Semaphore(parallel)
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            if time.monotonic() > deadline:
                failed += 1
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1", port, ssl=ctx, server_hostname=DOMAIN
                    ),
                    10,
                )
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if not head.startswith(b"HTTP/1.1 200") or length is None:
                    raise ValueError(head[:60])
                await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10)
                writers.append(writer)
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return writers, failed


def idle_connections(
    port: int,
    count: int,
    measure: Callable[[], int],
    budget: float = 90.0,
    settle: float = 1.0,
) -> tuple[int, int, int]:
    """Open ``count`` TLS keep-alive connections that each made one request, wait ``settle``
    seconds, call ``measure()`` (the proxy's RSS in KiB) and close them.

    Returns (connections held, failures, measured value). Bounded by ``budget`` seconds.
    """

    async def main() -> tuple[int, int, int]:
        deadline = time.monotonic() + budget
        writers, failed = await _open_idle(port, count, 50, deadline)
        await asyncio.sleep(settle)
        value = measure()
        for w in writers:
            w.close()
        for w in writers:
            with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
                await asyncio.wait_for(w.wait_closed(), 2)
        return len(writers), failed, value

    return asyncio.run(main())
