"""`make bench` / `make bench-quick`: trackingproxy against nginx (two ways) and Caddy.

    python -m bench.run                  # 3 rounds, 10 s per scenario, 50 connections
    python -m bench.run --quick          # ~3 minutes: 1 round, short runs
    python -m bench.run --profile 20     # py-spy profile of trackingproxy under HTTPS keep-alive
    python -m bench.run --idle-only      # only the idle-connection memory (no files written)
    python -m bench.run --store-compare  # only file store vs Redis store (HTTPS keep-alive)

Each round starts every proxy afresh (pinned to CPU 0; upstream and clients on CPU 1), checks
that each one proxies correctly, measures idle-connection memory, then runs every scenario
against every proxy, the proxy order rotating per round, and the paced latency scenario. Then
trackingproxy's HTTPS keep-alive with the file store and with a Redis store, interleaved
(bench/storecompare.py). The table goes to bench/RESULTS.md, the raw figures to
bench/results/latest.json, and the last line printed is the HTTPS keep-alive per-CPU ratio.
"""

# ruff: noqa: S603  (a benchmark harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import loadgen, procstat, report, servers, storecompare
from bench.loadgen import Clients, Load
from bench.servers import CLIENT_CPU, PROXIES, Server

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SCENARIOS = ("http-ka", "https-ka", "h2", "https-resume", "https-full")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measured(server: Server, run: Callable[[], Load]) -> dict[str, float | int | str | None]:
    """Run a load and attribute the proxy CPU used meanwhile."""
    cpu0, t0 = procstat.cpu_seconds(server.pid), time.monotonic()
    load = run()
    cpu1, t1 = procstat.cpu_seconds(server.pid), time.monotonic()
    cpu = cpu1 - cpu0
    return {
        "requests": load.requests,
        "failures": load.failures,
        "seconds": round(load.seconds, 3),
        "rps": load.requests / load.seconds if load.seconds else None,
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "cpu_s": round(cpu, 3),
        "cpu_share": cpu / (t1 - t0),
        "per_cpu": load.requests / cpu if cpu > 0 else None,
        "note": load.note,
    }


def scenario(clients: Clients, name: str, server: Server, conns: int, secs: float) -> Load:
    if name == "http-ka":
        assert server.http is not None
        return clients.wrk(server.http, False, conns, secs)
    if name == "https-ka":
        return clients.wrk(server.https, True, conns, secs)
    if name == "h2":
        return clients.h2(server.https, conns, secs)
    if name == "https-resume":
        return clients.wrk(server.https, True, conns, secs, close=True)
    if name == "https-full":
        return clients.fresh(server.https, conns, secs)
    raise ValueError(name)


def one_round(
    index: int, args: argparse.Namespace, workdir: Path, certs: servers.Certs, up: Server,
    clients: Clients, extra: list[str],
) -> dict[str, object]:
    order = list(PROXIES[index % len(PROXIES) :] + PROXIES[: index % len(PROXIES)])
    log(f"round {index + 1}/{args.rounds}: order {', '.join(order)}")
    running: dict[str, Server] = {}
    try:
        for name in order:
            running[name] = servers.start_proxy(name, workdir, certs, up.https, REPO, extra)
            if name == "trackingproxy" and args.workers > 1:
                _spread(running[name].pid)  # before it spawns its workers: they inherit it
        problems = []
        for server in running.values():
            servers.wait_ready(server)
            problems += servers.check_proxy(server)
        if "trackingproxy" in running and args.workers > 1:
            _spread(running["trackingproxy"].pid)
        if problems:
            raise RuntimeError("functional check failed: " + "; ".join(problems))
        memory = {name: idle_memory(name, running[name], clients, args.idle)
                  for name in order}
        load: dict[str, dict[str, object]] = {}
        for sc in SCENARIOS:
            load[sc] = {}
            for name in order:
                server = running[name]
                if args.warmup > 0:
                    scenario(clients, sc, server, args.connections, args.warmup)
                load[sc][name] = result = measured(
                    server, lambda s=server, sc=sc: scenario(  # type: ignore[misc]
                        clients, sc, s, args.connections, args.duration)
                )
                log(f"  {sc:12} {name:13} {result['rps'] or 0:9.0f} req/s  "
                    f"cpu {result['cpu_share'] or 0:.2f}  {result['per_cpu'] or 0:8.0f} req/cpu-s"
                    f"  p99 {result['p99_ms'] or 0:.2f} ms  failures {result['failures']}")
        latency: dict[str, object] = {}
        targets = [("direct", up), *((n, running[n]) for n in order)]
        for name, server in targets:
            lat = clients.paced(server.https, args.paced_rate, 1, args.latency_duration)
            latency[name] = {"p50_ms": lat.p50_ms, "p99_ms": lat.p99_ms,
                             "requests": lat.requests, "failures": lat.failures}
            log(f"  latency {name:13} p50 {lat.p50_ms or 0:.2f} ms  p99 {lat.p99_ms or 0:.2f} ms")
        for name in order:
            memory[name]["peak_rss_kib"] = procstat.memory_kib(running[name].pid, "VmHWM")
        return {"round": index + 1, "order": order, "load": load, "memory": memory,
                "latency": latency}
    finally:
        for server in running.values():
            server.stop()


