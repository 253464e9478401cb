"""File store against Redis store: trackingproxy's HTTPS keep-alive throughput both ways.

    python -m bench.run --store-compare --quick   # only this (~1 minute), its section updated
    make bench-quick                              # part of every run (skip: --no-store-compare)

The request path must not touch the store (only HTTP-01 answers are looked up there), so a
replica with ``--store redis://`` should serve HTTPS keep-alive as fast as one keeping its state
in files. Each round starts a throw-away ``redis-server`` (``--save '' --appendonly no``, on the
client CPU) and two trackingproxy processes on CPU 0, both with the built-in local CA
(``--acme-directory local``, offline; ``--store`` only takes effect with ACME, so neither gets
``--cert``/``--no-acme``): ``file`` (today's default, the state directory) and ``redis`` (the
same plus ``--store redis://127.0.0.1:PORT/0 --node-id bench``). Then wrk runs against them in
turn, file, redis, file, redis... (the first one alternating per round), each run after a
warm-up, so that drift of the machine spreads over both.

Checked, so that the figures are what they claim: the redis variant's certificate is in Redis
before anything is measured, and Redis's command counter is read around each measured run (the
commands the proxy sent meanwhile are reported: the request path should send none).
"""

# ruff: noqa: S603  (a benchmark harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import Clients, Load
from bench.servers import CLIENT_CPU, Certs, Server

Json = dict[str, Any]
Measure = Callable[[Server, Callable[[], Load]], dict[str, float | int | str | None]]
VARIANTS = ("file", "redis")
TITLE = "File store vs Redis store (HTTPS keep-alive)"
NODE_ID = "bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- a throw-away redis-server ----------------------------------------------------------------
def redis_server() -> str | None:
    """Debian's redis-server, or None."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def redis_version() -> str:
    binary = redis_server()
    if binary is None:
        return "n/a"
    res = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    version = next((w[2:] for w in res.stdout.split() if w.startswith("v=")), None)
    return f"redis-server {version}" if version else res.stdout.strip() or "n/a"


def start_redis(directory: Path) -> Server:
    """redis-server on 127.0.0.1:<free port>, nothing persisted, pinned to the client CPU."""
    binary = redis_server()
    assert binary is not None
    port = servers.free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(directory), "--daemonize", "no"]
    # Server's "https" field is the port it listens on; Redis speaks RESP there.
    return servers.start("redis", argv, directory / "redis.log", port, None, CLIENT_CPU)


def redis_command(port: int, *words: str) -> bytes:
    """One command over a fresh connection; the reply's payload (RESP2, no arrays)."""
    request = f"*{len(words)}\r\n".encode()
    for word in words:
        request += f"${len(word.encode())}\r\n{word}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            data += chunk
        head, _, rest = data.partition(b"\r\n")
        if head.startswith(b"-"):
            raise RuntimeError(f"redis: {head[1:].decode()}")
        if not head.startswith(b"$"):
            return head[1:]
        size = int(head[1:])
        while len(rest) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            rest += chunk
        return rest[:size]


def commands_processed(port: int) -> int:
    for line in redis_command(port, "INFO", "stats").decode().splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("redis INFO stats has no total_commands_processed")


def wait_redis(server: Server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            if redis_command(server.https, "PING") == b"PONG":
                return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"redis-server not ready ({last}); log tail:\n{server.tail()}")


# -- the two proxies --------------------------------------------------------------------------
def variant_options(extra: Sequence[str]) -> list[str]:
    """The main bench's trackingproxy options without --no-acme and --workers (one process)."""
    out: list[str] = []
    skip = False
    for arg in extra:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif arg != "--no-acme" and not arg.startswith("--workers="):
            out.append(arg)
    return out


def start_variant(
    variant: str, directory: Path, certs: Certs, upstream: int, repo: Path,
    extra: Sequence[str], redis_port: int,
) -> Server:
    state = directory / f"state-{variant}"
    options = [*variant_options(extra), "--acme-directory", "local", f"--state-dir={state}"]
    if variant == "redis":
        options += ["--store", f"redis://127.0.0.1:{redis_port}/0", f"--node-id={NODE_ID}"]
    return servers.start_trackingproxy(
        directory, certs, upstream, repo, options, label=f"trackingproxy-{variant}",
        own_cert=False,
    )


def measure_stores(
    settings: Json, command: str, commit: str, workdir: Path, certs: Certs, up: Server,
    clients: Clients, extra: Sequence[str], repo: Path, measure: Measure,
) -> Json:
    """``settings["rounds"]`` rounds; the result goes to latest.json's ``store_compare``."""
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "redis": redis_version(),
        "settings": settings,
    }
    rounds = [compare_round(i, settings, workdir, certs, up, clients, extra, repo, measure)
              for i in range(settings["rounds"])]
    summary = summarise(rounds)
    log(line(summary))
    return {"meta": meta, "rounds": rounds, "summary": summary}


