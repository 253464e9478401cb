"""The HTML status page for people: rendered on the server from the /status snapshot.

One self-contained document (inline CSS, no scripts, no external assets; the admin resource
sends a Content-Security-Policy that forbids loading anything): readiness, request rates by
kind, and per domain its certificate's issuer, a validity timeline (not-before to not-after,
marking now and the planned renewal), the last renewal error and request counts.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from html import escape
from typing import Any

__all__ = ["render_page"]

WARN_DAYS = 14
CRITICAL_DAYS = 3

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:18px;margin:0;font-weight:600}
header .meta{margin-left:auto;color:#b8bfcc;font-size:12px}
main{padding:18px 24px;max-width:1100px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:14px 18px;
 margin-bottom:16px}
h2{font-size:15px;margin:0 0 10px}
h3{font-size:15px;margin:0;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.badge{display:inline-block;border-radius:10px;padding:2px 10px;font-size:12px;font-weight:600}
.ok{background:#d9f2e3;color:#11643a}.warn{background:#fdf0cf;color:#7a5300}
.bad{background:#fbdcdc;color:#8c1d1d}.muted{color:#6b7383}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;font-size:13px}
th{color:#6b7383;font-weight:500}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.rate{display:inline-block;height:8px;background:#5b7bd5;border-radius:2px;vertical-align:middle}
.domain{border-top:1px solid #eef0f3;padding:14px 0 6px}
.domain:first-of-type{border-top:0;padding-top:4px}
.row{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.facts{color:#4a5263;font-size:12.5px;margin:4px 0 8px}
.timeline{position:relative;height:18px;background:#e6e9ef;border-radius:4px;margin:26px 0 24px}
.timeline .used{position:absolute;left:0;top:0;bottom:0;border-radius:4px 0 0 4px}
.timeline .used.ok{background:#8fd3ab}.timeline .used.warn{background:#f2c65b}
.timeline .used.bad{background:#ec8f8f}
.mark{position:absolute;top:-6px;bottom:-6px;width:2px}
.mark span{position:absolute;white-space:nowrap;font-size:11px;transform:translateX(-50%)}
.mark.start span{transform:none}.mark.end span{transform:translateX(-100%)}
.mark.now{background:#1d2330}.mark.now span{top:-17px}
.mark.renew{background:#2f5bd3}.mark.renew span{bottom:-17px;color:#2f5bd3}
.ends{font-size:11.5px;color:#6b7383;margin-top:-6px}
.error{background:#fbdcdc;color:#8c1d1d;border-radius:4px;padding:6px 10px;margin:8px 0;
 font-size:12.5px;white-space:pre-wrap;word-break:break-word}
ul.reasons{margin:6px 0 0;padding-left:20px}
"""


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    s = abs(seconds)
    if s < 90:
        text = f"{s:.0f} s"
    elif s < 5400:
        text = f"{s / 60:.0f} min"
    elif s < 172800:
        text = f"{s / 3600:.1f} h"
    else:
        text = f"{s / 86400:.1f} days"
    return text if seconds >= 0 else f"{text} ago"


def _short_issuer(issuer: str) -> str:
    """``CN=R11,O=Let's Encrypt,C=US`` -> ``R11 (Let's Encrypt)``; else the whole string."""
    parts = dict(p.split("=", 1) for p in issuer.split(",") if "=" in p)
    cn, org = parts.get("CN"), parts.get("O")
    if cn and org:
        return f"{cn} ({org})"
    return cn or org or issuer


def _pct(value: float, start: float, end: float) -> float:
    if end <= start:
        return 100.0
    return max(0.0, min(100.0, (value - start) * 100.0 / (end - start)))


def _mark(kind: str, pct: float, label: str) -> str:
    """A marker line at ``pct`` of the bar; labels near an edge are anchored to that edge."""
    edge = " start" if pct < 12 else " end" if pct > 88 else ""
    return (
        f'<div class="mark {kind}{edge}" style="left:{pct:.2f}%"><span>{escape(label)}</span></div>'
    )


def _timeline(cert: Mapping[str, Any], renewal: Mapping[str, Any] | None, now: float) -> str:
    start, end = cert["not_before_ts"], cert["not_after_ts"]
    left = end - now
    tone = "ok" if left > WARN_DAYS * 86400 else "warn" if left > CRITICAL_DAYS * 86400 else "bad"
    now_pct = _pct(now, start, end)
    marks = [_mark("now", now_pct, "now")]
    if renewal is not None and renewal.get("next_attempt_ts") is not None:
        at = renewal["next_attempt_ts"]
        label = "renewal" if renewal.get("consecutive_failures", 0) == 0 else "retry"
        marks.append(_mark("renew", _pct(at, start, end), f"{label} {_when(at)}"))
    return (
        f'<div class="timeline"><div class="used {tone}" style="width:{now_pct:.2f}%"></div>'
        f'{"".join(marks)}</div><div class="ends">valid from {escape(_when(start))} '
        f"to {escape(_when(end))}</div>"
    )


