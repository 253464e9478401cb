# -*- test-case-name: tests.admin.test_status,tests.admin.test_scale,tests.admin.test_charts -*-
"""The HTML status page for people: rendered on the server from a /status snapshot.

One self-contained document (inline CSS, no scripts, no external assets; the admin resource
sends a Content-Security-Policy that forbids loading anything; the only links are to other
pages of itself, ``?q=...&page=N``): readiness, the ACME order queue in one line while
domains wait in it or the CA paused orders, and the problems first (listeners not
listening, then the domains without a valid certificate, expiring within 7 days or with
failing ACME orders, most urgent first, at most ``PROBLEMS_SHOWN``), request rates by kind,
charts of the last hour per minute (``trackingproxy.admin.charts``, from the process's own
``history.Window``; a constant amount of work whatever the number of domains), then one
page of the domain table with a search form (a GET form: ``?q=`` substring, ``?problems=1``)
and previous/next links. Each row has the certificate's issuer, a validity
timeline (not-before to not-after, marking now and the planned renewal), the renewal state
(for a domain waiting in the order queue: its place and estimated start), the last renewal
error and request counts. The snapshot already holds only the rows of the
page, so the work here does not grow with the number of domains. Every value is escaped.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from html import escape
from typing import Any
from urllib.parse import urlencode

from trackingproxy.admin.charts import render_charts
from trackingproxy.admin.history import Window
from trackingproxy.admin.listing import EXPIRING_DAYS

__all__ = ["PROBLEMS_SHOWN", "render_page"]

WARN_DAYS = 14
CRITICAL_DAYS = 3
PROBLEMS_SHOWN = 50
_KINDS = ("open", "click", "other")

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:18px;margin:0;font-weight:600}
header .meta{margin-left:auto;color:#b8bfcc;font-size:12px}
main{padding:18px 24px;max-width:1280px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:14px 18px;
 margin-bottom:16px}
h2{font-size:15px;margin:0 0 10px}
.badge{display:inline-block;border-radius:10px;padding:2px 10px;font-size:12px;font-weight:600;
 white-space:nowrap}
.ok{background:#d9f2e3;color:#11643a}.warn{background:#fdf0cf;color:#7a5300}
.bad{background:#fbdcdc;color:#8c1d1d}.muted{color:#6b7383}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:5px 8px;border-bottom:1px solid #eef0f3;font-size:13px;
 vertical-align:top}
th{color:#6b7383;font-weight:500}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-family:ui-monospace,"DejaVu Sans Mono",monospace;white-space:nowrap}
tr.err td{border-bottom:1px solid #eef0f3;padding-top:0}
.sub{color:#4a5263;font-size:12px;overflow-wrap:anywhere}
.rate{display:inline-block;height:8px;background:#5b7bd5;border-radius:2px;vertical-align:middle}
.facts{color:#4a5263;font-size:12.5px;margin:4px 0 8px}
.timeline{position:relative;height:10px;background:#e6e9ef;border-radius:3px;margin:5px 0 4px;
 min-width:140px}
.timeline .used{position:absolute;left:0;top:0;bottom:0;border-radius:3px 0 0 3px}
.timeline .used.ok{background:#8fd3ab}.timeline .used.warn{background:#f2c65b}
.timeline .used.bad{background:#ec8f8f}
.mark{position:absolute;top:-3px;bottom:-3px;width:2px}
.mark.now{background:#1d2330}.mark.renew{background:#2f5bd3}
.error{background:#fbdcdc;color:#8c1d1d;border-radius:4px;padding:6px 10px;margin:2px 0 4px;
 font-size:12.5px;white-space:pre-wrap;word-break:break-word}
ul.reasons{margin:0 0 10px;padding-left:20px}
#acme-queue{padding:10px 18px}#acme-queue .facts{margin:0}
form.search{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin:0 0 10px}
form.search input[type=search]{font:inherit;padding:4px 8px;width:22em;max-width:100%;
 border:1px solid #c5cbd5;border-radius:4px}
form.search button{font:inherit;padding:4px 12px;border:1px solid #2f5bd3;background:#2f5bd3;
 color:#fff;border-radius:4px}
nav.pages{display:flex;gap:14px;align-items:center;margin-top:10px}
nav.pages a{color:#2f5bd3}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px 22px}
figure.chart{margin:0;min-width:0}
figure.chart figcaption{font-weight:600;font-size:13px;margin-bottom:2px}
svg.chart{display:block;width:100%;height:auto}
ul.legend{list-style:none;margin:2px 0 0;padding:0;display:flex;flex-wrap:wrap;gap:2px 14px;
 font-size:12px;color:#4a5263}
ul.legend .key{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;
 vertical-align:-1px}
"""


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _when_iso(iso: str | None) -> str:
    if not iso:
        return "-"
    return _when(datetime.datetime.fromisoformat(iso).timestamp())


