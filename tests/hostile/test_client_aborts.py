"""Clients that send a request and go away at once cost the upstream at most the connection
cap (issue 12, defect 5): requests not yet written are withdrawn, never sent later; a request
beyond the cap that waits too long gets 503; the proxy keeps serving."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.harness import DOMAIN, start_proxy, stop_proxy
from tests.hostile.wire import fetch, poll_until

CLIENTS = 60
CAP = 4


class ClientAborts(TestCase):
    timeout = 30

    def tmp(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path

    @inlineCallbacks
    def clients(self, port: int, prefix: str, close: bool):
        connected = []
        for i in range(CLIENTS):
            proto = Protocol()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
            proto.transport.write(f"GET /f/{prefix}{i} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            if close:
                proto.transport.loseConnection()
            connected.append(proto)
        return connected

    @inlineCallbacks
    def test_gone_clients_cost_at_most_the_cap(self):
        """60 clients each send a click to a slow upstream and close at once: at most 4
        requests and 4 connections reach the upstream (before: 60 and 60). 60 more that stay
        connected: exactly 4 are sent, the others wait; when those clients go, their requests
        are never sent. A normal request is served afterwards."""
        running = start_proxy(
            self.tmp(), "--upstream-max-connections", str(CAP), "--upstream-timeout", "5"
        )
        self.addCleanup(stop_proxy, running)
        standin = running.standin
        standin.holding = True
        yield self.clients(running.http_port, "gone", close=True)
        yield deferLater(reactor, 0.5, lambda: None)  # time for requests to arrive, if they could
        self.assertLessEqual(len(standin.held), CAP)
        self.assertLessEqual(standin.connections, CAP)
        standin.release()
        staying = yield self.clients(running.http_port, "stay", close=False)
        yield poll_until(lambda: len(standin.held) >= CAP, what="the first requests")
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(standin.held), CAP)
        for proto in staying:
            proto.transport.abortConnection()
        yield deferLater(reactor, 0.3, lambda: None)
        standin.holding = False
        standin.release()
        answer = yield fetch(running.http_port, "/q/after")
        self.assertEqual(answer.status, 200)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertLessEqual(standin.connections, CAP)
        sent = [s.uri for s in standin.seen]
        self.assertLessEqual(sum(b"/gone" in uri for uri in sent), CAP)
        self.assertEqual(sum(b"/stay" in uri for uri in sent), CAP)  # none sent late

    @inlineCallbacks
    def test_beyond_the_cap_a_waiting_request_gets_503(self):
        """With every allowed connection busy for longer than the wait, a request answers 503
        with Retry-After, and it is never sent upstream."""
        running = start_proxy(
            self.tmp(), "--upstream-max-connections", "1", "--upstream-timeout", "1"
        )
        self.addCleanup(stop_proxy, running)
        running.standin.holding = True
        first = fetch(running.http_port, "/f/held", wait=10)
        yield poll_until(lambda: len(running.standin.held) == 1, what="the held request")
        second = yield fetch(running.http_port, "/f/waits", wait=10)
        self.assertEqual((second.status, second.headers.get(b"retry-after")), (503, b"5"))
        running.standin.holding = False
        running.standin.release()
        yield first
        self.assertEqual([s.uri for s in running.standin.seen], [b"/f/held"])
