"""Verdicts on the two `/f/` answers for a tracking domain: the upstream's, asked directly with
the domain as Host, and the proxy's, compared with it.

SparkPost routes by Host: an endpoint that does not answer the probe with a redirect most likely
holds the domain under another endpoint (V1 `spgo.io` / `eu.spgo.io` or V2 `v2.spgo.io` /
`eu.v2.spgo.io`), and the fix names the `--upstream` alias to try. When the proxy's answer
differs from the upstream's, the proxy (or whatever answers on its port) is what is wrong. Pure
functions of the answers; the network is in `served` (the proxy) and `upstream` (the upstream).
"""

from __future__ import annotations

from typing import Final

from attrs import frozen

from trackingproxy.checks.findings import Finding, Level
from trackingproxy.upstream.target import ALIASES, UpstreamTarget, endpoint_for

__all__ = ["Answer", "judge_probe", "judge_route", "named"]

_ANY: Final = "us, eu, us-v2, eu-v2 or enterprise:TENANT"


@frozen
class Answer:
    """How a server answered a probe: the status code and the `Server` and `Location` headers
    (None when absent)."""

    code: int
    server: str | None = None
    location: str | None = None

    @property
    def redirect(self) -> bool:
        """A 3xx with a Location: what SparkPost answers to a click."""
        return 300 <= self.code < 400 and bool(self.location)

    def shown(self, absent_server: str = "") -> str:
        """e.g. `302 to https://example.com/ (Server: msys-http)`; `absent_server` is said when
        there is no Server header (nothing said when it is empty)."""
        text = f"{self.code} to {self.location}" if self.redirect else str(self.code)
        if self.server:
            return f"{text} (Server: {self.server})"
        return f"{text} ({absent_server})" if absent_server else text


def named(target: UpstreamTarget) -> str:
    """The upstream as the report names it: its URL, and its alias when it is SparkPost's."""
    endpoint = endpoint_for(target)
    return f"{target.url} ({endpoint.alias})" if endpoint is not None else target.url


def judge_route(domain: str, target: UpstreamTarget, path: str, answer: Answer) -> Finding:
    """The verdict on the upstream's own answer to `GET path` with `Host: domain` (one finding)."""
    asked = f"GET {path} with Host {domain} -> {answer.shown('no Server header')}"
    if answer.redirect:
        return Finding(Level.OK, "upstream", f"{named(target)} serves {domain}: {asked}")
    if answer.code >= 500:
        return Finding(
            Level.FAIL,
            "upstream",
            f"{named(target)} failed for {domain}: {asked}",
            "a server error, not an answer about the domain: try again later; if it persists, "
            "ask SparkPost's support",
        )
    return Finding(
        Level.FAIL,
        "upstream",
        f"{named(target)} does not serve {domain}: {asked}",
        _other_endpoint(target),
    )


def _other_endpoint(target: UpstreamTarget) -> str:
    """Which endpoint SparkPost probably has the domain on, and the `--upstream` to pass."""
    endpoint = endpoint_for(target)
    if endpoint is None or endpoint.counterpart is None:
        kind = "endpoint or tenant" if endpoint is not None else "endpoint"
        return (
            f"SparkPost probably has the domain on another {kind} (or not set up): pass the "
            f"endpoint its domain settings show for it ({_ANY})"
        )
    other = ALIASES[endpoint.counterpart].removeprefix("https://")
    if endpoint.alias.endswith("-v2"):
        where = f"on the V1 endpoint {other}"
    else:
        where = f"on the V2 endpoint {other} (domains created after December 2025 are)"
    return (
        f"SparkPost probably has the domain {where}, or not set up: if its domain settings "
        f"show {other}, pass --upstream {endpoint.counterpart}"
    )


def judge_probe(
    url: str, domain: str, got: Answer, upstream: Answer | None, target: UpstreamTarget
) -> Finding:
    """The verdict on the proxy's answer to `url`, compared with the upstream's own answer
    (None when the upstream could not be asked)."""
    shown = got.shown()
    scheme, _, rest = url.partition("://")
    if scheme == "http" and got.redirect and got.location == f"https://{rest}":
        return Finding(Level.OK, "probe", f"{url} -> {shown} (--redirect-http: to HTTPS)")
    if upstream is None:
        if got.redirect:
            return Finding(Level.OK, "probe", f"{url} -> {shown} (a SparkPost redirect)")
        return Finding(
            Level.FAIL, "probe", f"{url} -> {shown}, not a redirect", _probe_fix(got, domain, None)
        )
    if got.code == upstream.code:
        if got.redirect:
            return Finding(Level.OK, "probe", f"{url} -> {shown}, as the upstream answers it")
        return Finding(
            Level.FAIL,
            "probe",
            f"{url} -> {shown}, not a redirect, as the upstream answers it",
            f"the proxy passes the upstream's answer on: see the upstream line for {domain}",
        )
    return Finding(
        Level.FAIL,
        "probe",
        f"{url} -> {shown}, but the upstream answers {upstream.code} for {domain} directly",
        _probe_fix(got, domain, target),
    )


def _probe_fix(got: Answer, domain: str, target: UpstreamTarget | None) -> str:
    if got.code == 421:
        return f"this server does not serve {domain}: add --domain {domain}"
    if got.code in (502, 504):
        return "the proxy cannot reach the upstream: see the upstream line and the proxy's log"
    if target is None:
        return (
            "the answer is not SparkPost's: check that trackingproxy (not another web server) "
            f"listens here and that --upstream is SparkPost's endpoint ({_ANY})"
        )
    return (
        "the proxy is misconfigured: check that trackingproxy (not another web server) answers "
        f"here and that it runs with --upstream {target.url}, the endpoint this check asked"
    )