def _around(iso: str, now: float) -> str:
    """``14:05 UTC`` on the day of ``now`` (UTC), else with the date."""
    when = datetime.datetime.fromisoformat(iso).astimezone(datetime.UTC)
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    return when.strftime("%H:%M UTC" if when.date() == today else "%Y-%m-%d %H:%M UTC")


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


def _tone(seconds_left: float) -> str:
    if seconds_left > WARN_DAYS * 86400:
        return "ok"
    return "warn" if seconds_left > CRITICAL_DAYS * 86400 else "bad"


def _expiry_badge(left: float | None) -> str:
    """``expires in 5.0 days`` (``left`` seconds), ``expired ...`` or ``no certificate``."""
    if left is None:
        return '<span class="badge bad">no certificate</span>'
    text = f"expires in {_duration(left)}" if left > 0 else f"expired {_duration(left)}"
    return f'<span class="badge {_tone(left)}">{escape(text)}</span>'


def _timeline(cert: Mapping[str, Any], renewal: Mapping[str, Any] | None, now: float) -> str:
    """A bar from not-before to not-after, filled up to now, with now and the planned
    renewal (or retry) marked; the dates are written under it."""
    start, end = cert["not_before_ts"], cert["not_after_ts"]
    now_pct = _pct(now, start, end)
    marks = [f'<div class="mark now" style="left:{now_pct:.2f}%" title="now"></div>']
    if renewal is not None and renewal.get("next_attempt_ts") is not None:
        at = renewal["next_attempt_ts"]
        marks.append(
            f'<div class="mark renew" style="left:{_pct(at, start, end):.2f}%" '
            f'title="{escape(_when(at))}"></div>'
        )
    return (
        f'<div class="timeline"><div class="used {_tone(end - now)}" '
        f'style="width:{now_pct:.2f}%"></div>{"".join(marks)}</div>'
        f'<div class="sub">valid from {escape(_when(start))} to {escape(_when(end))}</div>'
    )


def _renewal(
    cert: Mapping[str, Any] | None, renewal: Mapping[str, Any] | None, now: float
) -> str:
    """Ordering now, waiting in the order queue (place, estimated start), the planned
    renewal or retry, or due now."""
    if renewal is None:
        return '<span class="muted">certificate you provide (not renewed here)</span>'
    parts = []
    if renewal["ordering"]:
        parts.append('<span class="badge warn">ordering now</span>')
    at = renewal.get("next_attempt_ts")
    failures = renewal.get("consecutive_failures", 0)
    place, eta = renewal.get("queue_position"), renewal.get("queue_eta")
    if place is not None:
        starts = f", starts ~{escape(_around(eta, now))}" if eta else ""
        parts.append(f'<div class="queued">queued #{place:,}{starts}</div>')
    elif at is not None:
        label = "retry" if failures else "renewal" if cert is not None else "next attempt"
        parts.append(f"<div>{label} {escape(_when(at))}</div>")
    elif not renewal["ordering"]:
        parts.append("<div>due now</div>")
    return "".join(parts)


def _error(renewal: Mapping[str, Any] | None) -> str:
    if renewal is None or not renewal.get("last_error"):
        return ""
    return (
        f'<div class="error"><b>last renewal error</b> '
        f"({escape(_when_iso(renewal['last_error_at']))}, "
        f"{renewal['consecutive_failures']} failure(s) in a row):\n"
        f"{escape(renewal['last_error'])}</div>"
    )


def _domain_row(d: Mapping[str, Any], now: float) -> str:
    cert, renewal = d["certificate"], d["renewal"]
    certificate = _expiry_badge(None if cert is None else cert["not_after_ts"] - now)
    validity = '<span class="muted">-</span>'
    if cert is not None:
        certificate += (
            f'<div class="sub">issuer <b title="{escape(cert["issuer"])}, serial '
            f'{escape(cert["serial"])}">{escape(_short_issuer(cert["issuer"]))}</b></div>'
            f'<div class="sub muted">from {escape(cert["source"])}</div>'
        )
        validity = _timeline(cert, renewal, now)
    counts = d.get("requests")
    if counts is None:
        requests = '<td class="num muted" colspan="3">not per domain</td>'
    else:
        requests = "".join(f'<td class="num">{counts.get(k, 0)}</td>' for k in _KINDS)
    row = (
        f'<tr><td class="name">{escape(d["name"])}</td><td>{certificate}</td>'
        f"<td>{validity}</td><td>{_renewal(cert, renewal, now)}</td>{requests}</tr>"
    )
    error = _error(renewal)
    if error:
        row += f'<tr class="err"><td></td><td colspan="6">{error}</td></tr>'
    return row


