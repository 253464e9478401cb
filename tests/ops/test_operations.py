"""Operations: graceful SIGTERM, SIGHUP reload, JSON logs (in-process and through real twistd)."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.certs import issue, make_ca, write_combined, write_pair
from tests.harness import (
    DOMAIN,
    DOMAIN2,
    STATUS,
    curl,
    plain_curl,
    start_proxy,
    stop_proxy,
)
from tests.standin import start_standin
from tests.twistd_process import Collect, spawn, wait_for_output
from trackingproxy.logs.jsonlines import JSONLinesObserver
from trackingproxy.ops.lifecycle import ActiveRequests

DOMAIN3 = "click3.example.com"


class _FakeRequest:
    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred()

    def notifyFinish(self) -> Deferred[None]:
        return self.finished


class ActiveRequestsTests(SynchronousTestCase):
    def test_idle_fires_when_the_last_request_finishes(self):
        """wait_idle fires True as soon as the last in-flight request finishes or fails."""
        clock = Clock()
        active = ActiveRequests(clock)
        one, two = _FakeRequest(), _FakeRequest()
        active.request_started(one)  # type: ignore[arg-type]
        active.request_started(two)  # type: ignore[arg-type]
        waiting = active.wait_idle(10)
        one.finished.callback(None)
        self.assertNoResult(waiting)
        two.finished.errback(ConnectionError("client gone"))
        self.assertIs(self.successResultOf(waiting), True)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout(self):
        """wait_idle gives up with False after the timeout."""
        clock = Clock()
        active = ActiveRequests(clock)
        active.request_started(_FakeRequest())  # type: ignore[arg-type]
        waiting = active.wait_idle(10)
        clock.advance(9.9)
        self.assertNoResult(waiting)
        clock.advance(0.2)
        self.assertIs(self.successResultOf(waiting), False)
        self.assertIs(self.successResultOf(ActiveRequests(clock).wait_idle(1)), True)


class JSONLogTests(SynchronousTestCase):
    def test_events_and_access_lines(self):
        """Every event is one JSON object per line; access events carry their own fields."""
        out = io.StringIO()
        observer = JSONLinesObserver(out)
        observer(
            {
                "log_format": "hello {who}",
                "who": "ops",
                "log_level": LogLevel.warn,
                "log_namespace": "x",
                "log_time": 0.5,
            }
        )
        observer(
            {
                "log_format": "{line}",
                "line": "...",
                "access": {"status": 200},
                "log_level": LogLevel.info,
                "log_time": 1.0,
            }
        )
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(first["message"], "hello ops")
        self.assertEqual(first["level"], "warn")
        self.assertEqual(first["time"], "1970-01-01T00:00:00.500Z")
        self.assertEqual(second, {"type": "access", "status": 200})


class ReloadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_reload_domains_certificates_and_files(self):
        """SIGHUP's reload adds a domain from --domains-file with its certificate from
        --certs-dir, serves new well-known files, and removes dropped domains; a bad file
        leaves everything as it was."""
        tmp = Path(self.mktemp()).resolve()
        (tmp / "certs").mkdir(parents=True)
        (tmp / "wk").mkdir()
        ca = make_ca()
        write_combined(issue(ca, DOMAIN, DOMAIN2), tmp / "certs" / "main.pem")
        domains_file = tmp / "domains.txt"
        domains_file.write_text("# extra domains\n")
        r = start_proxy(
            tmp,
            "--certs-dir",
            str(tmp / "certs"),
            "--domains-file",
            str(domains_file),
            "--well-known-dir",
            str(tmp / "wk"),
            ca=ca,
        )
        self.addCleanup(stop_proxy, r)

        def status(host: str, path: str = "/q/x") -> Deferred[tuple[bytes, bytes, int]]:
            return curl(
                r,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{host}:{r.http_port}{path}",
                "--resolve",
                f"{host}:{r.http_port}:127.0.0.1",
            )

        out, _, _ = yield status(DOMAIN3)
        self.assertEqual(out, b"421")
        domains_file.write_text(f"{DOMAIN3}\n")
        write_combined(issue(ca, DOMAIN3), tmp / "certs" / "three.pem")
        (tmp / "wk" / "assetlinks.json").write_text("[]")
        self.assertTrue(r.service.reloader.reload())
        out, _, _ = yield status(DOMAIN3)
        self.assertEqual(out, b"200")
        self.assertIsNotNone(r.service.sni.certificate_for(DOMAIN3))
        out, _, _ = yield status(DOMAIN, "/.well-known/assetlinks.json")
        self.assertEqual(out, b"200")
        self.assertEqual([s.uri for s in r.standin.seen], [b"/q/x"])

        (tmp / "certs" / "broken.pem").write_text("not a pem")
        domains_file.write_text("")
        self.assertFalse(r.service.reloader.reload())
        out, _, _ = yield status(DOMAIN3)
        self.assertEqual(out, b"200")

        (tmp / "certs" / "broken.pem").unlink()
        (tmp / "certs" / "three.pem").unlink()
        self.assertTrue(r.service.reloader.reload())
        out, _, _ = yield status(DOMAIN3)
        self.assertEqual(out, b"421")
        self.assertIsNone(r.service.sni.certificate_for(DOMAIN3))


class TwistdTests(TestCase):
    """The real `twistd trackingproxy` in a subprocess, driven by signals."""

    timeout = 90

    def wait_listening(self, proto: Collect, marker: bytes = b"--https-port listening") -> Any:
        return Deferred.fromCoroutine(wait_for_output(proto, marker, timeout=15))

    @inlineCallbacks
    def test_sigterm_lets_in_flight_requests_finish(self):
        """SIGTERM while a click is in flight: the click completes (200), then exit status 0."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        ca = make_ca()
        standin = start_standin(ca)
        self.addCleanup(standin.port.stopListening)
        proto, http_port, _ = spawn(self, tmp, ca, standin, "--no-acme")
        yield self.wait_listening(proto)
        pending = plain_curl(
            *STATUS, "-H", f"Host: {DOMAIN}", f"http://127.0.0.1:{http_port}/delay/q/1"
        )
        for _ in range(100):
            if standin.seen:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(standin.seen), 1)
        os.kill(proto.pid, signal.SIGTERM)
        out, err, code = yield pending
        self.assertEqual(out, b"200", err)
        exit_code = yield proto.ended
        self.assertEqual(exit_code, 0, proto.out)
        self.assertIn(b"waiting for 1 request(s) in flight", proto.out)

    @inlineCallbacks
    def test_sighup_reloads_and_json_logs(self):
        """SIGHUP adds the domains-file's new domain without a restart; with --log-format json
        every stdout line, access lines included, is a JSON object."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        ca = make_ca()
        standin = start_standin(ca)
        self.addCleanup(standin.port.stopListening)
        domains_file = tmp / "domains.txt"
        domains_file.write_text("")
        cert, key = write_pair(issue(ca, DOMAIN, DOMAIN2, DOMAIN3), tmp, "all")
        proto, http_port, _ = spawn(
            self,
            tmp,
            ca,
            standin,
            "--no-acme",
            "--domains-file",
            str(domains_file),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--log-format",
            "json",
        )
        yield self.wait_listening(proto, b'"--https-port listening')

        def get(host: str) -> Deferred[tuple[bytes, bytes, int]]:
            return plain_curl(*STATUS, "-H", f"Host: {host}", f"http://127.0.0.1:{http_port}/q/1")

        out, _, _ = yield get(DOMAIN3)
        self.assertEqual(out, b"421")
        domains_file.write_text(DOMAIN3 + "\n")
        os.kill(proto.pid, signal.SIGHUP)
        for _ in range(100):
            if b"Reloaded" in proto.out:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        out, _, _ = yield get(DOMAIN3)
        self.assertEqual(out, b"200")
        self.assertEqual(standin.seen[-1].headers[b"host"], [DOMAIN3.encode()])
        os.kill(proto.pid, signal.SIGTERM)
        self.assertEqual((yield proto.ended), 0, proto.out + proto.err)
        records = [json.loads(line) for line in proto.out.decode().splitlines() if line.strip()]
        access = [r for r in records if r.get("type") == "access"]
        self.assertEqual([a["status"] for a in access], [421, 200])
        self.assertTrue(any("Reloaded" in r.get("message", "") for r in records))
