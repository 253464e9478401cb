"""--workers and metrics: the workers' reports (wire format, pipe, pool, parent's sums) with
doubles, then a real ``twistd --workers 3`` whose /metrics and /status count every process."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from tests.admin.fakes import FakeRequest
from tests.certs import make_ca
from tests.harness import DOMAIN
from tests.ports import free_port
from tests.standin import start_standin
from tests.twistd_process import spawn, wait_for_output
from trackingproxy.admin import build_admin
from trackingproxy.admin.metrics import ProcessCounts, ProxyMetrics
from trackingproxy.admin.workers import MetricsReporter, WorkerMetrics, decode, encode
from trackingproxy.ops.supervisor import REPORT_FD, SharedListeners, WorkerPool
from trackingproxy.tls.sni import SNIContextMap
from trackingproxy.worker import _ReportPipe

A, B = "a.example.com", "b.example.com"


def counting(per_domain: str = "auto") -> ProxyMetrics:
    return ProxyMetrics(lambda: {A, B}, per_domain=per_domain, process_metrics=False)


def line(metrics: ProxyMetrics) -> bytes:
    """A worker's report as the pool hands it over (without the newline)."""
    return encode(metrics.counts()).rstrip(b"\n")


class FakeUpstream:
    def request(self, method: bytes, path: bytes, headers: Any, body: Any) -> Any:
        return succeed(object())

    def abandon(self, response: object) -> None:
        pass


