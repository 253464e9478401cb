"""`python -m bench.run --profile SECONDS [--profile-scenario h2|https-full]`: where
trackingproxy spends its CPU under HTTPS keep-alive load (wrk, 50 connections), HTTP/2 load
(h2load, 50 clients) or full TLS handshakes (fresh h2load clients), sampled with py-spy
(`pip install py-spy`).

Writes the collapsed stacks to bench/results/profile-<time>.txt (load it into speedscope or
flamegraph.pl) and prints the top functions by self time and by inclusive time.
"""

# ruff: noqa: S603  (a benchmark harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

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
) -> int:
    server = servers.start_proxy("trackingproxy", workdir, certs, up.https, repo, extra)
    try:
        servers.wait_ready(server)
        clients.wrk(server.https, True, 50, 1.0)  # warm-up
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = repo / "bench" / "results" / f"profile-{stamp}.txt"
        argv = [_py_spy(), "record", "-p", str(server.pid), "-d", f"{seconds:g}", "-r", "200",
                "--format", "raw", "-o", str(out)]
        if native:
            argv.append("--native")
        if scenario == "h2":
            load = threading.Thread(
                target=clients.h2, args=(server.https, 50, seconds + 2), daemon=True
            )
        elif scenario == "https-full":
            load = threading.Thread(
                target=clients.fresh, args=(server.https, 50, seconds + 2), daemon=True
            )
        else:
            load = threading.Thread(
                target=clients.wrk, args=(server.https, True, 50, seconds + 2), daemon=True
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