def idle_memory(
    name: str, server: Server, clients: Clients, count: int
) -> dict[str, float | int | None]:
    """RSS per idle TLS connection: ``count`` connections that made one request each, held."""
    clients.wrk(server.https, True, 10, 1.0)  # warm-up: upstream pool, allocator
    base = procstat.memory_kib(server.pid)
    held, failed, rss = loadgen.idle_connections(
        server.https, count, lambda: procstat.memory_kib(server.pid)
    )
    result: dict[str, float | int | None] = {
        "rss_base_kib": base,
        "idle_rss_kib": rss,
        "idle_held": held,
        "idle_failures": failed,
        "kib_per_idle": (rss - base) / held if held else None,
    }
    log(f"  idle {name}: {held} held, {failed} failed, "
        f"{result['kib_per_idle'] or 0:.1f} KiB each (RSS {base} -> {rss} KiB)")
    return result


def idle_only(
    args: argparse.Namespace, workdir: Path, certs: servers.Certs, up: Server, clients: Clients,
    extra: list[str],
) -> int:
    """--idle-only: each of --proxies started afresh, checked, and its idle memory measured."""
    for _ in range(args.rounds):
        for name in args.proxies:
            server = servers.start_proxy(name, workdir, certs, up.https, REPO, extra)
            try:
                servers.wait_ready(server)
                problems = servers.check_proxy(server)
                if problems:
                    raise RuntimeError("functional check failed: " + "; ".join(problems))
                idle_memory(name, server, clients, args.idle)
            finally:
                server.stop()
    return 0


def compare_stores(
    args: argparse.Namespace, command: str, workdir: Path, certs: servers.Certs, up: Server,
    clients: Clients, extra: list[str],
) -> storecompare.Json:
    """trackingproxy with the file store and with a Redis store, HTTPS keep-alive, interleaved."""
    settings = {"rounds": args.rounds, "pairs": args.store_pairs, "duration": args.duration,
                "warmup": args.warmup, "connections": args.connections}
    commit = _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return storecompare.measure_stores(settings, command, commit, workdir, certs, up, clients,
                                       extra, REPO, measured)


def write_store_compare(stores: storecompare.Json) -> None:
    """--store-compare alone: replace that part of latest.json and RESULTS.md, keep the rest."""
    latest = BENCH / "results" / "latest.json"
    data = json.loads(latest.read_text()) if latest.exists() else {}
    data["store_compare"] = stores
    latest.write_text(json.dumps(data, indent=1) + "\n")
    md = BENCH / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    md.write_text(storecompare.insert_section(text, storecompare.markdown(stores)))
    log("updated the store comparison in bench/RESULTS.md and bench/results/latest.json")


def _spread(root: int) -> None:
    """--workers above 1: trackingproxy's processes (and threads) may use every CPU, so its
    worker shares CPU 1 with the load generator and the upstream; the other proxies stay on 0."""
    for pid in procstat.process_tree(root):
        with contextlib.suppress(OSError):  # a process or thread that is gone
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), range(os.cpu_count() or 1))


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    return ((res.stdout + res.stderr).strip().splitlines() or ["n/a"])[0]


