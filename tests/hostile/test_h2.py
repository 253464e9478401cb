"""HTTP/2 downgrade smuggling: hostile HTTP/2 requests (a raw ``h2`` client over TLS with ALPN
h2 on loopback) against the real proxy and the recording stand-in upstream.

Each hostile stream gets a clear error (RST_STREAM, a GOAWAY, or a 4xx), nothing it carries is
forwarded upstream (the stand-in records exactly the requests meant), and the proxy keeps
serving: a normal request afterwards, on a new connection, gets its pixel.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.harness import DOMAIN, DOMAIN2, start_proxy, stop_proxy
from tests.hostile.h2client import Request, StreamOutcome, exchange


def _base(
    method: str = "GET", path: str = "/q/h2", authority: str = DOMAIN
) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]


HOSTILE: dict[str, Request] = {
    "transfer-encoding": Request(
        [*_base("POST", "/f/te"), ("transfer-encoding", "chunked")],
        b"0\r\n\r\nGET /f/hidden HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n",
    ),
    "transfer-encoding-get": Request([*_base(path="/q/te"), ("transfer-encoding", "chunked")]),
    "connection": Request([*_base(path="/q/conn"), ("connection", "keep-alive")]),
    "connection-close": Request([*_base(path="/q/conn2"), ("connection", "close, x-a")]),
    "keep-alive": Request([*_base(path="/q/ka"), ("keep-alive", "timeout=5")]),
    "proxy-connection": Request([*_base(path="/q/pc"), ("proxy-connection", "keep-alive")]),
    "upgrade": Request([*_base(path="/q/up"), ("upgrade", "h2c")]),
    "te-gzip": Request([*_base(path="/q/tegz"), ("te", "gzip")]),
    "body-longer-than-content-length": Request(
        [*_base("POST", "/f/cl"), ("content-length", "5")],
        b"hello" + b"\r\n\r\nGET /f/hidden HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n",
    ),
    "body-shorter-than-content-length": Request(
        [*_base("POST", "/f/cl2"), ("content-length", "500")], b"short"
    ),
    "two-content-lengths": Request(
        [*_base("POST", "/f/cl3"), ("content-length", "5"), ("content-length", "50")], b"hello"
    ),
    "authority-other-host": Request(_base(path="/q/other", authority="evil.example")),
    "authority-userinfo": Request(_base(path="/q/ui", authority="user@" + DOMAIN)),
    "authority-ip": Request(_base(path="/q/ip", authority="127.0.0.1")),
    "authority-vs-host": Request([*_base(path="/q/avh"), ("host", "evil.example")]),
    "authority-other-domain-of-other-cert": Request(_base(path="/q/d2", authority=DOMAIN2)),
    "path-without-slash": Request(_base(path="f/noslash")),
    "path-absolute-form": Request(_base(path="http://evil.example/f/abs")),
    "path-asterisk": Request(_base("OPTIONS", "*")),
    "path-empty": Request(_base(path="")),
    "method-trace": Request(_base("TRACE", "/q/trace")),
    "crlf-in-value": Request([*_base(path="/q/crlf"), ("x-a", "b\r\nx-evil: 1")]),
    "nul-in-value": Request([*_base(path="/q/nul"), ("x-a", "b\x00c")]),
    "uppercase-name": Request([*_base(path="/q/upper"), ("X-Upper", "1")]),
    "pseudo-after-regular": Request(
        [
            (":method", "GET"),
            ("x-a", "1"),
            (":scheme", "https"),
            (":authority", DOMAIN),
            (":path", "/q/order"),
        ]
    ),
    "missing-path": Request([(":method", "GET"), (":scheme", "https"), (":authority", DOMAIN)]),
    "crlf-in-path": Request(_base(path="/q/a HTTP/1.1\r\nHost: evil.example\r\n\r\nGET /f/hidden")),
}
# The names under which anything hidden would show up at the upstream.
HIDDEN = (b"/f/hidden", b"hidden")
# Cases whose stream the proxy may legitimately forward (sanitised): the test then checks what
# the upstream got instead of requiring an error.
SANITISED_OK = {"authority-other-domain-of-other-cert"}


class HTTP2DowngradeTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        self.running = start_proxy(tmp)
        self.addCleanup(stop_proxy, self.running)
        self.ca_file = str(tmp / "client-ca.pem")
        self.running.ca.cert_pem.write_to_path(self.ca_file)

    def send(self, requests: list[Request], server_name: str = DOMAIN):
        return deferToThread(exchange, self.running.https_port, server_name, self.ca_file, requests)

    @inlineCallbacks
    def assert_still_serving(self):
        ok = Request(_base(path="/q/still-serving"))
        (outcome,) = yield self.send([ok])
        self.assertEqual(outcome.status, 200, outcome.describe())

    @inlineCallbacks
    def test_each_hostile_stream_is_refused_and_nothing_is_forwarded(self):
        """One connection per hostile request: each gets RST_STREAM, GOAWAY or a 4xx, the
        upstream never sees it (or anything hidden in it), and the proxy keeps serving."""
        report: dict[str, str] = {}
        standin = self.running.standin
        for name, request in HOSTILE.items():
            before = len(standin.seen)
            (outcome,) = yield self.send([request])
            got = standin.seen[before:]
            report[name] = outcome.describe()
            crashed = self.flushLoggedErrors()
            self.assertEqual(crashed, [], f"{name}: unhandled error in the proxy")
            for seen in standin.seen:
                self.assertFalse(any(h in seen.uri for h in HIDDEN), (name, seen.uri))
                for values in seen.headers.values():
                    for value in values:
                        self.assertNotRegex(value, rb"[\r\n\x00]", name)
            if name in SANITISED_OK:
                self.assertIn(outcome.status, (200, 421), name)
                continue
            self.assertEqual(got, [], f"{name}: forwarded {got!r} (client got {report[name]})")
            self.assertTrue(
                outcome.reset is not None
                or outcome.goaway is not None
                or (outcome.status is not None and 400 <= outcome.status < 500),
                f"{name}: {outcome.describe()}",
            )
        print(report)  # shown with -s: the answer each hostile stream got
        yield self.assert_still_serving()

    @inlineCallbacks
    def test_hostile_streams_next_to_good_ones(self):
        """Hostile streams multiplexed with good ones on one connection: the good ones are
        answered (unless the connection is torn down with GOAWAY), the hostile ones forwarded
        never; the upstream gets exactly the good requests, each once."""
        standin = self.running.standin
        good = [Request(_base(path=f"/q/good-{i}")) for i in range(3)]
        mixed = [
            good[0],
            Request([*_base(path="/q/h-te"), ("transfer-encoding", "chunked")]),
            good[1],
            Request(_base(path="/q/h-other", authority="evil.example")),
            Request([*_base("POST", "/f/h-cl"), ("content-length", "1")], b"toolong"),
            good[2],
        ]
        before = len(standin.seen)
        outcomes: list[StreamOutcome] = yield self.send(mixed)
        uris = sorted(s.uri for s in standin.seen[before:])
        answered = [f"/q/good-{i}".encode() for i, r in enumerate(good) if r.outcome.status]
        self.assertEqual([u for u in uris if not u.startswith(b"/q/good-")], [], outcomes)
        self.assertEqual(len(uris), len(set(uris)))
        for uri in answered:
            self.assertIn(uri, uris)
        for r in good:
            self.assertIn(r.outcome.status, (200, None), r.outcome.describe())
        yield self.assert_still_serving()

    @inlineCallbacks
    def test_connect_over_h2_is_refused_cleanly(self):
        """CONNECT over HTTP/2 (no :path) gets RST_STREAM, GOAWAY or a 4xx without an
        unhandled error in the proxy; nothing is forwarded and the proxy keeps serving."""
        standin = self.running.standin
        before = len(standin.seen)
        connect = Request([(":method", "CONNECT"), (":authority", "evil.example:443")])
        (outcome,) = yield self.send([connect])
        crashed = self.flushLoggedErrors()
        self.assertEqual(standin.seen[before:], [])
        yield self.assert_still_serving()
        self.assertTrue(
            outcome.reset is not None
            or (outcome.goaway is not None and outcome.goaway >= 0)
            or (outcome.status is not None and 400 <= outcome.status < 500),
            outcome.describe(),
        )
        self.assertEqual([f.type for f in crashed], [])