def _domain(d: Mapping[str, Any], now: float) -> str:
    cert, renewal = d["certificate"], d["renewal"]
    out = [f'<div class="domain"><div class="row"><h3>{escape(d["name"])}</h3>']
    if cert is None:
        out.append('<span class="badge bad">no certificate</span>')
    else:
        left = cert["not_after_ts"] - now
        tone = (
            "ok" if left > WARN_DAYS * 86400 else "warn" if left > CRITICAL_DAYS * 86400 else "bad"
        )
        text = f"expires in {_duration(left)}" if left > 0 else f"expired {_duration(left)}"
        out.append(f'<span class="badge {tone}">{escape(text)}</span>')
    if renewal is None:
        out.append('<span class="muted">certificate you provide (not renewed here)</span>')
    elif renewal["ordering"]:
        out.append('<span class="badge warn">ordering now</span>')
    out.append("</div>")
    if cert is not None:
        out.append(
            f'<div class="facts">issuer <b title="{escape(cert["issuer"])}">'
            f"{escape(_short_issuer(cert['issuer']))}</b> &middot; serial "
            f"{escape(cert['serial'])} &middot; from {escape(cert['source'])}</div>"
        )
        out.append(_timeline(cert, renewal, now))
    elif renewal is not None and renewal["next_attempt_ts"] is not None:
        out.append(
            f'<div class="facts">next attempt {escape(_when(renewal["next_attempt_ts"]))}</div>'
        )
    if renewal is not None and renewal["last_error"]:
        out.append(
            f'<div class="error"><b>last renewal error</b> '
            f"({escape(_when_iso(renewal['last_error_at']))}, "
            f"{renewal['consecutive_failures']} failure(s) in a row):\n"
            f"{escape(renewal['last_error'])}</div>"
        )
    counts = d["requests"]
    out.append(
        '<div class="facts">requests: '
        + " &middot; ".join(f"{escape(k)} {counts.get(k, 0)}" for k in ("open", "click", "other"))
        + "</div></div>"
    )
    return "".join(out)


def _when_iso(iso: str | None) -> str:
    if not iso:
        return "-"
    return _when(datetime.datetime.fromisoformat(iso).timestamp())


def _rates(requests: Mapping[str, Any]) -> str:
    one = requests.get("per_second_1m") or {}
    five = requests.get("per_second_5m") or {}
    total = requests["total"]
    peak = max([*one.values(), *five.values(), 0.0001])
    rows = []
    for kind, label in (("open", "opens (/q/)"), ("click", "clicks (/f/)"), ("other", "other")):
        r1 = one.get(kind, 0.0)
        width = 120 * r1 / peak
        rows.append(
            f"<tr><td>{label}</td><td class=num>{r1:.2f}/s</td>"
            f'<td><span class="rate" style="width:{width:.1f}px"></span></td>'
            f"<td class=num>{five.get(kind, 0.0):.2f}/s</td><td class=num>{total[kind]}</td></tr>"
        )
    return (
        "<table><tr><th>kind</th><th class=num>last minute</th><th></th>"
        f"<th class=num>last 5 minutes</th><th class=num>total</th></tr>{''.join(rows)}</table>"
    )


def _cluster(cluster: Mapping[str, Any] | None) -> str:
    """This replica's name and, with --store, the store (password masked) and its state."""
    if cluster is None:
        return ""
    rows = [f"<tr><td>node</td><td>{escape(cluster['node_id'])}</td></tr>"]
    if cluster.get("store"):
        up = cluster.get("store_up")
        state = (
            '<span class="badge ok">reachable</span>' if up
            else '<span class="badge bad">unreachable</span>'
        )
        synced = cluster.get("store_last_sync")
        rows.append(f"<tr><td>store</td><td>{escape(cluster['store'])} {state}</td></tr>")
        rows.append(
            f"<tr><td>last sync</td><td>{escape(_when(synced) if synced else 'not yet')}</td></tr>"
        )
    return f"<section><h2>Cluster</h2><table>{''.join(rows)}</table></section>"


def render_page(status: Mapping[str, Any]) -> bytes:
    """The page for one /status snapshot (UTF-8 bytes)."""
    now = status["time"]
    if status["ready"]:
        ready = '<span class="badge ok">ready</span>'
        reasons = ""
    else:
        ready = '<span class="badge bad">not ready</span>'
        reasons = (
            '<section><h2>Not ready</h2><ul class="reasons">'
            + "".join(f"<li>{escape(r)}</li>" for r in status["not_ready_reasons"])
            + "</ul></section>"
        )
    domains = "".join(_domain(d, now) for d in status["domains"]) or '<p class="muted">none</p>'
    upstream = status["upstream"]
    errors = ", ".join(f"{escape(k)} {v}" for k, v in upstream["errors"].items() if v) or "none"
    listeners = "".join(
        f"<tr><td>{escape(li['option'])}</td><td>{escape(li['endpoint'])}</td>"
        f"<td>{escape(li['address'] or 'not listening')}</td></tr>"
        for li in status["listeners"]
    )
    conns = ", ".join(f"{escape(k)} {v}" for k, v in status["connections"].items()) or "0"
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="30">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trackingproxy status</title><style>{_CSS}</style></head>
<body><header><h1>trackingproxy</h1>{ready}
<span class="meta">{escape(_when(now))} &middot; up {escape(_duration(status["uptime_seconds"]))}
</span></header><main>{reasons}
<section><h2>Requests</h2>{_rates(status["requests"])}
<p class="facts">open connections: {conns} &middot; upstream requests {upstream["requests"]},
errors: {errors}</p></section>
<section><h2>Domains and certificates</h2>{domains}</section>
<section><h2>Listeners</h2><table>{listeners}</table></section>
{_cluster(status.get("cluster"))}
</main></body></html>
"""
    return body.encode("utf-8")
