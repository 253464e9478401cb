"""SIGTERM under load: the real ``twistd trackingproxy`` with 300 requests in flight.

The stand-in upstream holds every open and click until the test releases it, so all requests
are surely in flight at the proxy when SIGTERM arrives: 100 plain HTTP/1.1, 100 HTTPS HTTP/1.1
(one keep-alive connection each) and 100 HTTP/2 streams (4 connections of 25 streams), half opens
(``/q/``: the 44-byte GIF), half clicks (``/f/``: 302). Documented behaviour (service.py,
lifecycle.py): the listeners close first (new connections are refused), the requests in flight
get up to ``--shutdown-timeout`` to finish, then the upstream pool is closed and the process
exits with status 0.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.certs import make_ca
from tests.harness import DOMAIN
from tests.hostile.loadclients import Answer, run_clients
from tests.standin import GIF, StandIn, start_standin
from tests.twistd_process import Collect, spawn, wait_for_output

PLAIN, TLS, H2_CONNECTIONS, H2_STREAMS = 100, 100, 4, 25
TOTAL = PLAIN + TLS + H2_CONNECTIONS * H2_STREAMS  # 300
CLICK_BODY = b"<a href='https://www.example.com/landing?utm=1'>moved</a>"
LANDING = b"https://www.example.com/landing?utm=1"


def _paths(kind: str, count: int, offset: int = 0) -> list[str]:
    """Alternating opens and clicks, each path unique (so every answer can be matched)."""
    return [
        f"/{'q' if (offset + i) % 2 == 0 else 'f'}/sigterm-{kind}-{offset + i}"
        for i in range(count)
    ]


def _problems(answers: list[Answer]) -> list[str]:
    """Every answer that is not the complete, correct answer for its path."""
    bad = []
    for a in answers:
        if a.path.startswith("/q/"):
            ok = a.status == 200 and a.body == GIF
        else:
            ok = a.status == 302 and a.body == CLICK_BODY and a.headers.get(b"location") == LANDING
        if not (ok and a.complete):
            bad.append(a.describe())
    return bad


class SigtermUnderLoadTests(TestCase):
    timeout = 180

    async def _start(self, *extra: str) -> tuple[Collect, StandIn, int, int]:
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        ca = make_ca()
        standin = start_standin(ca)
        standin.holding = True
        self.addCleanup(standin.port.stopListening)  # type: ignore[union-attr]
        self.ca_pem = ca.cert_pem.bytes()
        proto, http_port, https_port = spawn(self, tmp, ca, standin, "--log-format", "json", *extra)
        await wait_for_output(proto, b"--https-port listening", timeout=60)
        return proto, standin, http_port, https_port

    async def _load(
        self, standin: StandIn, ports: tuple[int, int], plain: int, tls: int, h2: tuple[int, int]
    ) -> tuple[Deferred[list[Answer]], list[Any]]:
        """Start ``plain`` + ``tls`` HTTP/1.1 requests and ``h2`` = (connections, streams)
        HTTP/2 ones; return once the stand-in holds every request (all in flight)."""
        started: list[Any] = []
        h2_connections, h2_streams = h2
        batches = [_paths(f"h2c{c}", h2_streams) for c in range(h2_connections)]
        coroutine = run_clients(
            reactor, self.ca_pem, DOMAIN, ports, _paths("http", plain), _paths("https", tls),
            batches, started,
        )  # fmt: skip
        clients = Deferred.fromCoroutine(coroutine)
        total = plain + tls + h2_connections * h2_streams
        for _ in range(1200):  # up to 60 s on a loaded machine
            if len(standin.held) >= total or clients.called:
                break
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
        self.assertFalse(clients.called, "a client ended before SIGTERM")
        self.assertEqual(len(standin.held), total)
        self.assertEqual(len(standin.seen), total)
        return clients, started

    async def _refused(self, port: int) -> None:
        """A new connection to ``port`` is refused (the listener is closed)."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
        try:
            connected = await endpoint.connect(Factory.forProtocol(Protocol))
        except ConnectionRefusedError:
            return
        connected.transport.abortConnection()
        self.fail(f"port {port} accepted a new connection after SIGTERM")

    def _no_traceback(self, proto: Collect) -> list[dict[str, Any]]:
        """stdout as JSON records; nothing printed is a traceback or an unhandled error."""
        text = (proto.out + proto.err).decode()
        self.assertNotIn("Traceback", text)
        self.assertNotIn("Unhandled", text)
        self.assertEqual(proto.err, b"")
        return [json.loads(line) for line in proto.out.decode().splitlines() if line.strip()]

    async def test_every_request_in_flight_completes(self) -> None:
        """300 requests in flight at SIGTERM (HTTP/1.1, HTTPS, HTTP/2): the listeners close at
        once (new connections refused), every request gets its complete, correct answer, every
        connection is closed only after its answers (an HTTP/2 GOAWAY, if any, is NO_ERROR and
        refuses none of our streams), the upstream saw each request exactly once, the access log
        has all 300, and the process exits 0 well within --shutdown-timeout, without a
        traceback."""
        proto, standin, http_port, https_port = await self._start("--shutdown-timeout", "120")
        clients, started = await self._load(
            standin, (http_port, https_port), PLAIN, TLS, (H2_CONNECTIONS, H2_STREAMS)
        )
        os.kill(proto.pid, signal.SIGTERM)
        await wait_for_output(proto, b"waiting for %d request(s) in flight" % TOTAL)
        await self._refused(http_port)
        await self._refused(https_port)
        # The slow upstream now answers, in ten batches.
        while standin.held:
            standin.release(TOTAL // 10)
            await deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]
        answers = await clients
        self.assertEqual(await proto.ended, 0, (proto.out + proto.err).decode())
        await DeferredList([p.lost for p in started])

        self.assertEqual(len(answers), TOTAL)
        bad = _problems(answers)
        self.assertEqual(
            bad, [], f"{len(bad)} of {TOTAL} requests lost or wrong:\n" + "\n".join(bad)
        )
        for p in started:
            kind = p.answers[0].kind
            self.assertEqual(p.end.open_at_close, 0, kind)
            if kind in ("http", "https"):  # HTTP/2: test_http2_connections_close_politely
                self.assertTrue(p.end.clean, f"{kind} connection reset at shutdown")
            if kind == "https":
                self.assertEqual(p.end.alpn, b"http/1.1")
            if kind == "h2":
                self.assertEqual(p.end.alpn, b"h2")
                if p.end.goaway is not None:
                    self.assertEqual(p.end.goaway, 0)
                    self.assertGreaterEqual(p.end.goaway_last_stream, 2 * H2_STREAMS - 1)
        self.assertEqual(
            sorted(s.uri.decode() for s in standin.seen), sorted(a.path for a in answers)
        )

        records = self._no_traceback(proto)
        access = {r["target"]: r["status"] for r in records if r.get("type") == "access"}
        self.assertEqual(
            access, {a.path: 200 if a.path.startswith("/q/") else 302 for a in answers}
        )
        messages = [r.get("message", "") for r in records]
        self.assertFalse([m for m in messages if "Shutdown timeout reached" in m])

    async def test_http2_connections_close_politely(self) -> None:
        """HTTP/2 connections with streams in flight at SIGTERM are closed like HTTP/1.1 ones
        once their streams are answered: a GOAWAY (NO_ERROR, refusing none of their streams)
        if any, then a clean close (TLS close_notify, FIN), not a reset after the close grace;
        so the process exits as soon as the last answer is sent."""
        proto, standin, http_port, https_port = await self._start("--shutdown-timeout", "120")
        clients, started = await self._load(standin, (http_port, https_port), 0, 0, (3, 10))
        os.kill(proto.pid, signal.SIGTERM)
        await wait_for_output(proto, b"waiting for 30 request(s) in flight")
        standin.release()
        answers = await clients
        self.assertEqual(await proto.ended, 0, (proto.out + proto.err).decode())
        await DeferredList([p.lost for p in started])

        self.assertEqual(_problems(answers), [])
        ends = [(p.end.alpn, p.end.goaway in (None, 0), p.end.clean) for p in started]
        self.assertEqual(ends, [(b"h2", True, True)] * 3)
        messages = [r.get("message", "") for r in self._no_traceback(proto)]
        self.assertFalse([m for m in messages if "aborting them" in m])

    async def test_drain_timeout_shorter_than_the_upstream(self) -> None:
        """--shutdown-timeout 1 with an upstream that has not answered after it: the proxy logs
        how many requests were still in flight, closes the upstream connections, and every
        such request gets a complete 502 (HTTP/1.1 and HTTP/2 alike) before its connection
        closes; exit status 0, no traceback."""
        proto, standin, http_port, https_port = await self._start("--shutdown-timeout", "1")
        clients, started = await self._load(standin, (http_port, https_port), 20, 20, (2, 10))
        total = 60
        os.kill(proto.pid, signal.SIGTERM)
        answers = await clients
        self.assertEqual(await proto.ended, 0, (proto.out + proto.err).decode())
        await DeferredList([p.lost for p in started])

        outcome = Counter(
            (a.kind, a.status, a.complete, a.body == b"502 Bad Gateway\n") for a in answers
        )
        expected = {(kind, 502, True, True): 20 for kind in ("http", "https", "h2")}
        self.assertEqual(outcome, expected, "\n".join(a.describe() for a in answers))
        records = self._no_traceback(proto)
        messages = [r.get("message", "") for r in records]
        self.assertIn(f"Shutdown timeout reached with {total} request(s) still in flight", messages)
        self.assertEqual(standin.release(), 0)  # nothing was left to answer: all connections gone
