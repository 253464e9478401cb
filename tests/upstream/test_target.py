"""Parsing --upstream into an UpstreamTarget."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.errors import ConfigError
from trackingproxy.upstream.target import (
    ALIASES,
    Endpoint,
    UpstreamTarget,
    endpoint_for,
    parse_upstream,
)

FIX = (
    "use the endpoint SparkPost's domain settings show for the tracking domain: us, eu, us-v2, "
    "eu-v2, enterprise:TENANT, or an https:// URL"
)


class ParseUpstream(SynchronousTestCase):
    def test_aliases(self) -> None:
        """`us`, `eu`, `us-v2`, `eu-v2` (any case) stand for SparkPost's V1 and V2 endpoints."""
        self.assertEqual(parse_upstream("us"), UpstreamTarget("https", "spgo.io", 443))
        self.assertEqual(parse_upstream(" EU "), UpstreamTarget("https", "eu.spgo.io", 443))
        self.assertEqual(parse_upstream("us-v2"), UpstreamTarget("https", "v2.spgo.io", 443))
        self.assertEqual(parse_upstream("EU-V2"), UpstreamTarget("https", "eu.v2.spgo.io", 443))
        self.assertEqual(
            ALIASES,
            {
                "us": "https://spgo.io",
                "eu": "https://eu.spgo.io",
                "us-v2": "https://v2.spgo.io",
                "eu-v2": "https://eu.v2.spgo.io",
            },
        )

    def test_enterprise_tenant(self) -> None:
        """`enterprise:TENANT` is https://TENANT.et.e.sparkpost.com, the tenant lower-cased."""
        self.assertEqual(
            parse_upstream("enterprise:acme"),
            UpstreamTarget("https", "acme.et.e.sparkpost.com", 443),
        )
        self.assertEqual(
            parse_upstream(" Enterprise:ACME-2 ").url, "https://acme-2.et.e.sparkpost.com"
        )

    def test_bad_enterprise_tenant_is_one_line_naming_the_fix(self) -> None:
        """A missing tenant, or one not a single DNS label, is one ConfigError line with the fix."""
        for value, why in [
            ("enterprise", "no tenant was given"),
            ("enterprise:", "no tenant was given"),
            ("enterprise: ", "no tenant was given"),
            ("enterprise:acme.et.e.sparkpost.com", "the tenant 'acme.et.e.sparkpost.com' is not"),
            ("enterprise:a_b", "the tenant 'a_b' is not one DNS label"),
            ("enterprise:-acme", "the tenant '-acme' is not one DNS label"),
            ("enterprise:acme-", "the tenant 'acme-' is not one DNS label"),
            ("enterprise:" + "a" * 64, "is not one DNS label"),
            ("enterprise:bücher", "the tenant 'bücher' is not one DNS label"),
            ("enterprise:https://acme", "the tenant 'https://acme' is not one DNS label"),
        ]:
            with self.assertRaises(ConfigError, msg=value) as caught:
                parse_upstream(value)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"--upstream {value!r}: "), message)
            self.assertIn(why, message)
            self.assertIn("use enterprise:TENANT with TENANT the first label of", message)
            self.assertIn("e.g. enterprise:acme", message)
            self.assertNotIn("\n", message)

    def test_endpoint_for_names_sparkpost_endpoints(self) -> None:
        """An alias's host (any port) is its endpoint, V1 <-> V2 counterparts; others are none."""
        pairs = [("us", "us-v2"), ("eu", "eu-v2"), ("us-v2", "us"), ("eu-v2", "eu")]
        for alias, counterpart in pairs:
            endpoint = endpoint_for(parse_upstream(alias))
            assert endpoint is not None
            self.assertEqual((endpoint.alias, endpoint.counterpart), (alias, counterpart))
            self.assertEqual(endpoint.url, ALIASES[alias])
        with_port = endpoint_for(parse_upstream("https://V2.spgo.io:8443"))
        self.assertEqual(with_port.alias if with_port else None, "us-v2")
        self.assertEqual(
            endpoint_for(parse_upstream("enterprise:acme")),
            Endpoint(
                "enterprise:acme", "https://acme.et.e.sparkpost.com", "SparkPost Enterprise", None
            ),
        )
        for other in [
            "https://127.0.0.1:8443",
            "https://click.example.com",
            "https://a.b.et.e.sparkpost.com",
        ]:
            self.assertIsNone(endpoint_for(parse_upstream(other)), other)

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
            "us-v3",
            "v2",
        ]:
            with self.assertRaises(ConfigError, msg=value) as caught:
                parse_upstream(value)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"--upstream {value!r}: "), message)
            self.assertTrue(message.endswith(f"; {FIX}"), message)
            self.assertNotIn("\n", message)
