"""What this host serves for a domain: do ports 80/443 answer, which certificate is served (and
is it valid), and how a `/f/` probe is answered (`routing.judge_probe` compares that answer with
the upstream's own).

Connections go to one given address with the domain as TLS server name and Host header, so a
host can be checked before DNS points at it. The TLS handshake itself never verifies (the
certificate must be seen to be judged); `judge_certificate` then verifies name, chain and dates
offline, against the clock's time. Each coroutine returns findings (the probe: the answer, when
there was one) and never raises for a network problem.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionRefusedError, TCPTimedOutError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from trackingproxy.checks.findings import Finding, Level
from trackingproxy.checks.routing import Answer


@implementer(IOpenSSLClientConnectionCreator)
class Inspecting:
    """A TLS client that sends `server_name` as SNI and accepts any certificate (to inspect it)."""

    def __init__(self, server_name: str) -> None:
        self._name = server_name.encode("ascii")
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_verify(SSL.VERIFY_NONE)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(self._name)
        connection.set_connect_state()
        return connection


def endpoint(reactor: Any, address: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if ":" in address:
        return TCP6ClientEndpoint(reactor, address, port, timeout)
    return TCP4ClientEndpoint(reactor, address, port, timeout)


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """Fires `done` with the peer's chain once the handshake completes (or with the failure)."""

    def __init__(self) -> None:
        self.done: Deferred[list[x509.Certificate]] = Deferred()

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        chain = handle.get_peer_cert_chain() or []
        if not self.done.called:
            self.done.callback([c.to_cryptography() for c in chain])
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def port_answers(
    reactor: Any, domain: str, address: str, port: int, timeout: float, role: str
) -> Finding:
    """Whether a TCP connection to `address`:`port` is accepted."""
    where = f"{domain}: port {port} at {address}"
    try:
        protocol = await endpoint(reactor, address, port, timeout).connect(
            Factory.forProtocol(Protocol)
        )
    except Exception as e:
        problem = _connect_problem(e, timeout)
        return Finding(Level.FAIL, "port", f"{where}: {problem}", _port_fix(port, role))
    protocol.transport.abortConnection()  # type: ignore[attr-defined]
    return Finding(Level.OK, "port", f"{where} answers ({role})")


def _port_fix(port: int, role: str) -> str:
    if role == "http":
        return (
            f"start trackingproxy (--http-port tcp:{port}) and open port {port} in the firewall "
            "(ACME validation and old http:// links need it)"
        )
    return f"start trackingproxy (--https-port tcp:{port}) and open port {port} in the firewall"


def _connect_problem(error: BaseException, timeout: float) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TCPTimedOutError | DeferredTimeout):
        return f"no answer within {timeout:g} s (a firewall dropping packets?)"
    if isinstance(error, ConnectError):
        return (error.osError and str(error.osError)) or str(error) or "cannot connect"
    return str(error) or type(error).__name__


async def fetch_chain(
    reactor: Any, domain: str, address: str, port: int, timeout: float
) -> list[x509.Certificate]:
    """The certificate chain served for `domain` (leaf first); raises on connect/TLS failure."""
    tls = wrapClientTLS(Inspecting(domain), endpoint(reactor, address, port, timeout))
    protocol = _Handshake()
    connecting: Deferred[Any] = tls.connect(Factory.forProtocol(lambda: protocol))
    connecting.addTimeout(timeout, reactor)
    await connecting
    waiting = protocol.done
    waiting.addTimeout(timeout, reactor)
    try:
        return await waiting
    except BaseException:
        protocol.abort()
        raise


async def served_certificate(
    reactor: Any,
    domain: str,
    address: str,
    port: int,
    timeout: float,
    trust: Sequence[str | None],
    now: datetime.datetime,
    warn_days: float,
) -> list[Finding]:
    """Findings about the certificate served for `domain` at `address`:`port`."""
    try:
        chain = await fetch_chain(reactor, domain, address, port, timeout)
    except Exception as e:
        problem = _tls_problem(e, timeout)
        return [
            Finding(
                Level.FAIL,
                "cert",
                f"{domain}: TLS handshake at {address} port {port} failed ({problem})",
                f"make sure a certificate for {domain} is configured (--cert/--certs-dir) or that "
                "ACME obtained one (see the log)",
            )
        ]
    return judge_certificate(domain, chain, trust, now, warn_days)


def _tls_problem(error: BaseException, timeout: float) -> str:
    if isinstance(error, SSL.Error):
        reasons = [str(item[-1]) for item in error.args[0] if item] if error.args else []
        return ", ".join(r for r in reasons if r) or "TLS error"
    return _connect_problem(error, timeout)