def _link(listing: Mapping[str, Any], page: int) -> str:
    """A query-only link to ``page`` of the same search."""
    params: dict[str, str | int] = {}
    if listing["q"]:
        params["q"] = listing["q"]
    if listing["problems_only"]:
        params["problems"] = 1
    params["page"] = page
    return escape("?" + urlencode(params))


def _pages(listing: Mapping[str, Any]) -> str:
    page, pages = listing["page"], listing["pages"]
    if pages <= 1:
        return ""
    nav = []
    for label, target, rel, on in (
        ("&laquo; first", 1, "", page > 1),
        ("&lsaquo; previous", page - 1, ' rel="prev"', page > 1),
        (None, 0, "", True),
        ("next &rsaquo;", page + 1, ' rel="next"', page < pages),
        ("last &raquo;", pages, "", page < pages),
    ):
        if label is None:
            nav.append(f"<span>page {page:,} of {pages:,}</span>")
        elif on:
            nav.append(f'<a href="{_link(listing, target)}"{rel}>{label}</a>')
        else:
            nav.append(f'<span class="muted">{label}</span>')
    return f'<nav class="pages" aria-label="pages">{"".join(nav)}</nav>'


def _count(listing: Mapping[str, Any], shown: int) -> str:
    """``51-100 of 10,000 domains`` (with a search: ``of 37 domains matching "x"``)."""
    matched, total = listing["matched"], listing["total"]
    per_page = listing["per_page"] or max(matched, 1)
    first = (listing["page"] - 1) * per_page + 1 if shown else 0
    span = f"{first:,}&ndash;{first + shown - 1:,}" if shown else "none"
    text = f"{span} of {matched:,} domains"
    if listing["problems_only"]:
        text += " with problems"
    if listing["q"]:
        text += f" matching &ldquo;{escape(listing['q'])}&rdquo;"
    if listing["q"] or listing["problems_only"]:
        text += f" ({total:,} in all)"
    return f'<p class="facts count">{text}</p>'


def _search(listing: Mapping[str, Any]) -> str:
    checked = " checked" if listing["problems_only"] else ""
    return (
        '<form class="search" method="get" role="search">'
        f'<input type="search" name="q" value="{escape(listing["q"])}" maxlength="253" '
        'placeholder="part of a domain name" aria-label="search domains">'
        f'<label><input type="checkbox" name="problems" value="1"{checked}> '
        "only domains with problems</label><button type=\"submit\">search</button></form>"
    )


def _domains(status: Mapping[str, Any], now: float) -> str:
    listing = status["listing"]
    rows = "".join(_domain_row(d, now) for d in status["domains"])
    table = (
        '<table class="domains"><thead><tr><th>domain</th><th>certificate</th>'
        "<th>validity</th><th>renewal</th><th class=num>opens</th><th class=num>clicks</th>"
        f"<th class=num>other</th></tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else '<p class="muted">no domain matches</p>'
    )
    return (
        f'<section id="domains"><h2>Domains and certificates</h2>{_search(listing)}'
        f"{_count(listing, len(status['domains']))}{table}{_pages(listing)}</section>"
    )


def _queue(queue: Mapping[str, Any] | None, now: float) -> str:
    """The ACME order queue in one line, while domains wait in it or the CA paused orders
    (nothing without ACME or with an idle queue)."""
    if not queue or not (queue["length"] or queue["paused_until"]):
        return ""
    waiting = queue["length"]
    parts = [
        "no domain waits for a certificate order" if not waiting
        else "1 domain waits for a certificate order" if waiting == 1
        else f"{waiting:,} domains wait for a certificate order",
        f"{queue['running']:,} running",
        f"at most {queue['max_orders_per_hour']:,} per hour "
        f"({queue['orders_last_hour']:,} in the last hour)",
    ]
    if waiting and queue["drained_at"]:
        parts.append(f"the last should start around {escape(_around(queue['drained_at'], now))}")
    if queue["paused_until"]:
        parts.append(
            '<span class="badge bad">paused by the CA until '
            f"{escape(_around(queue['paused_until'], now))}</span>"
        )
    reason = queue.get("pause_reason")
    said = f'<div class="sub">the CA said: {escape(reason)}</div>' if reason else ""
    return f'<section id="acme-queue"><p class="facts">{"; ".join(parts)}</p>{said}</section>'


