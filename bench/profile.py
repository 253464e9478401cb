"""`python -m bench.run --profile SECONDS [--profile-scenario h2|https-full] [--syscalls]`:
where trackingproxy spends its CPU under HTTPS keep-alive load (wrk, 50 connections), HTTP/2
load (h2load, 50 clients) or full TLS handshakes (fresh h2load clients), sampled with py-spy
(`pip install py-spy`).

Writes the collapsed stacks to bench/results/profile-<time>.txt (load it into speedscope or
flamegraph.pl) and prints the top functions by self time and by inclusive time.

With ``--syscalls``, counts the proxy's system calls with ``strace -c`` instead and prints them
per request: on a machine where system calls are expensive (virtual machines) they are a large
part of what a new connection costs, and the count, unlike the time, does not depend on noise.
"""

# ruff: noqa: S603, S607  (a benchmark harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import Clients


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        sys.exit("bench: py-spy not found; pip install py-spy")
    return found


def summarise(collapsed: Path, top: int = 25) -> str:
    """Top functions by self and inclusive samples from py-spy's raw (collapsed) output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        self_c[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    out = [f"{total} samples", "", "self %  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_c.most_common(top)]
    out += ["", "incl %  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def per_request(strace_summary: str, requests: float) -> str:
    """``strace -c``'s table with the calls divided by the requests served meanwhile."""
    out = [f"{'calls/request':>13}  {'calls':>8}  syscall"]
    for line in strace_summary.splitlines():
        fields = line.split()
        if len(fields) in (5, 6) and fields[3].isdigit() and fields[-1] != "total":
            calls = int(fields[3])
            out.append(f"{calls / requests:13.2f}  {calls:8d}  {fields[-1]}")
    return "\n".join(out)


def _load(clients: Clients, port: int, scenario: str, seconds: float) -> Any:
    if scenario == "h2":
        return clients.h2(port, 50, seconds)
    if scenario == "https-full":
        return clients.fresh(port, 50, seconds)
    return clients.wrk(port, True, 50, seconds)


def _count_syscalls(server: servers.Server, clients: Clients, scenario: str,
                    seconds: float) -> int:
    """strace attached for the whole of one load run, so every request it serves is counted."""
    strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(server.pid)],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached (strace prints nothing until it detaches)
    load = _load(clients, server.https, scenario, seconds)
    strace.send_signal(signal.SIGINT)
    _, summary = strace.communicate(timeout=60)
    if "total" not in summary:
        sys.exit(f"bench: strace failed ({strace.returncode}): {summary.strip()}")
    print(per_request(summary, load.requests))
    return 0


def profile(
    seconds: float,
    workdir: Path,
    certs: servers.Certs,
    up: servers.Server,
    clients: Clients,
    repo: Path,
    extra: list[str],
    native: bool = True,
    scenario: str = "https-ka",
    syscalls: bool = False,
) -> int:
    server = servers.start_proxy("trackingproxy", workdir, certs, up.https, repo, extra)
    try:
        servers.wait_ready(server)
        clients.wrk(server.https, True, 50, 1.0)  # warm-up
        if syscalls:
            return _count_syscalls(server, clients, scenario, seconds)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = repo / "bench" / "results" / f"profile-{stamp}.txt"
        argv = [_py_spy(), "record", "-p", str(server.pid), "-d", f"{seconds:g}", "-r", "200",
                "--format", "raw", "-o", str(out)]
        if native:
            argv.append("--native")
        load = threading.Thread(
            target=_load, args=(clients, server.https, scenario, seconds + 2), daemon=True
        )
        load.start()
        time.sleep(0.5)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                             check=False)
        load.join(timeout=seconds + 40)
        if res.returncode != 0 or not out.exists():
            sys.exit(f"bench: py-spy failed ({res.returncode}): {res.stderr.strip()}")
        print(summarise(out))
        print(f"\ncollapsed stacks: {out}")
        return 0
    finally:
        server.stop()
