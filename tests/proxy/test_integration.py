"""The proxy end to end on loopback: a real client, the real proxy, a real HTTPS stand-in upstream."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.certs import issue, loaded
from tests.harness import (
    DOMAIN,
    DOMAIN2,
    STATUS,
    ProxyTestCase,
    curl,
    openssl,
    openssl_pipeline,
)
from tests.hostile.wire import RawClient
from tests.standin import GIF


def resumes(port: int, ca_pem: bytes, version: ssl.TLSVersion) -> bool:
    """Blocking client: a second connection resumes the first one's session (ID or ticket)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.minimum_version = ctx.maximum_version = version
    request = f"GET /q/x HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode()
    session = None
    reused = False
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=DOMAIN, session=session) as tls:
            tls.sendall(request)
            while tls.recv(65536):
                pass
            reused = bool(tls.session_reused)
            session = tls.session
    return reused


class ProxyTests(ProxyTestCase):
    @inlineCallbacks
    def test_open_pixel_over_https(self):
        """An open is forwarded with Host, client IP, proto and UA; the 44-byte GIF comes back."""
        r = self.start()
        resp = yield self.http.get(
            r.url("/q/abc.def?x=1&y=%2F"), headers={"User-Agent": "Mailer/1"}
        )
        body = yield resp.content()
        self.assertEqual((resp.code, body), (200, GIF))
        self.assertEqual(len(body), 44)
        self.assertEqual(resp.headers.getRawHeaders("content-type"), ["image/gif"])
        self.assertEqual(resp.headers.getRawHeaders("cache-control"), ["no-cache, max-age=0"])
        self.assertIsNone(resp.headers.getRawHeaders("server"))
        seen = r.standin.seen[0]
        self.assertEqual(seen.uri, b"/q/abc.def?x=1&y=%2F")
        self.assertEqual(seen.headers[b"host"], [DOMAIN.encode()])
        self.assertEqual(seen.headers[b"x-forwarded-for"], [b"127.0.0.1"])
        self.assertEqual(seen.headers[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(seen.headers[b"x-forwarded-host"], [DOMAIN.encode()])
        self.assertEqual(seen.headers[b"user-agent"], [b"Mailer/1"])
        self.assertTrue(
            any('GET /q/abc.def?x=1&y=%2F HTTP/1.1" 200 44' in line for line in r.log_lines),
            r.log_lines,
        )

    @inlineCallbacks
    def test_click_over_http_keeps_location(self):
        """A click over plain HTTP is proxied (never redirected) and the 302 passes unchanged."""
        r = self.start()
        resp = yield self.http.get(
            r.url("/f/tok?target=https%3A%2F%2Fx", scheme="http"), allow_redirects=False
        )
        yield resp.content()
        self.assertEqual(resp.code, 302)
        self.assertEqual(
            resp.headers.getRawHeaders("location"), ["https://www.example.com/landing?utm=1"]
        )
        self.assertEqual(r.standin.seen[0].headers[b"x-forwarded-proto"], [b"http"])

    @inlineCallbacks
    def test_spoofed_forwarded_for_is_dropped(self):
        """A client's own X-Forwarded-For (and Forwarded, X-Real-IP) never reach the upstream."""
        r = self.start()
        resp = yield self.http.get(
            r.url("/q/a"),
            headers={
                "X-Forwarded-For": "6.6.6.6",
                "Forwarded": "for=6.6.6.6",
                "X-Real-IP": "6.6.6.6",
                "Connection": "X-Secret",
                "X-Secret": "1",
                "Proxy-Authorization": "x",
            },
        )
        yield resp.content()
        headers = r.standin.seen[0].headers
        self.assertEqual(headers[b"x-forwarded-for"], [b"127.0.0.1"])
        for name in (b"forwarded", b"x-real-ip", b"x-secret", b"proxy-authorization"):
            self.assertNotIn(name, headers)

    @inlineCallbacks
    def test_trusted_proxy_chain(self):
        """Behind a trusted proxy, the chain is passed on with the peer appended."""
        r = self.start("--trusted-proxy", "127.0.0.0/8")
        resp = yield self.http.get(r.url("/q/a"), headers={"X-Forwarded-For": "198.51.100.4"})
        yield resp.content()
        self.assertEqual(
            r.standin.seen[0].headers[b"x-forwarded-for"], [b"198.51.100.4, 127.0.0.1"]
        )
        self.assertTrue(r.log_lines[-1].startswith("198.51.100.4 "), r.log_lines)

    @inlineCallbacks
    def test_foreign_hosts_get_421_and_are_not_forwarded(self):
        """Unknown hosts, IP literals and absolute-form targets for others: 421; a Host that is
        no host name (userinfo, a bad port, two trailing dots): 400 (RFC 9112 3.2)."""
        r = self.start()
        for args, expected in (
            (["-H", "Host: other.example.com", f"http://127.0.0.1:{r.http_port}/f/x"], b"421"),
            ([f"http://127.0.0.1:{r.http_port}/f/x"], b"421"),
            (["-H", f"Host: user@{DOMAIN}", f"http://127.0.0.1:{r.http_port}/f/x"], b"400"),
            (["-H", f"Host: {DOMAIN}:99999", f"http://127.0.0.1:{r.http_port}/f/x"], b"400"),
            (["-H", f"Host: {DOMAIN}..", f"http://127.0.0.1:{r.http_port}/f/x"], b"400"),
            (
                ["--request-target", "http://other.example.com/f/x", f"http://{DOMAIN}:{r.http_port}/"],
                b"421",
            ),
        ):
            out, err, code = yield curl(r, *STATUS, *args)
            self.assertEqual(out, expected, (args, err))
        self.assertEqual(r.standin.seen, [])

    @inlineCallbacks
    def test_absolute_form_for_our_domain_is_forwarded_in_origin_form(self):
        """`GET http://click.example.com/f/x` is forwarded as `/f/x`."""
        r = self.start()
        out, err, code = yield curl(
            r,
            *STATUS,
            "--request-target",
            f"http://{DOMAIN}/f/x?y=1",
            f"http://{DOMAIN}:{r.http_port}/",
        )
        self.assertEqual(out, b"302", err)
        self.assertEqual(r.standin.seen[0].uri, b"/f/x?y=1")

    @inlineCallbacks
    def test_methods(self):
        """PUT/DELETE/TRACE get 405 and are not forwarded; POST bodies are; >64 KiB gets 413."""
        r = self.start()
        for method in ("PUT", "DELETE", "TRACE", "PATCH"):
            resp = yield self.http.request(method, r.url("/f/x"))
            yield resp.content()
            self.assertEqual(resp.code, 405, method)
        self.assertEqual(r.standin.seen, [])
        resp = yield self.http.post(r.url("/echo"), data=b"a=1&b=2")
        self.assertEqual((yield resp.content()), b"a=1&b=2")
        resp = yield self.http.request("OPTIONS", r.url("/f/x"), allow_redirects=False)
        yield resp.content()
        self.assertEqual(r.standin.seen[-1].method, b"OPTIONS")

    @inlineCallbacks
    def test_body_limit(self):
        """A POST declaring more than 64 KiB gets 413 at once and the connection is closed."""
        r = self.start()
        proto = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", r.http_port), proto)
        proto.transport.write(
            b"POST /f/x HTTP/1.1\r\nHost: "
            + DOMAIN.encode()
            + b"\r\nContent-Length: 70000\r\n\r\n"
            + b"a" * 1000
        )
        for _ in range(100):
            if b"413" in proto.data:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(proto.data.startswith(b"HTTP/1.1 413 "), proto.data)
        self.assertEqual(r.standin.seen, [])

    @inlineCallbacks
    def test_head_request(self):
        """HEAD is forwarded as HEAD and answered without a body."""
        r = self.start()
        resp = yield self.http.head(r.url("/q/a"))
        self.assertEqual(resp.code, 200)
        self.assertEqual(r.standin.seen[0].method, b"HEAD")

    @inlineCallbacks
    def test_upstream_down_gives_502(self):
        """A refused upstream connection answers 502 with a small body that leaks no versions."""
        r = self.start()
        yield r.standin.port.stopListening()
        resp = yield self.http.get(r.url("/f/x"))
        body = yield resp.content()
        self.assertEqual(resp.code, 502)
        self.assertEqual(body, b"502 Bad Gateway\n")
        self.assertIsNone(resp.headers.getRawHeaders("server"))

    @inlineCallbacks
    def test_upstream_timeout_gives_504_and_no_retry(self):
        """No upstream headers within --upstream-timeout answers 504; the click was sent once."""
        r = self.start("--upstream-timeout", "0.5")
        resp = yield self.http.get(r.url("/stall/f/x"))
        yield resp.content()
        self.assertEqual(resp.code, 504)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(r.standin.seen), 1)

    @inlineCallbacks
    def test_upstream_reset_gives_502_without_retry(self):
        """A reset after a complete request answers 502 and is not resent."""
        r = self.start()
        resp = yield self.http.get(r.url("/reset/f/x"))
        yield resp.content()
        self.assertEqual(resp.code, 502)
        self.assertEqual(len(r.standin.seen), 1)

    @inlineCallbacks
    def test_keepalive_reuse(self):
        """Twenty sequential clicks travel over one upstream TLS connection."""
        r = self.start()
        for i in range(20):
            resp = yield self.http.get(r.url(f"/f/{i}"), allow_redirects=False)
            yield resp.content()
        self.assertEqual(len(r.standin.seen), 20)
        self.assertEqual(r.standin.connections, 1)
        self.assertEqual(len({s.connection for s in r.standin.seen}), 1)

    @inlineCallbacks
    def test_connection_recycled_after_max_age(self):
        """After --upstream-max-age a new upstream connection is used (DNS changes are followed)."""
        r = self.start("--upstream-max-age", "0.5")
        resp = yield self.http.get(r.url("/q/1"))
        yield resp.content()
        yield deferLater(reactor, 0.7, lambda: None)
        resp = yield self.http.get(r.url("/q/2"))
        yield resp.content()
        self.assertEqual(r.standin.connections, 2)

    @inlineCallbacks
    def test_streams_large_bodies(self):
        """A 1 MiB upstream body arrives complete."""
        r = self.start()
        resp = yield self.http.get(r.url("/big"))
        body = yield resp.content()
        self.assertEqual(len(body), 64 * 16384)

    @inlineCallbacks
    def test_http2_via_alpn(self):
        """curl negotiates h2 by ALPN and gets the pixel over HTTP/2."""
        r = self.start()
        out, err, code = yield curl(
            r,
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            f"https://{DOMAIN}:{r.https_port}/q/h2?z=1",
        )
        self.assertEqual(out, b"2 200", err)
        self.assertEqual(r.standin.seen[0].uri, b"/q/h2?z=1")
        self.assertEqual(r.standin.seen[0].headers[b"host"], [DOMAIN.encode()])

    @inlineCallbacks
    def test_tls_policy(self):
        """Mozilla intermediate: TLS 1.1, CBC suites, X448 and P-521 refused; TLS 1.2 ECDHE-GCM,
        TLS 1.3 and P-384 work; sessions resume (tickets on) in TLS 1.2 and 1.3."""
        r = self.start()
        target = f"-connect 127.0.0.1:{r.https_port} -servername {DOMAIN}"
        out, err, code = yield openssl(
            "s_client", target, "-tls1_1", "-cipher", "'DEFAULT:@SECLEVEL=0'"
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"alert protocol version", err)
        out, err, code = yield openssl(
            "s_client", target, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"handshake failure", err)
        for group in ("X448", "P-521"):
            out, err, code = yield openssl("s_client", target, "-groups", group)
            self.assertNotEqual(code, 0, group)
        out, _, code = yield openssl("s_client", target, "-groups", "P-384")
        self.assertEqual(code, 0, out)
        self.assertIn(b"secp384r1", out)
        out, _, code = yield openssl(
            "s_client", target, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"
        )
        self.assertEqual(code, 0, out)
        self.assertIn(b"New, TLSv1.2, Cipher is ECDHE-ECDSA-AES128-GCM-SHA256", out)
        self.assertNotIn(b"Compression: zlib", out)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            reused = yield deferToThread(resumes, r.https_port, r.ca.cert_pem.bytes(), version)
            self.assertTrue(reused, version)

    @inlineCallbacks
    def test_sni_selection_and_unknown_names(self):
        """Each domain gets its own certificate; no SNI gets the first; unknown names fail alone."""
        r = self.start_with_two_certificates()
        target = f"-connect 127.0.0.1:{r.https_port}"
        out, _, code = yield openssl("s_client", target, "-servername", DOMAIN2)
        self.assertIn(f"CN={DOMAIN2}".encode(), out.replace(b" ", b""))
        out, _, code = yield openssl("s_client", target, "-servername", DOMAIN)
        self.assertIn(f"CN={DOMAIN}".encode(), out.replace(b" ", b""))
        out, _, code = yield openssl("s_client", target, "-noservername")
        self.assertIn(f"CN={DOMAIN}".encode(), out.replace(b" ", b""))
        out, _, code = yield openssl("s_client", target, "-servername", "unknown.example.com")
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"CN=unknown", out.replace(b" ", b""))
        resp = yield self.http.get(r.url("/q/still-works", host=DOMAIN2))
        yield resp.content()
        self.assertEqual(resp.code, 200)

    @inlineCallbacks
    def test_host_must_match_sni(self):
        """A request for click2 on a TLS connection made for click (separate certs) gets 421."""
        r = self.start_with_two_certificates()
        out, err, code = yield curl(
            r,
            *STATUS,
            "-H",
            f"Host: {DOMAIN2}",
            f"https://{DOMAIN}:{r.https_port}/q/x",
        )
        self.assertEqual(out, b"421", err)
        self.assertEqual(r.standin.seen, [])

    @inlineCallbacks
    def test_runtime_certificate_replacement(self):
        """A replaced certificate is served to new handshakes; open connections keep working."""
        r = self.start()
        trust = Certificate.loadPEM(r.ca.cert_pem.bytes())
        endpoint = wrapClientTLS(
            optionsForClientTLS(DOMAIN, trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", r.https_port),
        )
        proto = RawClient()
        yield connectProtocol(endpoint, proto)
        request = b"GET /q/%d HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n\r\n"
        proto.transport.write(request % 1)
        yield self.wait_for(proto, b"GIF89a")
        old_serial = proto.transport.getPeerCertificate().get_serial_number()

        serial = f"openssl s_client -connect 127.0.0.1:{r.https_port} -servername {DOMAIN}"
        serial += " 2>/dev/null | openssl x509 -noout -serial"
        before, _, _ = yield openssl_pipeline(serial)
        self.assertEqual(int(before.strip().split(b"=")[1], 16), old_serial)
        new = loaded(issue(r.ca, DOMAIN, DOMAIN2))
        self.assertEqual(r.service.sni.install(new), (DOMAIN, DOMAIN2))
        after, _, _ = yield openssl_pipeline(serial)
        self.assertEqual(int(after.strip().split(b"=")[1], 16), new.leaf.serial_number)

        proto.data = b""
        proto.transport.write(request % 2)
        yield self.wait_for(proto, b"GIF89a")
        self.assertTrue(proto.data.startswith(b"HTTP/1.1 200 "))
        self.assertEqual(proto.transport.getPeerCertificate().get_serial_number(), old_serial)
        proto.transport.loseConnection()

    @inlineCallbacks
    def wait_for(self, proto: RawClient, marker: bytes):
        for _ in range(200):
            if marker in proto.data:
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{marker!r} not received: {proto.data!r}")

    @inlineCallbacks
    def test_well_known_files(self):
        """Deep-link files are served locally as JSON on every domain; others are forwarded."""
        tmp = Path(self.mktemp())
        (tmp / "wk").mkdir(parents=True)
        (tmp / "wk" / "apple-app-site-association").write_bytes(b'{"applinks":{}}')
        r = self.start("--well-known-dir", str(tmp / "wk"))
        for host in (DOMAIN, DOMAIN2):
            resp = yield self.http.get(r.url("/.well-known/apple-app-site-association", host=host))
            self.assertEqual((yield resp.content()), b'{"applinks":{}}')
            self.assertEqual(resp.headers.getRawHeaders("content-type"), ["application/json"])
        for path in ("/.well-known/../setup.cfg", "/.well-known/%2e%2e/x"):
            resp = yield self.http.get(r.url(path))
            yield resp.content()
        self.assertEqual(len(r.standin.seen), 2)

    @inlineCallbacks
    def test_proxy_protocol(self):
        """Behind haproxy: the PROXY header's source address becomes X-Forwarded-For."""
        r = self.start("--http-port", "haproxy:tcp:0:interface=127.0.0.1")
        proto = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", r.http_port), proto)
        proto.transport.write(
            b"PROXY TCP4 203.0.113.9 127.0.0.1 51000 80\r\n"
            b"GET /q/pp HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\nConnection: close\r\n\r\n"
        )
        for _ in range(100):
            if b"GIF89a" in proto.data:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn(b"200 OK", proto.data)
        self.assertEqual(r.standin.seen[0].headers[b"x-forwarded-for"], [b"203.0.113.9"])

    @inlineCallbacks
    def test_redirect_http_option(self):
        """--redirect-http sends plain-HTTP clicks to HTTPS with a 301 instead of proxying."""
        r = self.start("--redirect-http")
        resp = yield self.http.get(r.url("/f/x?y=1", scheme="http"), allow_redirects=False)
        yield resp.content()
        self.assertEqual(resp.code, 301)
        self.assertEqual(resp.headers.getRawHeaders("location"), [f"https://{DOMAIN}/f/x?y=1"])
        self.assertEqual(r.standin.seen, [])

    @inlineCallbacks
    def test_slow_headers_are_cut(self):
        """A client trickling its headers is disconnected after --header-timeout."""
        r = self.start("--header-timeout", "0.5")
        proto = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", r.http_port), proto)
        proto.transport.write(b"GET /q/x HTTP/1.1\r\n")
        lost: list[object] = []
        orig = proto.connectionLost

        def record(reason: Any) -> None:
            lost.append(reason)
            orig(reason)

        proto.connectionLost = record  # type: ignore[method-assign,assignment]
        for _ in range(10):
            proto.transport.write(b"X-A: b\r\n")
            yield deferLater(reactor, 0.1, lambda: None)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(lost)
        self.assertEqual(r.standin.seen, [])

    @inlineCallbacks
    def test_head_keeps_the_upstream_length(self):
        """A HEAD answer carries the length the GET would have (44 for the pixel), no body."""
        r = self.start()
        out, err, code = yield curl(
            r, "-sS", "-I", f"https://{DOMAIN}:{r.https_port}/q/head", "--http1.1"
        )
        self.assertIn(b"content-length: 44", out.lower(), out)
        self.assertEqual(r.standin.seen[0].method, b"HEAD")

    @inlineCallbacks
    def test_trailing_whitespace_in_host_is_not_part_of_it(self):
        """`Host: click.example.com ` (trailing space) names the domain (RFC 9110 optional
        white space), and forwarded header values carry no trailing white space."""
        r = self.start()
        proto = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", r.http_port), proto)
        proto.transport.write(
            b"GET /q/ows HTTP/1.1\r\nHost: " + DOMAIN.encode() + b" \r\nX-A: b \t\r\n"
            b"Connection: close\r\n\r\n"
        )
        yield self.wait_for(proto, b"GIF89a")
        self.assertTrue(proto.data.startswith(b"HTTP/1.1 200 "), proto.data[:80])
        self.assertEqual(r.standin.seen[0].headers[b"x-a"], [b"b"])