# -- the report line --------------------------------------------------------------------------
class WireFormatTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A report carries every counter and gauge of a process and decodes to the same."""
        m = counting()
        m.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        m.site("http").request_done(FakeRequest(b"/f/1", 421, "-", b"HTTP/2"))
        m.site("https").connection_opened()
        m.instrument(FakeUpstream(), Clock()).request(b"GET", b"/q/1", Headers(), None)
        m.upstream_error("tls")
        m.local_in_flight = lambda: 4
        counts = m.counts()
        self.assertEqual(decode(encode(counts)), counts)
        self.assertEqual(counts.requests_total(), 2)

    def test_malformed_lines_are_refused(self) -> None:
        """Anything but a well-formed report is a ValueError saying what is wrong."""
        good = json.loads(encode(ProcessCounts()))
        bad = [
            b"not json",
            b"[]",
            json.dumps({**good, "requests": [["https", A, "nope", "2xx", "h1", 1]]}).encode(),
            json.dumps({**good, "in_flight": -1}).encode(),
            json.dumps({**good, "latency": [1, 2]}).encode(),
            json.dumps({**good, "upstream_errors": {"bogus": 1}}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "retired"}).encode(),
        ]
        for data in bad:
            self.assertRaises(ValueError, decode, data)


# -- the parent adds them up ------------------------------------------------------------------
class WorkerMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.parent = counting()
        self.workers = WorkerMetrics(self.clock, self.parent, 3, pid=100)
        self.w1, self.w2 = counting(), counting()

    def sample(self, name: str, **labels: str) -> float | None:
        return self.parent.registry.get_sample_value(name, labels)

    def test_every_series_adds_up_the_processes(self) -> None:
        """Every series adds the workers' last reports to the parent's counts, also per process."""
        self.parent.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        for _ in range(2):
            self.w1.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        self.w2.site("http").request_done(FakeRequest(b"/f/1", 302, B))
        self.w2.site("https").connection_opened()
        self.w2.upstream_latency.observe(0.3)
        self.w2.upstream_count += 1
        self.w2.upstream_error("timeout")
        self.workers.report(1, 201, line(self.w1))
        self.workers.report(2, 202, line(self.w2))

        labels = {"domain": A, "kind": "open", "status": "2xx", "protocol": "h1",
                  "scheme": "https"}
        self.assertEqual(self.sample("trackingproxy_requests_total", **labels), 3.0)
        self.assertEqual(self.parent.totals_by_kind(), {"open": 3, "click": 1, "other": 0})
        self.assertEqual(self.parent.totals_by_domain()[B]["click"], 1)
        self.assertEqual(self.parent.open_connections(), {"https": 1, "http": 0})
        self.assertEqual(self.sample("trackingproxy_upstream_requests_total"), 1.0)
        self.assertEqual(self.sample("trackingproxy_upstream_errors_total", cause="timeout"), 1.0)
        self.assertEqual(
            self.sample("trackingproxy_upstream_response_seconds_bucket", le="0.5"), 1.0
        )
        for process, count in (("main", 1.0), ("worker-1", 2.0), ("worker-2", 1.0)):
            self.assertEqual(
                self.sample("trackingproxy_process_requests_total", process=process), count
            )
            self.assertEqual(self.sample("trackingproxy_process_up", process=process), 1.0)
        self.assertEqual(
            self.sample("trackingproxy_process_open_connections", process="worker-2"), 1.0
        )

    def test_a_dead_worker_keeps_its_totals(self) -> None:
        """A dead worker's counters (not gauges) stay; its restart adds to them, never less."""
        for _ in range(5):
            self.w1.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        self.w1.site("https").connection_opened()
        self.workers.report(1, 201, line(self.w1))
        self.assertEqual(self.parent.totals_by_kind()["open"], 5)

        self.workers.worker_ended(1)
        self.assertEqual(self.parent.totals_by_kind()["open"], 5)
        self.assertEqual(self.parent.open_connections(), {})
        self.assertEqual(self.sample("trackingproxy_process_up", process="worker-1"), 0.0)
        self.assertEqual(
            self.sample("trackingproxy_process_requests_total", process="worker-1"), 5.0
        )

        restarted = counting()
        restarted.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        self.workers.report(1, 301, line(restarted))
        self.assertEqual(self.parent.totals_by_kind()["open"], 6)
        self.assertEqual(
            self.sample("trackingproxy_requests_total", domain=A, kind="open", status="2xx",
                        protocol="h1", scheme="https"),
            6.0,
        )
        self.assertEqual(
            self.sample("trackingproxy_process_requests_total", process="worker-1"), 6.0
        )
        rows = {row["process"]: row for row in self.workers.rows()}
        self.assertEqual(rows["worker-1"]["pid"], 301)
        self.assertEqual(rows["worker-2"], {
            "process": "worker-2", "pid": None, "up": False, "report_age_seconds": None,
            "requests": 0, "in_flight": 0, "connections": {},
        })

    def test_a_silent_worker_is_down(self) -> None:
        """A worker whose last report is older than 5 s counts as down; its numbers stay."""
        self.w1.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        self.workers.report(1, 201, line(self.w1))
        self.clock.advance(6)
        self.assertEqual(self.sample("trackingproxy_process_up", process="worker-1"), 0.0)
        self.assertEqual(self.parent.totals_by_kind()["open"], 1)
        self.assertEqual(self.workers.rows()[1]["report_age_seconds"], 6.0)

    def test_unreadable_reports_are_ignored_and_logged_once(self) -> None:
        """A garbled report changes nothing and is logged once per worker process."""
        self.w1.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        self.workers.report(1, 201, line(self.w1))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.workers.report(1, 201, b'{"requests": [')
        self.workers.report(1, 201, b"{}")
        self.assertEqual(self.parent.totals_by_kind()["open"], 1)
        warned = [e for e in events if e.get("log_namespace") == "trackingproxy.admin.workers"]
        self.assertEqual(len(warned), 1)

    def test_per_domain_off_drops_the_label_and_a_late_worker_is_not_mixed_in(self) -> None:
        """Off: summed without the domain; a worker not yet switched on adds no domain="*"."""
        parent = counting("off")
        workers = WorkerMetrics(self.clock, parent, 2)
        worker = counting("off")
        worker.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        workers.report(1, 201, line(worker))
        self.assertEqual(
            parent.registry.get_sample_value("trackingproxy_requests_total", {
                "kind": "open", "status": "2xx", "protocol": "h1", "scheme": "https"}),
            1.0,
        )
        parent.per_domain_mode = "on"
        domains = {s.labels.get("domain") for m in parent.registry.collect()
                   if m.name == "trackingproxy_requests" for s in m.samples}
        self.assertEqual(domains, set())
        self.assertEqual(parent.totals_by_kind()["open"], 1)

    def test_status_counts_every_process(self) -> None:
        """/status sums requests in flight and connections, and lists every process."""
        admin = build_admin("tcp:0:interface=127.0.0.1", self.clock, lambda: {A, B})
        assert admin is not None
        workers = admin.add_workers(3, pid=100)
        root = MultiService()
        root.active = type("Active", (), {"count": 2})()  # type: ignore[attr-defined]
        admin.service(root, SNIContextMap([A, B]), False, None)
        self.w1.local_in_flight = lambda: 5
        self.w1.site("http").connection_opened()
        workers.report(1, 201, line(self.w1))
        snap = admin.source.snapshot()
        self.assertEqual(snap["requests"]["in_flight"], 7)
        self.assertEqual(snap["connections"], {"http": 1})
        self.assertEqual(
            [(r["process"], r["pid"], r["up"], r["in_flight"]) for r in snap["processes"]],
            [("main", 100, True, 2), ("worker-1", 201, True, 5), ("worker-2", None, False, 0)],
        )
        self.assertEqual(
            admin.metrics.registry.get_sample_value("trackingproxy_requests_in_flight"), 7.0
        )


