"""Turning rounds of raw measurements into medians, ratios, bench/RESULTS.md and the last line.

Ratios are computed within each round (trackingproxy against the others measured in that same
round, so a noisy round moves both sides) and the median of the per-round ratios is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from bench.servers import PROXIES

Json = dict[str, Any]
SUBJECT = "trackingproxy"
OTHERS = tuple(p for p in PROXIES if p != SUBJECT)
LOAD_METRICS = ("rps", "p50_ms", "p99_ms", "cpu_share", "per_cpu", "failures")
MEMORY_METRICS = ("rss_base_kib", "peak_rss_kib", "kib_per_idle", "idle_held")
SCENARIO_TITLES = {
    "http-ka": "HTTP/1.1 keep-alive, plain (wrk)",
    "https-ka": "HTTP/1.1 keep-alive, TLS (wrk)",
    "h2": "HTTP/2, TLS (h2load -m1)",
    "https-resume": "new connection per request, TLS resumed (wrk, Connection: close)",
    "https-full": "new connection per request, full TLS handshake (fresh h2load clients)",
}


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(rounds: list[Json]) -> Json:
    """Medians over rounds of every figure, and medians of the per-round ratios."""
    scenarios: list[str] = list(rounds[0]["load"]) if rounds else []
    load: Json = {}
    ratios: Json = {}
    for sc in scenarios:
        load[sc] = {
            p: {m: _median(r["load"][sc][p].get(m) for r in rounds) for m in LOAD_METRICS}
            for p in PROXIES
        }
        ratios[sc] = {
            m: {
                o: _median(
                    _ratio(r["load"][sc][SUBJECT].get(m), r["load"][sc][o].get(m))
                    for r in rounds
                )
                for o in OTHERS
            }
            for m in ("rps", "per_cpu", "p99_ms")
        }
    memory = {
        p: {m: _median(r["memory"][p].get(m) for r in rounds) for m in MEMORY_METRICS}
        for p in PROXIES
    }
    memory_ratios = {
        m: {
            o: _median(_ratio(r["memory"][SUBJECT].get(m), r["memory"][o].get(m)) for r in rounds)
            for o in OTHERS
        }
        for m in ("peak_rss_kib", "kib_per_idle")
    }
    targets = [*rounds[0]["latency"]] if rounds else []
    latency = {
        t: {m: _median(r["latency"][t].get(m) for r in rounds) for m in ("p50_ms", "p99_ms")}
        for t in targets
    }
    for t in targets:
        if t != "direct":
            for m in ("p50_ms", "p99_ms"):
                latency[t]["added_" + m] = _median(
                    _sub(r["latency"][t].get(m), r["latency"]["direct"].get(m)) for r in rounds
                )
    return {
        "load": load,
        "ratios": ratios,
        "memory": memory,
        "memory_ratios": memory_ratios,
        "latency": latency,
    }


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def targets(summary: Json) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (what, measured, met?)."""
    r = summary["ratios"]
    load = summary["load"]
    out: list[tuple[str, str, bool | None]] = []

    def check(what: str, value: float | None, ok: bool | None, digits: int = 2) -> None:
        out.append((what, _f(value, digits), ok if value is not None else None))

    v = r.get("https-ka", {}).get("per_cpu", {}).get("caddy")
    check("HTTPS keep-alive req/CPU-s >= 0.55x Caddy", v, v is not None and v >= 0.55)
    v = r.get("https-ka", {}).get("per_cpu", {}).get("nginx-seed")
    check("HTTPS keep-alive req/CPU-s >= 3.5x nginx-seed", v, v is not None and v >= 3.5)
    h2 = load.get("h2", {}).get(SUBJECT, {}).get("per_cpu")
    h1 = load.get("https-ka", {}).get(SUBJECT, {}).get("per_cpu")
    v = _ratio(h2, h1)
    check("HTTP/2 req/CPU-s >= 0.5x own HTTP/1.1 (TLS)", v, v is not None and v >= 0.5)
    v = r.get("https-full", {}).get("per_cpu", {}).get("caddy")
    check("full handshakes req/CPU-s >= 0.8x Caddy", v, v is not None and v >= 0.8)
    v = summary["memory"][SUBJECT]["kib_per_idle"]
    check("idle TLS connection <= 20 KiB", v, v is not None and v <= 20, 1)
    lat = summary["latency"].get(SUBJECT, {})
    v = lat.get("added_p50_ms")
    check("added latency p50 < 1 ms at the paced load", v, v is not None and v < 1, 2)
    v = lat.get("added_p99_ms")
    check("added latency p99 < 5 ms at the paced load", v, v is not None and v < 5, 2)
    return out