def _problems(status: Mapping[str, Any]) -> str:
    """Listeners not listening, then the domains needing attention (most urgent first)."""
    down = [
        f"{li['option']} {li['endpoint']} is not listening"
        for li in status["listeners"]
        if not li["listening"]
    ]
    problems, count = status["problems"], status["problem_count"]
    if not down and not count:
        ok = "every domain has a valid certificate" if status["https"] else "HTTPS is off"
        return (
            f'<section id="problems"><h2>Problems</h2><p class="muted">none: {ok}, none '
            f"expires within {EXPIRING_DAYS} days, no ACME order is failing.</p></section>"
        )
    out = ['<section id="problems"><h2>Problems</h2>']
    if down:
        out.append(
            '<ul class="reasons">' + "".join(f"<li>{escape(r)}</li>" for r in down) + "</ul>"
        )
    rows = []
    for p in problems:
        badge = _expiry_badge(p["expires_in_seconds"])
        reasons = "".join(f"<div>{escape(r)}</div>" for r in p["reasons"])
        error = (
            f'<div class="error">{escape(p["last_error"])}</div>' if p["last_error"] else ""
        )
        rows.append(
            f'<tr class="problem"><td class="name">{escape(p["name"])}</td><td>{badge}</td>'
            f"<td>{reasons}{error}</td></tr>"
        )
    if rows:
        out.append(
            "<table><thead><tr><th>domain</th><th>certificate</th><th>problem</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
        )
    if count > len(problems):
        more = count - len(problems)
        out.append(
            f'<p class="facts">and {more:,} more domains with problems: '
            f'<a href="?problems=1">list them all</a></p>'
        )
    out.append("</section>")
    return "".join(out)


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


def _outage(outage: Mapping[str, Any] | None) -> str:
    """--outage-mode: off, or replay with the upstream's state and the journal's size."""
    if not outage or outage.get("mode") != "replay":
        return ""
    journal = outage.get("journal") or {}
    up = outage.get("upstream", "?")
    state = (
        '<span class="badge ok">up</span>' if up == "up"
        else f'<span class="badge bad">{escape(str(up))}</span>'
    )
    oldest = journal.get("oldest_age_seconds")
    kept = _duration(float(journal.get("ttl_seconds", 0)))
    dropped = ", ".join(f"{escape(str(k))} {v}" for k, v in (outage.get("dropped") or {}).items())
    rows = [
        ("mode", "replay"),
        ("upstream", state),
        ("journal", f"{journal.get('entries', 0)} request(s), {journal.get('bytes', 0):,} of "
                    f"{journal.get('max_bytes', 0):,} bytes"),
        ("oldest entry", f"{_duration(float(oldest))} old (kept {kept})" if oldest else "-"),
        ("journaled / replayed", f"{outage.get('journaled', 0)} / {outage.get('replayed', 0)}"),
        ("dropped", dropped or "0"),
        ("ambiguous (never re-sent)", str(outage.get("ambiguous", 0))),
    ]
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<section><h2>Outage mode</h2><table>{body}</table></section>"


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


def render_page(status: Mapping[str, Any], history: Window | None = None) -> bytes:
    """The page for one /status snapshot (UTF-8 bytes); its ``domains`` are the rows shown;
    ``history`` is the last hour for the charts (None: "no data yet")."""
    now = status["time"]
    if status["ready"]:
        ready = '<span class="badge ok">ready</span>'
    else:
        ready = '<span class="badge bad">not ready</span>'
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
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trackingproxy status</title><style>{_CSS}</style></head>
<body><header><h1>trackingproxy</h1>{ready}
<span class="meta">{escape(_when(now))} &middot; up {escape(_duration(status["uptime_seconds"]))}
</span></header><main>
{_queue(status.get("acme_queue"), now)}
{_problems(status)}
<section id="requests"><h2>Requests</h2>{_rates(status["requests"])}
<p class="facts">open connections: {conns} &middot; upstream requests {upstream["requests"]},
errors: {errors}</p></section>
{render_charts(history)}
{_domains(status, now)}
<section id="listeners"><h2>Listeners</h2><table>{listeners}</table></section>
{_cluster(status.get("cluster"))}
{_outage(status.get("outage"))}
</main></body></html>
"""
    return body.encode("utf-8")