def metadata(args: argparse.Namespace, command: str) -> dict[str, object]:
    import OpenSSL

    import twisted

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    commit = _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": {
            "CPU": f"{model}, {os.cpu_count()} CPUs (proxy on CPU 0, clients+upstream on CPU 1)",
            "kernel": f"{platform.system()} {platform.release()}",
            "OS": _version(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        },
        "versions": {
            "trackingproxy": f"commit {commit}",
            "Python": platform.python_version(),
            "Twisted": twisted.__version__,
            "pyOpenSSL": OpenSSL.__version__,
            "OpenSSL (Python)": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
            "nginx": _version(["nginx", "-v"]),
            "Caddy": _version(["caddy", "version"]),
            "wrk": _version(["wrk", "--version"]),
            "h2load": _version(["h2load", "--version"]),
        },
        "settings": {
            "rounds": args.rounds, "duration": args.duration, "connections": args.connections,
            "warmup": args.warmup, "idle": args.idle, "paced_rate": args.paced_rate,
            "latency_duration": args.latency_duration, "quick": args.quick,
            "trackingproxy_workers": args.workers,
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, 3 s runs (~3 minutes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of unmeasured load first (wrk: whole seconds)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--idle", type=int, default=2000, help="idle TLS connections to hold")
    p.add_argument("--paced-rate", type=int, default=300, help="req/s of the latency scenario")
    p.add_argument("--latency-duration", type=float, default=10.0)
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="instead: profile trackingproxy under HTTPS keep-alive with py-spy")
    p.add_argument("--profile-scenario", choices=("https-ka", "h2", "https-full"),
                   default="https-ka",
                   help="the load profiled: wrk over TLS, h2load, or full handshakes")
    p.add_argument("--syscalls", action="store_true",
                   help="with --profile: count system calls per request (strace -c), no py-spy")
    p.add_argument("--no-write", action="store_true", help="do not write RESULTS.md/latest.json")
    p.add_argument("--workers", type=int, default=1,
                   help="trackingproxy --workers N (above 1 it may use every CPU, not only CPU 0)")
    p.add_argument("--idle-only", action="store_true",
                   help="instead: only measure idle-connection memory (--rounds times; no files)")
    p.add_argument("--proxies", nargs="+", choices=PROXIES, default=list(PROXIES),
                   help="with --idle-only: which proxies (default: all)")
    p.add_argument("--store-compare", action="store_true",
                   help="instead: only trackingproxy's file store vs a Redis store, HTTPS "
                        "keep-alive (updates\nthat section of RESULTS.md and latest.json)")
    p.add_argument("--no-store-compare", action="store_true",
                   help="leave the file-vs-Redis store comparison out of a full or quick run")
    p.add_argument("--store-pairs", type=int, default=None,
                   help="file/redis run pairs per round of the store comparison "
                        "(default: 5 with --quick, else 3)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.latency_duration = 1, 3.0, 1.0, 4.0
    if args.store_pairs is None:
        args.store_pairs = 5 if args.quick else 3
    if args.store_pairs < 1:
        p.error("--store-pairs must be >= 1")
    if args.store_compare and args.no_store_compare:
        p.error("--store-compare and --no-store-compare exclude each other")
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "caddy", "wrk", "h2load", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found; `make bench` installs it (apt-get)")
    compare = not (args.no_store_compare or args.profile or args.idle_only)
    if compare and not servers.trackingproxy_supports("--store", REPO):
        if args.store_compare:
            sys.exit("bench: this checkout's trackingproxy has no --store option")
        log("this checkout's trackingproxy has no --store: no store comparison")
        compare = False
    if compare and storecompare.redis_server() is None:
        sys.exit("bench: redis-server not found; `make bench` installs it (apt-get), or pass "
                 "--no-store-compare")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    workdir = BENCH / "results" / "tmp"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    certs = servers.make_certs(workdir)
    extra = ["--no-acme"] if servers.trackingproxy_supports("--no-acme", REPO) else []
    if servers.trackingproxy_supports("--access-log", REPO):
        extra += ["--access-log", "off"]  # like every other proxy in the benchmark
    if servers.trackingproxy_supports("--admin-port", REPO):
        extra += ["--admin-port", "none"]  # no metrics work: the others keep none either
    if args.workers > 1:
        extra += ["--workers", str(args.workers)]
    stores: storecompare.Json | None = None
    up = servers.start_upstream(workdir, certs)
    try:
        servers.wait_ready(up)
        clients = Clients(workdir)
        if args.profile:
            from bench.profile import profile

            status = profile(args.profile, workdir, certs, up, clients, REPO, extra,
                             scenario=args.profile_scenario, syscalls=args.syscalls)
            shutil.rmtree(workdir, ignore_errors=True)
            return status
        if args.idle_only:
            status = idle_only(args, workdir, certs, up, clients, extra)
            shutil.rmtree(workdir, ignore_errors=True)
            return status
        if args.store_compare:
            command = "python -m bench.run --store-compare" + (" --quick" if args.quick else "")
            stores = compare_stores(args, command, workdir, certs, up, clients, extra)
            if not args.no_write:
                write_store_compare(stores)
            shutil.rmtree(workdir, ignore_errors=True)
            print(storecompare.line(stores["summary"]), flush=True)
            return 0
        command = "make bench-quick" if args.quick else "make bench"
        meta = metadata(args, command)
        rounds = [one_round(i, args, workdir, certs, up, clients, extra)
                  for i in range(args.rounds)]
        stores = (compare_stores(args, command, workdir, certs, up, clients, extra)
                  if compare else None)
    except BaseException:
        log(f"failed; logs and configuration kept in {workdir}")
        raise
    finally:
        up.stop()
    summary = report.summarise(rounds)
    if not args.no_write:
        results: dict[str, object] = {"meta": meta, "rounds": rounds, "summary": summary}
        if stores is not None:
            results["store_compare"] = stores
        (BENCH / "results" / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
        label = ("Quick run (`make bench-quick`): one round of short runs on a shared, noisy "
                 "machine; orientation only." if args.quick else
                 f"Full run (`make bench`): {args.rounds} rounds.")
        text = report.markdown(meta, summary, label)
        if stores is not None:
            text = storecompare.insert_section(text, storecompare.markdown(stores))
        (BENCH / "RESULTS.md").write_text(text)
        log("wrote bench/RESULTS.md and bench/results/latest.json")
    shutil.rmtree(workdir, ignore_errors=True)
    if stores is not None:
        print(storecompare.line(stores["summary"]), flush=True)
    print(report.last_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