def compare_round(
    index: int, settings: Json, workdir: Path, certs: Certs, up: Server, clients: Clients,
    extra: Sequence[str], repo: Path, measure: Measure,
) -> Json:
    """One round: fresh Redis and proxies, then ``pairs`` x (file, redis) interleaved runs."""
    rounds, pairs = settings["rounds"], settings["pairs"]
    order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
    log(f"store comparison, round {index + 1}/{rounds}: {pairs} x ({', '.join(order)})")
    directory = workdir / f"store-{index + 1}"
    directory.mkdir()
    redis = start_redis(directory)
    running: dict[str, Server] = {}
    try:
        wait_redis(redis)
        # INFO counts itself: what two INFOs in a row add is not the proxy's.
        first = commands_processed(redis.https)
        overhead = commands_processed(redis.https) - first
        for variant in order:
            running[variant] = start_variant(
                variant, directory, certs, up.https, repo, extra, redis.https
            )
        problems: list[str] = []
        for server in running.values():
            servers.wait_ready(server)
            problems += servers.check_proxy(server)
        if problems:
            raise RuntimeError("functional check failed: " + "; ".join(problems))
        keys = int(redis_command(redis.https, "DBSIZE"))
        if keys == 0 or b"Store: redis://" not in running["redis"].log.read_bytes():
            raise RuntimeError("the redis variant does not keep its certificate in Redis:\n"
                               + running["redis"].tail())
        runs: list[Json] = []
        for pair in range(pairs):
            for variant in order:
                server = running[variant]
                if settings["warmup"] > 0:
                    clients.wrk(server.https, True, settings["connections"], settings["warmup"])
                before = commands_processed(redis.https)
                result: Json = dict(measure(server, lambda s=server: clients.wrk(  # type: ignore[misc]
                    s.https, True, settings["connections"], settings["duration"])))
                result["store_commands"] = commands_processed(redis.https) - before - overhead
                result.update(variant=variant, pair=pair + 1)
                runs.append(result)
                log(f"  https-ka {variant:5} store  {result['rps'] or 0:9.0f} req/s  "
                    f"cpu {result['cpu_share'] or 0:.2f}  {result['per_cpu'] or 0:8.0f} "
                    f"req/cpu-s  p99 {result['p99_ms'] or 0:.2f} ms  failures "
                    f"{result['failures']}  redis commands {result['store_commands']}")
        return {"round": index + 1, "order": list(order), "redis_keys": keys, "runs": runs}
    finally:
        for server in running.values():
            server.stop()
        redis.stop()