# -- a worker sends them ----------------------------------------------------------------------
class ReporterTests(SynchronousTestCase):
    def test_reports_at_start_every_second_and_at_stop(self) -> None:
        """A worker reports its totals at start, every second, and once more when stopped."""
        clock = Clock()
        metrics = counting()
        sent: list[bytes] = []
        reporter = MetricsReporter(clock, metrics, sent.append)
        reporter.startService()
        self.assertEqual(len(sent), 1)
        metrics.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        clock.advance(1)
        self.assertEqual(len(sent), 2)
        self.assertEqual(decode(sent[-1]).requests_total(), 1)
        metrics.site("https").request_done(FakeRequest(b"/q/1", 200, A))
        reporter.stopService()
        self.assertEqual(decode(sent[-1]).requests_total(), 2)
        clock.advance(5)
        self.assertEqual(len(sent), 3)


class _Writers:
    def __init__(self) -> None:
        self.writers: list[object] = []

    def addWriter(self, writer: object) -> None:
        self.writers.append(writer)

    def removeWriter(self, writer: object) -> None:
        self.writers.remove(writer)


class ReportPipeTests(SynchronousTestCase):
    def test_full_pipe_keeps_only_the_latest_report(self) -> None:
        """A full pipe never blocks: only the newest waiting report is kept, and sent whole."""
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        writers = _Writers()
        pipe = _ReportPipe(writers, w)
        big = b"x" * 300_000 + b"\n"
        pipe.send(big)
        self.assertEqual(writers.writers, [pipe])
        pipe.send(b"second\n")
        pipe.send(b"third\n")
        received = b""
        os.set_blocking(r, False)
        while writers.writers:
            received += os.read(r, 65536)
            pipe.doWrite()
        while True:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                break
            received += chunk
        self.assertEqual(received, big + b"third\n")
        os.close(r)
        pipe.send(b"no reader\n")  # EPIPE: the parent is gone; quietly nothing more
        pipe.send(b"still none\n")
        self.assertEqual(writers.writers, [])


# -- the pool passes them on ------------------------------------------------------------------
class _Transport:
    pid = 4242

    def __init__(self) -> None:
        self.written: list[tuple[int, bytes]] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))


class _Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, dict[int, Any]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any, path: Any,
                     childFDs: dict[int, Any]) -> None:
        self.spawned.append((proto, childFDs))
        proto.makeConnection(_Transport())


class _Reports:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def report(self, index: int, pid: int | None, line: bytes) -> None:
        self.events.append(("report", index, pid, line))

    def worker_ended(self, index: int) -> None:
        self.events.append(("ended", index))


class PoolTests(SynchronousTestCase):
    def test_report_lines_reach_the_reports(self) -> None:
        """A worker gets fd 4 for reports; lines split across reads arrive whole, then its end."""
        clock = _Reactor()
        reports = _Reports()
        pool = WorkerPool(clock, SharedListeners(clock, 2), {}, 1.0, argv=("python",),
                          reports=reports)
        pool.startService()
        proto, fds = clock.spawned[0]
        self.assertEqual(fds[REPORT_FD], "r")
        spec = json.loads(proto.transport.written[0][1])
        self.assertEqual(spec["report_fd"], REPORT_FD)
        proto.childDataReceived(REPORT_FD, b'{"a":1}\n{"b"')
        proto.childDataReceived(1, b"ignored\n")
        proto.childDataReceived(REPORT_FD, b":2}\n")
        proto.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(reports.events, [
            ("report", 1, 4242, b'{"a":1}'), ("report", 1, 4242, b'{"b":2}'), ("ended", 1),
        ])
        pool.stopService()

    def test_no_admin_no_pipe(self) -> None:
        """Without an admin listener no worker gets a report pipe."""
        clock = _Reactor()
        pool = WorkerPool(clock, SharedListeners(clock, 2), {}, 1.0, argv=("python",))
        pool.startService()
        proto, fds = clock.spawned[0]
        self.assertNotIn(REPORT_FD, fds)
        self.assertIsNone(json.loads(proto.transport.written[0][1])["report_fd"])
        proto.processEnded(Failure(ProcessTerminated(exitCode=0)))
        pool.stopService()


