"""``make soak``: mixed load for SOAK_SECONDS (default 600) against the real process, with
certificate renewals about every minute, a 30-second upstream outage in the middle and a
SIGTERM under load at the end; then the property tests with many more examples.

Reuses ``demo/run_demo.py``: pebble (certificateValidityPeriod 120 s, so the proxy renews when
half is left: every minute), the spgo.io stand-in and ``twistd trackingproxy`` on free loopback
ports. Load: Python HTTP/1.1 clients (plain and TLS, opens and clicks, a new TLS connection every
20 requests so renewed certificates are met) and h2load bursts (HTTP/2). Writes
``soak/RESULTS.md`` and prints a summary; exit status 1 when a check failed.

The proxy runs with ``--outage-mode replay``. Every load request carries a unique id: in its
``User-Agent`` (``trackingproxy-soak/<id>``, HTTP/1.1) and, except for the clicks on a few
fixed links (so that the proxy learns their redirects before the outage), in its path; h2load
requests carry theirs in the path only (``/q/h2-<burst>-<i>``). The stand-in records every
request it receives (``--record``). The outage stops the stand-in process, so new upstream
connections are refused (journaled) and requests on a pooled connection may be cut
(ambiguous). While it lasts the clients slow down (about 40 requests/s in all) so that the
journal, re-sent at the proxy's 20 requests/s, drains in about a minute; the soak waits for
``trackingproxy_outage_journal_entries`` to be 0 before the SIGTERM phase, then counts: ids
sent, local answers by kind, journaled, replayed, recorded, duplicates (an id recorded more
than once: must be 0), ambiguous and lost (answered by the proxy, never recorded).
"""

# ruff: noqa: S603  (a load harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo import run_demo  # noqa: E402

DOMAIN = run_demo.DOMAINS[0]
VALIDITY = 120
OUTAGE = 30.0
OUTAGE_PAUSE = 0.2  # seconds between requests of one HTTP/1.1 worker during the outage
LINKS = 10  # fixed click targets per worker: learned before the outage, remembered during it
UA = "trackingproxy-soak/"
DRAIN_TIMEOUT = 300.0
Record = tuple[float, float, bool, str, str, int]  # start, end, ok, kind/error, id, status (0)


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