# -- summary and RESULTS.md -------------------------------------------------------------------
def _median(runs: list[Json], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def _stats(runs: list[Json]) -> Json:
    rps = [r["rps"] for r in runs if r["rps"] is not None]
    median = _median(runs, "rps")
    return {
        "runs": len(runs),
        "rps_median": median,
        "rps_min": min(rps, default=None),
        "rps_max": max(rps, default=None),
        "rps_spread": (max(rps) - min(rps)) / median if median else None,
        "per_cpu_median": _median(runs, "per_cpu"),
        "cpu_share_median": _median(runs, "cpu_share"),
        "p99_ms_median": _median(runs, "p99_ms"),
        "requests": sum(r["requests"] for r in runs),
        "failures": sum(r["failures"] for r in runs),
        "store_commands": sum(r["store_commands"] for r in runs),
    }


def _pair_ratios(rounds: list[Json], metric: str) -> list[float]:
    """redis / file of ``metric`` for each pair of consecutive runs in the same round."""
    ratios = []
    for rnd in rounds:
        by = {(r["variant"], r["pair"]): r[metric] for r in rnd["runs"]}
        for pair in sorted({r["pair"] for r in rnd["runs"]}):
            file_value, redis_value = by.get(("file", pair)), by.get(("redis", pair))
            if file_value and redis_value is not None:
                ratios.append(redis_value / file_value)
    return ratios


def summarise(rounds: list[Json]) -> Json:
    """Medians and ranges per variant; redis/file per pair (same round, consecutive runs)."""
    runs = [r for rnd in rounds for r in rnd["runs"]]
    per = {v: _stats([r for r in runs if r["variant"] == v]) for v in VARIANTS}
    ratios, cpu_ratios = _pair_ratios(rounds, "rps"), _pair_ratios(rounds, "per_cpu")
    ratio = statistics.median(ratios) if ratios else None
    spread = per["file"]["rps_spread"]
    noise = spread / 2 if spread is not None else None
    return {
        "variants": per,
        "pair_ratios": ratios,
        "ratio": ratio,
        "ratio_min": min(ratios, default=None),
        "ratio_max": max(ratios, default=None),
        "per_cpu_pair_ratios": cpu_ratios,
        "per_cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
        "noise": noise,
        "within_noise": (abs(ratio - 1) <= noise
                         if ratio is not None and noise is not None else None),
    }


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def line(summary: Json) -> str:
    """One line for the console."""
    v = summary["variants"]
    within = summary["within_noise"]
    return (f"store-compare https-ka req/s: file={_f(v['file']['rps_median'])} "
            f"redis={_f(v['redis']['rps_median'])} redis/file={_f(summary['ratio'], 3)} "
            f"(within noise: {'n/a' if within is None else 'yes' if within else 'no'})")


def markdown(result: Json) -> str:
    """The RESULTS.md section (it says itself which run made it)."""
    meta, summary = result["meta"], result["summary"]
    s = meta["settings"]
    per = summary["variants"]
    runs = per["file"]["runs"]
    lines = [
        f"## {TITLE}",
        "",
        f"From `{meta['command']}` on {meta['date']} (commit {meta['commit']}; load average at "
        f"start {meta['loadavg']}). trackingproxy twice, both with the built-in local CA "
        "(`--acme-directory local`, offline; `--store` only takes effect with ACME, so neither "
        "runs with `--cert`/`--no-acme` here): **file** keeps its state in its state directory "
        "(the default), **redis** adds `--store redis://127.0.0.1:PORT/0 --node-id "
        f"{NODE_ID}` (a throw-away {meta['redis']}, `--save '' --appendonly no`, on CPU 1). "
        "Both run on CPU 0, one process each. wrk, HTTPS keep-alive, "
        f"{s['connections']} connections, {s['duration']:g} s runs each after a "
        f"{s['warmup']:g} s warm-up, alternating file, redis, file, redis, ...: {runs} runs "
        f"of each in {s['rounds']} round(s) ({s['pairs']} pairs per round, the first variant "
        "alternating per round).",
        "",
        "| store | req/s median | min | max | spread | req/CPU-s | proxy CPU | p99 ms "
        "| failures | Redis commands |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in VARIANTS:
        m = per[variant]
        spread = None if m["rps_spread"] is None else 100 * m["rps_spread"]
        commands = _f(m["store_commands"])
        lines.append(
            f"| {variant} | {_f(m['rps_median'])} | {_f(m['rps_min'])} | {_f(m['rps_max'])} | "
            f"{_f(spread, 1, ' %')} | {_f(m['per_cpu_median'])} | "
            f"{_f(m['cpu_share_median'], 2)} | {_f(m['p99_ms_median'], 2)} | "
            f"{_f(m['failures'])} | {commands} |"
        )
    ratio, noise, within = summary["ratio"], summary["noise"], summary["within_noise"]
    pairs = ", ".join(_f(r, 3) for r in summary["pair_ratios"])
    verdict = "n/a" if within is None else "yes" if within else "no"
    off = None if ratio is None else 100 * abs(ratio - 1)
    requests, commands = per["redis"]["requests"], per["redis"]["store_commands"]
    shares = [m["cpu_share_median"] for m in per.values() if m["cpu_share_median"] is not None]
    if shares and min(shares) < 0.9:
        lines += [
            "",
            f"The proxy got {_f(min(shares), 2)} of its CPU (median of a variant's runs): other "
            "processes ran on CPU 0 too, so req/s follows what they left; req/CPU-s is the "
            "steadier figure then.",
        ]
    lines += [
        "",
        f"redis / file req/s: **{_f(ratio, 3)}** (median of the per-pair ratios {pairs}; "
        f"req/CPU-s: {_f(summary['per_cpu_ratio'], 3)}). "
        f"Within the noise of the file store: **{verdict}** (|ratio - 1| = {_f(off, 1, ' %')}; "
        f"the noise is half the file store's own run-to-run range, "
        f"{_f(None if noise is None else 100 * noise, 1, ' %')}).",
        "",
        "`spread` = (max - min) / median. `Redis commands` = what Redis processed (its "
        "`total_commands_processed`, less the bench's own reads) during the measured runs of "
        "each variant; only the redis variant talks to Redis, so in the file row they are its "
        f"background work while idle. In the redis variant's runs: {_f(commands)} for "
        f"{_f(requests)} requests ({_f(commands / requests if requests else None, 4)} per "
        "request).",
        "",
    ]
    return "\n".join(lines)


def insert_section(text: str, section: str) -> str:
    """``text`` (RESULTS.md) with this section replaced, or inserted before the targets."""
    head = f"## {TITLE}\n"
    start = text.find(head)
    section = section.rstrip("\n") + "\n"
    if start >= 0:
        end = text.find("\n## ", start + len(head))
        return text[:start] + section + (text[end:] if end >= 0 else "")
    targets = text.find("## The issue's targets")
    if targets >= 0:
        return text[:targets] + section + "\n" + text[targets:]
    return text.rstrip("\n") + "\n\n" + section
