"""The upstream client against real loopback servers (the recording stand-in, over TLS)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from tests.upstream_standin import (
    StaticDNS,
    UpstreamStandIn,
    big_body,
    close_after,
    echo,
    read_body,
    reset,
    stall,
    wait_until,
)
from trackingproxy.upstream.client import UpstreamClient
from trackingproxy.upstream.dns import CachingResolver
from trackingproxy.upstream.errors import (
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamTLSFailed,
)
from trackingproxy.upstream.pool import ConnectionPool, EndpointConnector, make_trust_root
from trackingproxy.upstream.target import UpstreamTarget

HOST = "upstream.test"


def headers(host: bytes = b"click.example.com", **extra: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"host", host), *((name.replace("_", "-").encode(), v) for name, v in extra.items())]


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class UpstreamIntegration(TestCase):
    timeout = 20

    def standin(self, **kwargs: Any) -> UpstreamStandIn:
        standin = UpstreamStandIn(**kwargs).start()
        self.addCleanup(standin.stop)
        return standin

    def client(
        self,
        port: int,
        *,
        ca_pem: bytes | None = None,
        scheme: str = "https",
        host: str = HOST,
        clock: Any = reactor,
        response_timeout: float = 5.0,
        addresses: list[str] | None = None,
        **pool_kwargs: Any,
    ) -> tuple[UpstreamClient, ConnectionPool]:
        target = UpstreamTarget(scheme, host, port)
        resolver = CachingResolver(StaticDNS({HOST: addresses or ["127.0.0.1"]}), reactor)
        bundle = None
        if ca_pem is not None:
            directory = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, directory)
            bundle = os.path.join(directory, "ca.pem")
            with open(bundle, "wb") as f:
                f.write(ca_pem)
        connector = EndpointConnector(reactor, target, make_trust_root(bundle))
        pool = ConnectionPool(clock, target, resolver, connector, **pool_kwargs)
        client = UpstreamClient(pool, reactor, response_timeout=response_timeout)
        self.addCleanup(client.close)
        return client, pool

    def trusted_client(
        self, standin: UpstreamStandIn, **kwargs: Any
    ) -> tuple[UpstreamClient, ConnectionPool]:
        return self.client(standin.port, ca_pem=standin.ca_pem, **kwargs)

    async def get(self, client: UpstreamClient, path: bytes = b"/") -> tuple[IResponse, bytes]:
        response = await client.request(b"GET", path, headers(), None)
        return response, await read_body(response)

    async def failure_of(self, d: Deferred[IResponse]) -> UpstreamError:
        try:
            await d
        except UpstreamError as e:
            return e
        raise AssertionError("the request succeeded")

    async def test_request_and_response_pass_through(self) -> None:
        """Method, exact path+query bytes, Host and headers reach the upstream; the answer returns."""
        standin = self.standin()
        client, _ = self.trusted_client(standin)
        path = b"/q/AbC_-.~%2F%3f/x?q=%41%zz&x=&&y=1;2&u=%E2%82%AC"
        response = await client.request(
            b"GET", path, headers(b"Click.Example.com:443", x_custom=b"a  b"), None
        )
        body = await read_body(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-standin"), [b"echo"])
        self.assertEqual(body, b"seen GET " + path)
        [seen] = standin.requests
        self.assertEqual((seen.method, seen.uri), (b"GET", path))
        self.assertEqual(seen.header(b"host"), [b"Click.Example.com:443"])
        self.assertEqual(seen.header(b"x-custom"), [b"a  b"])
        self.assertEqual(seen.header(b"connection"), [])

    async def test_post_body_is_sent_with_its_length(self) -> None:
        """A POST body reaches the upstream intact, framed by Content-Length."""
        standin = self.standin()
        client, _ = self.trusted_client(standin)
        response = await client.request(b"POST", b"/f/x", headers(), b"a=1&b=\x00\xff")
        await read_body(response)
        [seen] = standin.requests
        self.assertEqual(seen.body, b"a=1&b=\x00\xff")
        self.assertEqual(seen.header(b"content-length"), [b"8"])

    async def test_sequential_requests_share_one_connection(self) -> None:
        """Twenty sequential requests all travel on one kept-alive upstream connection."""
        standin = self.standin()
        client, pool = self.trusted_client(standin)
        for i in range(20):
            response, body = await self.get(client, b"/n/%d" % i)
            self.assertEqual(body, b"seen GET /n/%d" % i)
        self.assertEqual({r.connection for r in standin.requests}, {1})
        self.assertEqual(standin.connections_opened, 1)
        self.assertEqual(pool.open_count, 1)

    async def test_concurrent_requests_then_reuse(self) -> None:
        """Concurrent requests each get a connection; afterwards those connections are reused."""
        standin = self.standin()
        client, pool = self.trusted_client(standin)
        paths = [b"/c/%d" % i for i in range(12)]
        bodies = await gatherResults([self.body_of(client, p) for p in paths])
        self.assertEqual(bodies, [b"seen GET " + p for p in paths])
        opened = standin.connections_opened
        self.assertEqual(pool.idle_count, opened)
        await gatherResults([self.body_of(client, p) for p in paths[:opened]])
        self.assertEqual(standin.connections_opened, opened)
        self.assertEqual(sorted(standin.uris()), sorted(paths + paths[:opened]))

    def body_of(self, client: UpstreamClient, path: bytes) -> Deferred[bytes]:
        return Deferred.fromCoroutine(self.get(client, path)).addCallback(lambda r: r[1])

    async def test_system_store_and_bundle_are_both_trusted(self) -> None:
        """With a CA bundle, CAs from the system store (here via SSL_CERT_FILE) still verify."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        standin = self.standin()
        system_file = standin.write_ca(os.path.join(directory, "system.pem"))
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = system_file
        self.addCleanup(_restore_env, "SSL_CERT_FILE", old)
        other = UpstreamStandIn()  # never started: only its CA goes into the bundle
        client, _ = self.client(standin.port, ca_pem=other.ca_pem)
        _, body = await self.get(client, b"/both")
        self.assertEqual(body, b"seen GET /both")

    async def test_connection_older_than_max_age_is_replaced(self) -> None:
        """A connection is reused until max_age, then a new one is opened."""
        standin = self.standin()
        clock = Clock()
        client, _ = self.trusted_client(standin, clock=clock, idle_timeout=1000.0, max_age=120.0)
        await self.get(client)
        clock.advance(119)
        await self.get(client)
        clock.advance(2)
        await self.get(client)
        self.assertEqual([r.connection for r in standin.requests], [1, 1, 2])
        await standin.when(lambda: standin.open_connections == 1)

    async def test_http_upstream_on_an_ip_literal(self) -> None:
        """A plain http:// upstream given as an IP address works without DNS."""
        standin = self.standin(tls=False)
        client, _ = self.client(standin.port, scheme="http", host="127.0.0.1")
        _, body = await self.get(client, b"/plain")
        self.assertEqual(body, b"seen GET /plain")

    async def test_ipv6_upstream(self) -> None:
        """An upstream name resolving to an IPv6 address is reached over TCP6 with verified TLS."""
        standin = self.standin(interface="::1")
        client, _ = self.trusted_client(standin, addresses=["::1"])
        _, body = await self.get(client, b"/six")
        self.assertEqual(body, b"seen GET /six")

    async def test_connection_refused_is_a_connect_error(self) -> None:
        """Nothing listening on the port: the request fails with cause 'connect'."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await maybeDeferred(port.stopListening)
        client, _ = self.client(number)
        error = await self.failure_of(client.request(b"GET", b"/", headers(), None))
        self.assertIsInstance(error, UpstreamConnectFailed)
        self.assertEqual((error.cause, error.status), ("connect", 502))

    async def test_certificate_for_another_name_is_a_tls_error(self) -> None:
        """A certificate not valid for the upstream name fails with 'tls'; nothing is sent."""
        standin = self.standin(names=("other.test",))
        client, _ = self.trusted_client(standin)
        error = await self.failure_of(client.request(b"GET", b"/", headers(), None))
        self.assertIsInstance(error, UpstreamTLSFailed)
        self.assertEqual(error.cause, "tls")
        self.assertIn("not valid for upstream.test", str(error))
        self.assertEqual(standin.requests, [])

    async def test_untrusted_certificate_is_a_tls_error(self) -> None:
        """A certificate from a CA that is not trusted fails with 'tls'; nothing is sent."""
        standin = self.standin()
        client, _ = self.client(standin.port)  # the system store only
        error = await self.failure_of(client.request(b"GET", b"/", headers(), None))
        self.assertEqual(error.cause, "tls")
        self.assertEqual(standin.requests, [])

    async def test_slow_upstream_times_out_after_one_request(self) -> None:
        """No response headers in time: UpstreamTimeout (504), the connection is aborted, no retry."""
        standin = self.standin(behaviour=stall)
        client, pool = self.trusted_client(standin, response_timeout=0.3)
        error = await self.failure_of(client.request(b"GET", b"/slow", headers(), None))
        self.assertIsInstance(error, UpstreamTimeout)
        self.assertEqual((error.cause, error.status), ("timeout", 504))
        await standin.when(lambda: standin.open_connections == 0)
        self.assertEqual(standin.uris(), [b"/slow"])
        self.assertEqual(pool.open_count, 0)

    async def test_reset_after_complete_request_is_not_retried(self) -> None:
        """A reused connection reset after the request was written fails with 'reset', once."""
        standin = self.standin()
        client, _ = self.trusted_client(standin)
        await self.get(client, b"/first")
        standin.behaviour = reset
        error = await self.failure_of(client.request(b"GET", b"/click", headers(), None))
        self.assertIsInstance(error, UpstreamReset)
        self.assertEqual(error.cause, "reset")
        self.assertEqual(standin.uris(), [b"/first", b"/click"])
        self.assertEqual([r.connection for r in standin.requests], [1, 1])

    async def test_idle_connection_closed_by_upstream_is_replaced(self) -> None:
        """After the upstream closes an idle connection, the next request succeeds on a new one."""
        standin = self.standin()
        client, pool = self.trusted_client(standin)
        await self.get(client, b"/one")
        await standin.drop_idle()
        await wait_until(reactor, lambda: pool.open_count == 0)
        _, body = await self.get(client, b"/two")
        self.assertEqual(body, b"seen GET /two")
        self.assertEqual(standin.uris(), [b"/one", b"/two"])
        self.assertEqual([r.connection for r in standin.requests], [1, 2])

    async def test_connection_close_response_is_not_reused(self) -> None:
        """A response with Connection: close retires its connection; the next request opens one."""
        standin = self.standin(behaviour=close_after)
        client, _ = self.trusted_client(standin)
        await self.get(client, b"/a")
        standin.behaviour = echo
        await self.get(client, b"/b")
        self.assertEqual([r.connection for r in standin.requests], [1, 2])

    async def test_abandoned_response_closes_its_connection(self) -> None:
        """abandon() on a half-read body closes that connection; it is never reused."""
        standin = self.standin(behaviour=big_body(4 * 1024 * 1024))
        client, pool = self.trusted_client(standin)
        response = await client.request(b"GET", b"/big", headers(), None)
        lost: Deferred[None] = Deferred()
        reasons: list[Failure] = []

        class Abandon(Protocol):
            def dataReceived(self, data: bytes) -> None:
                client.abandon(response)

            def connectionLost(self, reason: Failure | None = None) -> None:
                if reason is not None:
                    reasons.append(reason)
                if not lost.called:
                    lost.callback(None)

        response.deliverBody(Abandon())
        await lost
        self.assertFalse(reasons[0].check(ResponseDone))
        await wait_until(reactor, lambda: pool.open_count == 0)
        standin.behaviour = echo
        await self.get(client, b"/after")
        self.assertEqual([r.connection for r in standin.requests], [1, 2])

    async def test_garbage_from_upstream_is_a_protocol_error(self) -> None:
        """An upstream that does not speak HTTP fails the request with cause 'protocol'."""

        class Garbage(Protocol):
            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.write(b"SMTP ready\r\nhello\r\n\r\n")

        port = reactor.listenTCP(0, Factory.forProtocol(Garbage), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client, _ = self.client(port.getHost().port, scheme="http", host="127.0.0.1")
        error = await self.failure_of(client.request(b"GET", b"/", headers(), None))
        self.assertIsInstance(error, UpstreamProtocolError)
        self.assertEqual(error.cause, "protocol")