def last_line(summary: Json) -> str:
    per_cpu = summary["ratios"].get("https-ka", {}).get("per_cpu", {})
    return (
        f"https-ka per-cpu: trackingproxy/caddy={_f(per_cpu.get('caddy'), 2)} "
        f"trackingproxy/nginx-seed={_f(per_cpu.get('nginx-seed'), 2)}"
    )


def markdown(meta: Mapping[str, Any], summary: Json, label: str) -> str:
    """bench/RESULTS.md."""
    s = meta["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"**{label}**",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} (commit {meta['commit']}). "
        f"{s['rounds']} round(s), {s['duration']:g} s per scenario, {s['connections']} "
        f"connections, medians over rounds; ratios are medians of per-round ratios. Load "
        f"average at start: {meta['loadavg']}.",
        "",
        "## Machine and versions",
        "",
        *(f"- {k}: {v}" for k, v in meta["machine"].items()),
        *(f"- {k}: {v}" for k, v in meta["versions"].items()),
        "",
        "## Throughput and CPU",
        "",
        "`proxy CPU` is the proxy's CPU time over wall time (1.00 = its whole core); "
        "`req/CPU-s` is requests per second of proxy CPU, the fair figure when the load "
        "generator saturates the other core.",
        "",
    ]
    for sc, per_proxy in summary["load"].items():
        lines += [
            f"### {sc}: {SCENARIO_TITLES.get(sc, sc)}",
            "",
            "| proxy | req/s | p50 ms | p99 ms | proxy CPU | req/CPU-s | failures |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p, m in per_proxy.items():
            lines.append(
                f"| {p} | {_f(m['rps'])} | {_f(m['p50_ms'], 2)} | {_f(m['p99_ms'], 2)} | "
                f"{_f(m['cpu_share'], 2)} | {_f(m['per_cpu'])} | {_f(m['failures'])} |"
            )
        rat = summary["ratios"][sc]
        lines += ["", "| trackingproxy / | " + " | ".join(OTHERS) + " |"]
        lines.append("| --- |" + " ---: |" * len(OTHERS))
        for metric, title in (("per_cpu", "req/CPU-s"), ("rps", "req/s"), ("p99_ms", "p99")):
            cells = " | ".join(_f(rat[metric][o], 2) for o in OTHERS)
            lines.append(f"| {title} | {cells} |")
        lines.append("")
    lines += [
        "## Memory",
        "",
        "RSS summed over the proxy's processes (nginx: master + worker). `RSS base`: after "
        "start-up and a short warm-up; `peak RSS`: VmHWM at the end of the round (includes the "
        "idle connections and all load scenarios); `KiB/idle conn`: RSS growth while holding "
        f"{s['idle']:,} idle TLS keep-alive connections (each made one request), divided by "
        "the connections held.",
        "",
        "| proxy | RSS base KiB | peak RSS KiB | KiB/idle conn | idle conns held |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p, m in summary["memory"].items():
        lines.append(
            f"| {p} | {_f(m['rss_base_kib'])} | {_f(m['peak_rss_kib'])} | "
            f"{_f(m['kib_per_idle'], 1)} | {_f(m['idle_held'])} |"
        )
    mr = summary["memory_ratios"]
    lines += ["", "| trackingproxy / | " + " | ".join(OTHERS) + " |"]
    lines.append("| --- |" + " ---: |" * len(OTHERS))
    for metric, title in (("peak_rss_kib", "peak RSS"), ("kib_per_idle", "KiB/idle conn")):
        lines.append(f"| {title} | " + " | ".join(_f(mr[metric][o], 2) for o in OTHERS) + " |")
    lines += [
        "",
        f"## Latency at a fixed offered load ({s['paced_rate']} req/s, one HTTPS keep-alive "
        "connection, h2load --rps)",
        "",
        "| target | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for t, m in summary["latency"].items():
        lines.append(
            f"| {t} | {_f(m['p50_ms'], 2)} | {_f(m['p99_ms'], 2)} | "
            f"{_f(m.get('added_p50_ms'), 2)} | {_f(m.get('added_p99_ms'), 2)} |"
        )
    lines += ["", "## The issue's targets", "", "| target | measured | met |"]
    lines.append("| --- | ---: | --- |")
    for what, value, ok in targets(summary):
        lines.append(f"| {what} | {value} | {'n/a' if ok is None else 'yes' if ok else 'no'} |")
    lines += ["", last_line(summary), ""]
    return "\n".join(lines)