def proc_stats(pid: int) -> tuple[float, int]:
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Load:
    """HTTP/1.1 workers and h2load bursts; every request recorded with its time and outcome."""

    def __init__(self, http: int, https: int, root: Path) -> None:
        self.http, self.https, self.root = http, https, root
        self.records: list[Record] = []
        self.h2: list[tuple[float, float, int, int]] = []  # start, end, ok, failed
        self.h2_ids: list[tuple[list[str], bool]] = []  # ids of a burst, all answered
        self.stop = threading.Event()
        self.outage = threading.Event()  # set while the upstream is down: slower clients
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(4):
            t = threading.Thread(target=self._h1, args=(i % 2 == 1, i), daemon=True)
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._h2load, daemon=True)
        t.start()
        self.threads.append(t)

    def _connection(self, tls: bool) -> http.client.HTTPConnection:
        if not tls:
            return http.client.HTTPConnection("127.0.0.1", self.http, timeout=15)
        ctx = ssl.create_default_context(cafile=str(self.root))
        ctx.check_hostname = False  # the name is checked below, via server_hostname (SNI)
        conn = http.client.HTTPSConnection("127.0.0.1", self.https, timeout=15, context=ctx)
        return conn

    def _h1(self, tls: bool, n: int) -> None:
        conn = None
        count = 0
        while not self.stop.is_set():
            if conn is None or count % 20 == 0:
                if conn is not None:
                    conn.close()
                conn = self._connection(tls)
            count += 1
            rid = f"{n}-{count}"
            if count % 3:
                path = f"/q/open-{rid}"
            elif count % 2:
                path = f"/f/click-{rid}"
            else:  # the same few links again and again: their redirects are learned
                path = f"/f/link-{n}-{count // 6 % LINKS}"
            start = time.monotonic()
            status = 0
            try:
                conn.request("GET", path, headers={"Host": DOMAIN, "User-Agent": UA + rid})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                ok = resp.status in (200, 302)
                what = f"{'https' if tls else 'http'} {resp.status}"
            except (OSError, http.client.HTTPException) as e:
                ok, what = False, f"{'https' if tls else 'http'} {type(e).__name__}"
                conn.close()
                conn = None
            with self.lock:
                self.records.append((start, time.monotonic(), ok, what, rid, status))
            time.sleep(OUTAGE_PAUSE if self.outage.is_set() else 0.01)

    def _h2load(self) -> None:
        """Bursts of two h2load processes (one connection each), every request its own path.

        (One h2load with ``-c 2`` would send each URI once per connection.)"""
        burst = 0
        while not self.stop.is_set():
            burst += 1
            per = 10 if self.outage.is_set() else 100
            start = time.monotonic()
            procs = []
            for c in range(2):
                ids = [f"h2-{burst}-{c * per + i}" for i in range(per)]
                cmd = [
                    "h2load",
                    "-n",
                    str(per),
                    "-c",
                    "1",
                    "-m",
                    "4",
                    "--connect-to",
                    f"127.0.0.1:{self.https}",
                    *(f"https://{DOMAIN}:{self.https}/q/{i}" for i in ids),
                ]
                procs.append((ids, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
            ok_all = failed_all = 0
            for ids, proc in procs:
                try:
                    out, _ = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
                ok = int(codes.group(1)) + int(codes.group(2)) if codes else 0
                ok_all += ok
                failed_all += len(ids) - ok
                with self.lock:
                    self.h2_ids.append((ids, ok == len(ids)))
            self.h2.append((start, time.monotonic(), ok_all, failed_all))
            self.stop.wait(1.0)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)


def start_standin(
    workdir: Path, children: run_demo.Children, record: Path, name: str, port: int = 0
) -> int:
    """The stand-in recording every request into ``record`` (certificates: ``run_demo``'s)."""
    proc = children.start(
        name,
        [
            sys.executable,
            str(REPO / "demo" / "standin.py"),
            "--cert",
            "standin-cert.pem",
            "--key",
            "standin-key.pem",
            "--port",
            str(port),
            "--record",
            str(record),
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    proc.stdout.close()
    if not line.startswith("listening on "):
        children.check()
        raise run_demo.DemoError(f"the stand-in did not start: {line!r}")
    return int(line.split()[-1])


def metrics(admin: int) -> dict[str, float]:
    """The admin /metrics as {series: value}, series as written (name and labels)."""
    url = f"http://127.0.0.1:{admin}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def metric(values: dict[str, float], name: str) -> float:
    """Sum of every series of ``name`` (all label values)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def recorded_ids(record: Path) -> Counter[str]:
    """How often the stand-in received each load id (the probes and others have none)."""
    ids: Counter[str] = Counter()
    if not record.exists():
        return ids
    for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
        _, path, agent = ([*line.split(" ", 2), "", ""])[:3]
        if agent.startswith(UA):
            ids[agent[len(UA) :]] += 1
        elif path.startswith("/q/h2-"):
            ids[path[3:]] += 1
    return ids


def probe_serial(https: int, root: Path) -> str | None:
    try:
        cert = run_demo.served_certificate(DOMAIN, https, root)
    except (OSError, ssl.SSLError):
        return None
    return f"{cert.serial_number:x}"


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    workdir = Path(tempfile.mkdtemp(prefix="trackingproxy-soak-"))
    children = run_demo.Children(workdir)
    run_demo.VALIDITY = VALIDITY
    results: dict[str, object] = {"seconds": seconds}
    checks: list[tuple[str, bool]] = []
    try:
        http_port, https_port, admin_port = run_demo.free_ports(3)
        pebble = run_demo.Pebble(workdir, http_port)
        pebble.start(children)
        root = workdir / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        # run_demo's stand-in makes the certificates; the soak's own one records requests
        standin_port, standin_ca = run_demo.start_standin(workdir, children)
        demo_standin = next(p for name, p, _ in children.procs if name == "standin")
        demo_standin.terminate()
        demo_standin.wait(10)
        children.procs = [c for c in children.procs if c[1] is not demo_standin]
        record = workdir / "standin-requests.log"
        standin_port = start_standin(workdir, children, record, "standin-recording")
        args = [
            "--nodaemon",
            "--pidfile=",
            "trackingproxy",
            "--domain",
            DOMAIN,
            "--acme-directory",
            pebble.directory_url,
            "--acme-max-orders-per-hour",
            "3600",
            "--acme-ca-bundle",
            pebble.api_ca.name,
            "--state-dir",
            "state",
            "--access-log",
            "off",
            "--upstream",
            f"https://127.0.0.1:{standin_port}",
            "--upstream-ca-bundle",
            standin_ca.name,
            "--upstream-timeout",
            "5",
            "--http-port",
            f"tcp:{http_port}:interface=127.0.0.1",
            "--https-port",
            f"tcp:{https_port}:interface=127.0.0.1",
            "--admin-port",
            f"tcp:{admin_port}:interface=127.0.0.1",
            "--shutdown-timeout",
            "10",
            "--outage-mode",
            "replay",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proxy = children.start("trackingproxy", [*run_demo.twistd_command(), *args], env=env)
        run_demo.wait_for(
            "the first certificate", lambda: probe_serial(https_port, root), 90, children
        )
        log(f"proxy pid {proxy.pid} serving; load for {seconds:.0f} s")
        load = Load(http_port, https_port, root)
        load.start()
        time.sleep(5)
        rss0, fds0 = proc_stats(proxy.pid)
        t0 = time.monotonic()
        outage_at = t0 + max(10.0, seconds / 2 - OUTAGE / 2)
        outage: list[float] = []
        serials: list[tuple[float, str]] = []
        standin_proc = next(p for name, p, _ in children.procs if name == "standin-recording")
        at_outage: dict[str, float] = {}
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            if not outage and now >= outage_at:
                log("upstream outage: stopping the stand-in")
                at_outage = metrics(admin_port)
                load.outage.set()
                standin_proc.terminate()
                standin_proc.wait(10)
                outage.append(time.monotonic())
            elif len(outage) == 1 and now >= outage[0] + OUTAGE:
                start_standin(workdir, children, record, "standin2", standin_port)
                outage.append(time.monotonic())
                load.outage.clear()
                log("upstream back")
            serial = probe_serial(https_port, root)
            if serial and (not serials or serials[-1][1] != serial):
                serials.append((now - t0, serial))
                log(f"new connections get serial {serial}")
            time.sleep(2)
        # the replay: wait until the journal is empty (the load goes on meanwhile)
        drain_deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            now_metrics = metrics(admin_port)
            waiting = metric(now_metrics, "trackingproxy_outage_journal_entries")
            if waiting == 0 or time.monotonic() > drain_deadline:
                break
            log(f"replay: {waiting:.0f} journal entries still waiting")
            time.sleep(2)
        drained_at = time.monotonic()
        log(f"journal {'drained' if waiting == 0 else 'NOT drained'}")
        rss1, fds1 = proc_stats(proxy.pid)
        final = metrics(admin_port)
        # SIGTERM under load: the h1 workers keep sending while the proxy drains.
        term_at = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        code = proxy.wait(30)
        stopped_at = time.monotonic()
        load.finish()
        # -- evaluate --
        grace = 3.0
        out_start, out_end = ([*outage, 0.0, 0.0])[:2]

        def in_outage(a: float, b: float) -> bool:
            return b >= out_start and a <= out_end + grace

        before_term = [r for r in load.records if r[0] < term_at]
        failed = [r for r in before_term if not r[2] and not in_outage(r[0], r[1])]
        # requests in flight at SIGTERM: started before it, ended after it
        in_flight = [r for r in load.records if r[0] < term_at <= r[1]]
        in_flight_failed = [r for r in in_flight if not r[2]]
        h2_before = [h for h in load.h2 if h[1] < term_at]
        h2_failed = sum(h[3] for h in h2_before if not in_outage(h[0], h[1]))
        outage_failed = sum(1 for r in before_term if not r[2] and in_outage(r[0], r[1]))
        # -- the outage's accounting: every id sent, what the stand-in received --
        received = recorded_ids(record)
        sent_h1 = load.records
        answered = {r[4] for r in sent_h1 if r[5]}
        sent_h2 = [i for ids, _ in load.h2_ids for i in ids]
        answered |= {i for ids, all_ok in load.h2_ids if all_ok for i in ids}
        sent_ids = {r[4] for r in sent_h1} | set(sent_h2)
        duplicates = sorted(i for i, n in received.items() if n > 1)
        lost = sorted(i for i in answered if i not in received)
        local = {
            kind: int(
                final.get(f'trackingproxy_outage_local_answers_total{{kind="{kind}"}}', 0.0)
                - at_outage.get(f'trackingproxy_outage_local_answers_total{{kind="{kind}"}}', 0.0)
            )
            for kind in ("open", "remembered_click", "unavailable")
        }
        in_window = Counter(r[5] for r in sent_h1 if r[5] and in_outage(r[0], r[1]))
        journaled = int(metric(final, "trackingproxy_outage_journaled_total"))
        replayed = int(metric(final, "trackingproxy_outage_replayed_total"))
        ambiguous = int(metric(final, "trackingproxy_engagement_ambiguous_total"))
        dropped = int(metric(final, "trackingproxy_outage_dropped_total"))
        repeats = int(metric(final, "trackingproxy_outage_repeats_total"))
        outage_figures = {
            "outage_sent_ids": len(sent_ids),
            "outage_sent_h1_h2": [len(sent_h1), len(sent_h2)],
            "outage_answered_ids": len(answered),
            "outage_no_answer_ids": len(sent_ids - answered),
            "outage_local_answers": local,
            "outage_h1_statuses_in_window": dict(sorted(in_window.items())),
            "outage_journaled": journaled,
            "outage_repeats": repeats,
            "outage_replayed": replayed,
            "outage_dropped": dropped,
            "outage_journal_left": int(waiting),
            "outage_drain_s": round(drained_at - out_end, 1) if out_end else None,
            "outage_recorded_ids": len(received),
            "outage_recorded_not_sent": len(set(received) - sent_ids),
            "outage_duplicates": len(duplicates),
            "outage_duplicate_ids": duplicates[:10],
            "outage_ambiguous": ambiguous,
            "outage_lost": len(lost),
            "outage_lost_ids": lost[:10],
        }
        results.update(
            requests_h1=len(before_term),
            requests_h2=sum(h[2] + h[3] for h in h2_before),
            failed_outside_outage_h1=len(failed),
            failed_outside_outage_h2=h2_failed,
            failed_during_outage=outage_failed,
            failures=sorted({r[3] for r in failed})[:10],
            outage_window_s=[round(out_start - t0, 1), round(out_end - t0, 1)],
            serials=[(round(t, 1), s) for t, s in serials],
            rss_mib=[round(rss0, 1), round(rss1, 1)],
            fds=[fds0, fds1],
            sigterm_in_flight=len(in_flight),
            sigterm_in_flight_failed=len(in_flight_failed),
            sigterm_exit_status=code,
            sigterm_drain_s=round(stopped_at - term_at, 2),
            **outage_figures,
        )
        expected_renewals = int(seconds // (VALIDITY / 2)) - 1
        checks += [
            ("no failed request outside the outage (h1)", not failed),
            ("no failed request outside the outage (h2)", h2_failed == 0),
            (
                f"at least {expected_renewals} renewals seen by new connections",
                len(serials) - 1 >= expected_renewals,
            ),
            ("RSS flat (end < start + 30 MiB)", rss1 < rss0 + 30),
            ("open fds flat (end <= start + 10)", fds1 <= fds0 + 10),
            ("SIGTERM: every request in flight completed", not in_flight_failed),
            ("SIGTERM: exit status 0", code == 0),
            ("outage: requests journaled", journaled > 0),
            ("outage: opens answered locally", local["open"] > 0),
            ("outage: learned clicks answered with their redirect", local["remembered_click"] > 0),
            ("outage: journal drained before SIGTERM", waiting == 0),
            ("outage: every journaled request re-sent or dropped", replayed + dropped == journaled),
            ("outage: no id recorded twice by the stand-in (duplicates 0)", not duplicates),
            ("outage: lost <= ambiguous + dropped", len(lost) <= ambiguous + dropped),
        ]
    except run_demo.DemoError as e:
        checks.append((f"set-up: {e}", False))
    finally:
        children.stop()
    # the long property run
    scale = max(2, int(seconds // 60))
    counts = workdir / "property-counts.jsonl"
    started = time.monotonic()
    prop = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "hostile" / "test_properties.py"),
            str(REPO / "tests" / "hostile" / "test_h2_frames.py"),
            str(REPO / "tests" / "hostile" / "test_differential.py"),
            str(REPO / "tests" / "hostile" / "test_hostile_upstream.py"),
        ],
        env={**os.environ, "TP_PROPERTY_SCALE": str(scale), "TP_PROPERTY_COUNTS": str(counts)},
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    examples: dict[str, int] = {}
    if counts.exists():
        for line in counts.read_text().splitlines():
            for k, v in json.loads(line).items():
                examples[k] = examples.get(k, 0) + v
    results.update(
        property_scale=scale,
        property_examples=examples,
        property_seconds=round(time.monotonic() - started, 1),
    )
    checks.append((f"property tests x{scale} pass", prop.returncode == 0))
    write_results(results, checks)
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(json.dumps(results, indent=1))
    return 0 if all(ok for _, ok in checks) else 1


def write_results(results: dict[str, object], checks: list[tuple[str, bool]]) -> None:
    lines = [
        f"# Soak results ({results['seconds']:.0f} s run)",
        "",
        f"Written by `make soak` (SOAK_SECONDS={results['seconds']:.0f}) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; pebble certificates live "
        f"{VALIDITY} s (renewed every ~{VALIDITY // 2} s), upstream stopped for {OUTAGE:.0f} s "
        "in the middle (`--outage-mode replay`; `outage_*`: every request id counted at the "
        "stand-in after the journal drained), SIGTERM under load at the end.",
        "",
        "| check | result |",
        "| --- | --- |",
        *(f"| {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in checks),
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in results.items() if k != "seconds"),
        "",
    ]
    (REPO / "soak" / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