# -- for real ---------------------------------------------------------------------------------
def _get_many(port: int, count: int) -> list[int]:
    """``count`` GET /q/1 requests, each on a new connection. Blocking: run in a thread."""
    codes = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/q/1", headers={"Host": DOMAIN, "Connection": "close"})
        response = conn.getresponse()
        response.read()
        codes.append(response.status)
        conn.close()
    return codes


def _admin(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    body = conn.getresponse().read().decode()
    conn.close()
    return body


def _scrape(port: int) -> tuple[float, dict[str, float]]:
    """(sum of trackingproxy_requests_total, process -> trackingproxy_process_requests_total)."""
    total, per_process = 0.0, dict[str, float]()
    for family in text_string_to_metric_families(_admin(port, "/metrics")):
        for s in family.samples:
            if s.name == "trackingproxy_requests_total":
                total += s.value
            elif s.name == "trackingproxy_process_requests_total":
                per_process[s.labels["process"]] = s.value
    return total, per_process


class ThreeProcessesTests(TestCase):
    """``twistd trackingproxy --workers 3`` for real."""

    timeout = 90

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).resolve()
        self.tmp.mkdir(parents=True)
        self.ca = make_ca()
        self.standin = start_standin(self.ca)
        self.addCleanup(self.standin.port.stopListening)

    async def wait_total(self, admin: int, expected: float, within: float) -> dict[str, float]:
        started = time.monotonic()
        total = -1.0
        while time.monotonic() - started < within:
            total, per_process = await deferToThread(_scrape, admin)
            if total == expected:
                return per_process
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"requests_total is {total}, not {expected}, after {within} s")

    async def test_metrics_count_every_process(self) -> None:
        """60 requests spread over 3 processes are all counted within 3 s; a kill loses none."""
        admin = free_port()
        proto, http_port, _ = spawn(
            self, self.tmp, self.ca, self.standin,
            "--admin-port", f"tcp:{admin}:interface=127.0.0.1", "--workers", "3",
        )
        await wait_for_output(proto, b") running", count=2, timeout=30)  # both workers
        codes = await deferToThread(_get_many, http_port, 60)
        self.assertEqual(codes, [200] * 60)
        per_process = await self.wait_total(admin, 60.0, within=3.0)
        self.assertEqual(set(per_process), {"main", "worker-1", "worker-2"})
        self.assertEqual(sum(per_process.values()), 60.0)
        self.assertGreater(sum(1 for n in per_process.values() if n > 0), 1, per_process)

        status = json.loads(await deferToThread(_admin, admin, "/status"))
        self.assertEqual(sum(status["requests"]["total"].values()), 60)
        rows = {row["process"]: row for row in status["processes"]}
        self.assertTrue(all(row["up"] for row in rows.values()), rows)
        self.assertEqual(rows["main"]["pid"], proto.pid)

        victim = rows["worker-1"]["pid"]
        os.kill(victim, signal.SIGKILL)
        await wait_for_output(proto, b"worker 1 started (pid", count=2, timeout=30)
        await wait_for_output(proto, b") running", count=3, timeout=30)
        total, after = await deferToThread(_scrape, admin)
        self.assertEqual(total, 60.0)
        self.assertEqual(after["worker-1"], per_process["worker-1"])

        codes = await deferToThread(_get_many, http_port, 30)
        self.assertEqual(codes, [200] * 30)
        await self.wait_total(admin, 90.0, within=3.0)
        status = json.loads(await deferToThread(_admin, admin, "/status"))
        restarted = {row["process"]: row for row in status["processes"]}["worker-1"]
        self.assertNotEqual(restarted["pid"], victim)
        self.assertGreaterEqual(restarted["requests"], per_process["worker-1"])

        proto.transport.signalProcess("TERM")  # type: ignore[union-attr]
        self.assertEqual(await proto.ended, 0, proto.out.decode())
        output = proto.out + proto.err
        self.assertNotIn(b"Traceback", output, output.decode())
        self.assertIsNone(re.search(rb"unreadable metrics report", output))
