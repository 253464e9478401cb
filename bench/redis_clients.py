"""Which Redis client for the shared store: redis-py on a small thread pool, or txredisapi on
the reactor? Measured on loopback against a real redis-server (``python -m bench.redis_clients``;
txredisapi is not a dependency: the run installs nothing and reports it missing).

What the store does on the request path is one lookup per HTTP-01 challenge request for a token
another replica published; everything else (loading certificates, locks, the resync) is off
the request path and pipelined. So the measure is: one GET's round trip on an idle reactor
(p50/p99 of 2,000 sequential lookups) and the throughput of 100 concurrent lookups (20,000 in
all), each as the proxy would issue it (a Deferred fired on the reactor thread).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

RESULTS = Path(__file__).resolve().parent / "results" / "redis-clients.md"
SEQUENTIAL = 2000
CONCURRENT = 100
TOTAL = 20_000


def _redis_server(port: int, workdir: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",  # noqa: S603
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc


@defer.inlineCallbacks
def _measure(
    reactor: Any, get: Callable[[str], defer.Deferred[Any]]
) -> Generator[defer.Deferred[Any], Any, dict[str, float]]:
    samples = []
    for i in range(SEQUENTIAL):
        start = time.perf_counter()
        yield get(f"k{i % 10}")
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    done = 0
    start = time.perf_counter()

    @defer.inlineCallbacks
    def worker() -> Generator[defer.Deferred[Any], Any, None]:
        nonlocal done
        while done < TOTAL:
            done += 1
            yield get("k1")

    yield defer.DeferredList([worker() for _ in range(CONCURRENT)])
    elapsed = time.perf_counter() - start
    return {
        "p50_us": statistics.median(samples),
        "p99_us": samples[int(len(samples) * 0.99)],
        "per_second": TOTAL / elapsed,
    }


@defer.inlineCallbacks
def _redis_py(reactor: Any, port: int) -> Generator[defer.Deferred[Any], Any, dict[str, float]]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    pool = ThreadPool(minthreads=1, maxthreads=4, name="store")
    pool.start()
    try:
        result: dict[str, float] = yield _measure(
            reactor, lambda key: deferToThreadPool(reactor, pool, client.get, key)
        )
    finally:
        pool.stop()
    return result


@defer.inlineCallbacks
def _txredisapi(reactor: Any, port: int) -> Generator[defer.Deferred[Any], Any, dict[str, float]]:
    import txredisapi  # type: ignore[import-not-found]  # optional: not a dependency

    conn = yield txredisapi.ConnectionPool("127.0.0.1", port, poolsize=4)
    try:
        result: dict[str, float] = yield _measure(reactor, conn.get)
    finally:
        yield conn.disconnect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=16399)
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp()
    server = _redis_server(args.port, workdir)
    results: dict[str, Any] = {}

    @defer.inlineCallbacks
    def run(reactor: Any) -> Generator[defer.Deferred[Any], Any, None]:
        results["redis-py (4-thread pool)"] = yield _redis_py(reactor, args.port)
        try:
            results["txredisapi (reactor)"] = yield _txredisapi(reactor, args.port)
        except ImportError:
            results["txredisapi (reactor)"] = "not installed"

    try:
        task.react(lambda reactor: run(reactor))
    except SystemExit:
        pass
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [f"# Redis clients for the shared store ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} CPUs, `python -m bench.redis_clients`)", ""]
    for name, r in results.items():
        if isinstance(r, dict):
            lines.append(f"- {name}: one lookup p50 {r['p50_us']:.0f} us, p99 "
                         f"{r['p99_us']:.0f} us; {CONCURRENT} concurrent: "
                         f"{r['per_second']:,.0f} lookups/s")
        else:
            lines.append(f"- {name}: {r}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