def judge_certificate(
    domain: str,
    chain: Sequence[x509.Certificate],
    trust: Sequence[str | None],
    now: datetime.datetime,
    warn_days: float,
) -> list[Finding]:
    """Name, chain and dates of a served chain, one finding per problem (or one OK)."""
    if not chain:
        return [Finding(Level.FAIL, "cert", f"{domain}: no certificate was served")]
    leaf = chain[0]
    problems: list[Finding] = []
    try:
        verify_certificate_hostname(leaf, domain)
    except VerificationError:
        names = ", ".join(_names(leaf)) or "no DNS name"
        problems.append(
            Finding(
                Level.FAIL,
                "cert",
                f"{domain}: the certificate served is for {names}, not {domain}",
                f"pass a certificate that covers {domain}, or let ACME obtain one "
                f"(--domain {domain} without --no-acme)",
            )
        )
    chain_error = _verify_chain(chain, trust, min(now, leaf.not_valid_after_utc))
    if chain_error is not None:
        problems.append(Finding(Level.FAIL, "cert", f"{domain}: {chain_error[0]}", chain_error[1]))
    left = leaf.not_valid_after_utc - now
    until = f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    renew = "renewal is failing or off: read the log for the renewal error, or renew --cert"
    if left.total_seconds() <= 0:
        problems.append(
            Finding(Level.FAIL, "cert", f"{domain}: the certificate expired on {until}", renew)
        )
    elif now < leaf.not_valid_before_utc:
        problems.append(
            Finding(
                Level.FAIL,
                "cert",
                f"{domain}: the certificate is not valid before "
                f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check this host's clock (and the CA's)",
            )
        )
    elif left < _warn_window(leaf, warn_days):
        problems.append(
            Finding(Level.WARN, "cert", f"{domain}: expires in {_days(left)} ({until})", renew)
        )
    if problems:
        return problems
    issuer = leaf.issuer.rfc4514_string()
    return [
        Finding(
            Level.OK,
            "cert",
            f"{domain}: valid for the name, chain verifies (issuer {issuer}), "
            f"expires in {_days(left)} ({until})",
        )
    ]


def _warn_window(leaf: x509.Certificate, warn_days: float) -> datetime.timedelta:
    """`warn_days`, or a quarter of the lifetime for short-lived certificates (6-day ones)."""
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    return min(datetime.timedelta(days=warn_days), lifetime / 4)


def _days(left: datetime.timedelta) -> str:
    days = left.days
    if days >= 1:
        return f"{days} day{'s' if days != 1 else ''}"
    return f"{int(left.total_seconds() // 3600)} hours"


def _names(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [str(a.value) for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return list(san.value.get_values_for_type(x509.DNSName))


def _verify_chain(
    chain: Sequence[x509.Certificate], trust: Sequence[str | None], at: datetime.datetime
) -> tuple[str, str] | None:
    """None if the chain verifies against the trust (None = system store) at time `at`."""
    store = crypto.X509Store()
    for bundle in trust:
        if bundle is None:
            paths = ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        else:
            store.load_locations(bundle)
    store.set_time(at.replace(tzinfo=None) - datetime.timedelta(seconds=1))
    leaf = crypto.X509.from_cryptography(chain[0])
    rest = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    try:
        crypto.X509StoreContext(store, leaf, rest).verify_certificate()
    except crypto.X509StoreContextError as e:
        reason = str(e)
        if "self-signed" in reason or "self signed" in reason:
            return (
                f"the certificate chain does not verify ({reason})",
                "serve a certificate from a publicly trusted CA (ACME), not a self-signed one",
            )
        return (
            f"the certificate chain does not verify ({reason})",
            "serve the full chain (fullchain.pem, not cert.pem) from a publicly trusted CA",
        )
    return None


@implementer(IAgentEndpointFactory)
class _FixedAddress:
    """Every request goes to one address and port; TLS with SNI = the URL's host, unverified."""

    def __init__(self, reactor: Any, address: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._address = address
        self._port = port
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        plain = endpoint(self._reactor, self._address, self._port, self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(Inspecting(uri.host.decode("ascii")), plain)
        return plain


async def probe(
    reactor: Any, domain: str, scheme: str, address: str, port: int, timeout: float, path: str
) -> Answer | Finding:
    """GET `scheme://domain/path` at `address`:`port`: how it answered (judged by
    `routing.judge_probe`), or a FAIL finding when nothing answered."""
    url = f"{scheme}://{domain}{path}"
    pool = HTTPConnectionPool(reactor, persistent=False)
    to = _FixedAddress(reactor, address, port, timeout)
    agent = Agent.usingEndpointFactory(reactor, to, pool)
    headers = Headers({b"user-agent": [b"trackingproxy-check"]})
    try:
        requesting: Deferred[Any] = agent.request(b"GET", url.encode("ascii"), headers)
        requesting.addTimeout(timeout, reactor)
        response = await requesting
        reading = _discard(response)
        reading.addTimeout(timeout, reactor)
        with contextlib.suppress(Exception):  # the status line counts; the body is discarded
            await reading
    except Exception as e:
        return Finding(
            Level.FAIL,
            "probe",
            f"{url} at {address} port {port}: no answer ({_tls_problem(e, timeout)})",
            "see the port and cert lines above",
        )
    finally:
        await pool.closeCachedConnections()
    found = {
        name: (response.headers.getRawHeaders(name.encode()) or [b""])[0].decode("latin-1")
        for name in ("server", "location")
    }
    return Answer(response.code, found["server"] or None, found["location"] or None)


class _Discard(Protocol):
    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


def _discard(response: Any) -> Deferred[None]:
    """Read and drop the body; fires when it has ended (cancelling stops the transfer)."""
    transport = getattr(response, "_transport", None)  # what readBody stops, too
    done: Deferred[None] = Deferred(lambda _: transport.stopProducing() if transport else None)
    response.deliverBody(_Discard(done))
    return done


__all__ = ["Inspecting", "judge_certificate", "port_answers", "probe", "served_certificate"]
