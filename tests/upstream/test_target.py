"""Parsing --upstream into an UpstreamTarget."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.errors import ConfigError
from trackingproxy.upstream.target import UpstreamTarget, parse_upstream


class ParseUpstream(SynchronousTestCase):
    def test_aliases(self) -> None:
        """`us` and `eu` (any case) stand for SparkPost's two tracking endpoints."""
        self.assertEqual(parse_upstream("us"), UpstreamTarget("https", "spgo.io", 443))
        self.assertEqual(parse_upstream(" EU "), UpstreamTarget("https", "eu.spgo.io", 443))

    def test_https_origin_with_and_without_port(self) -> None:
        """An https origin is lower-cased; the port defaults to 443; a bare trailing slash is fine."""
        self.assertEqual(parse_upstream("HTTPS://SpGo.IO/"), UpstreamTarget("https", "spgo.io", 443))
        self.assertEqual(parse_upstream("https://spgo.io:8443"), UpstreamTarget("https", "spgo.io", 8443))

    def test_http_origin(self) -> None:
        """A plain http origin (tests, benchmarks) defaults to port 80."""
        self.assertEqual(parse_upstream("http://127.0.0.1"), UpstreamTarget("http", "127.0.0.1", 80))

    def test_unicode_host_is_idna_encoded(self) -> None:
        """A non-ASCII host name is IDNA-encoded once, here."""
        target = parse_upstream("https://Bücher.example")
        self.assertEqual(target.host, "xn--bcher-kva.example")

    def test_ipv6_literal_in_brackets(self) -> None:
        """An IPv6 literal is accepted in brackets and stored without them."""
        target = parse_upstream("https://[::1]:8443")
        self.assertEqual(target, UpstreamTarget("https", "::1", 8443))
        self.assertEqual(target.netloc, "[::1]:8443")

    def test_netloc_and_url(self) -> None:
        """netloc omits the default port and keeps any other."""
        self.assertEqual(parse_upstream("us").netloc, "spgo.io")
        self.assertEqual(parse_upstream("http://h.example:81").url, "http://h.example:81")
        self.assertTrue(parse_upstream("us").tls)
        self.assertFalse(parse_upstream("http://h.example").tls)

    def test_rejected_values_name_the_fix(self) -> None:
        """Other schemes, paths, userinfo, queries, fragments and bad ports or hosts are rejected."""
        for value in [
            "ftp://x",
            "spgo.io",
            "https://spgo.io/path",
            "https://user@spgo.io",
            "https://spgo.io?q=1",
            "https://spgo.io#top",
            "https://spgo.io:0",
            "https://spgo.io:65536",
            "https://spgo.io:",
            "https://::1",
            "https://[::1",
            "https://a_b.example",
            "https://",
            "",
        ]:
            with self.assertRaises(ConfigError, msg=value) as caught:
                parse_upstream(value)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"--upstream {value!r}: "), message)
            self.assertIn("use https://spgo.io, https://eu.spgo.io, us or eu", message)
            self.assertNotIn("\n", message)
