"""Running the real proxy in-process on loopback ephemeral ports, and clients that reach it under
the tracking domain's name (SNI + Host) without DNS."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import trustme
from attrs import define, field
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.certs import issue, make_ca, write_pair
from tests.standin import StandIn, start_standin
from trackingproxy.config import config_from_options
from trackingproxy.logs.access import AccessLog
from trackingproxy.options import Options
from trackingproxy.service import TrackingProxyService, build_service

# curl arguments that print only the status code
STATUS = ("-o", "/dev/null", "-w", "%{http_code}")
TWISTD = (
    sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
    "--nodaemon", "--pidfile=", "trackingproxy",
)  # fmt: skip
DOMAIN = "click.example.com"
DOMAIN2 = "click2.example.com"


@define
class Running:
    service: TrackingProxyService
    standin: StandIn
    ca: trustme.CA
    http_port: int
    https_port: int
    log_lines: list[str] = field(factory=list)
    admin_port: int = 0  # --admin-port (tcp:0 on loopback unless the test passes its own)

    def url(self, path: str, scheme: str = "https", host: str = DOMAIN) -> str:
        return f"{scheme}://{host}{path}"


def proxy_args(tmp: Path, ca: trustme.CA, standin: StandIn, *extra: str) -> list[str]:
    ca_file = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert standin.port is not None
    args = [
        "--domain",
        DOMAIN,
        "--domain",
        DOMAIN2,
        "--upstream",
        f"https://127.0.0.1:{standin.port.getHost().port}",
        "--upstream-ca-bundle",
        str(ca_file),
        "--http-port",
        "tcp:0:interface=127.0.0.1",
        "--https-port",
        "tcp:0:interface=127.0.0.1",
        "--no-acme",
    ]
    if "--admin-port" not in extra:
        args += ["--admin-port", "tcp:0:interface=127.0.0.1"]
    if "--cert" not in extra and "--certs-dir" not in extra:
        cert, key = write_pair(issue(ca, DOMAIN, DOMAIN2), tmp, "proxy")
        args += ["--cert", str(cert), "--key", str(key)]
    return args + list(extra)


def start_proxy(
    tmp: Path,
    *extra: str,
    reactor: Any = global_reactor,
    ca: trustme.CA | None = None,
    standin: StandIn | None = None,
) -> Running:
    ca = ca or make_ca()
    standin = standin or start_standin(ca, reactor)
    opts = Options(environ={})
    opts.parseOptions(proxy_args(tmp, ca, standin, *extra))
    config = config_from_options(opts, datetime.datetime.now(datetime.UTC))
    lines: list[str] = []
    service = build_service(
        config, reactor, access_log=AccessLog(config.log_format, config.log_paths, lines.append)
    )
    service.startService()
    ports = {}
    for child in service:
        port = getattr(child, "port", None)
        if port is not None:
            ports[child.option] = port.getHost().port  # type: ignore[attr-defined]
    admin = service.namedServices.get("admin")
    admin_port = admin.listener.port.getHost().port if admin and admin.listener.port else 0
    return Running(
        service,
        standin,
        ca,
        ports.get("--http-port", 0),
        ports.get("--https-port", 0),
        lines,
        admin_port,
    )


def start_proxy_for(case: Any, *extra: str) -> tuple[Running, str]:
    """``start_proxy`` in a fresh temporary directory of the trial test ``case``, stopped when
    it ends; returns the proxy and the path of a PEM file of its CA (for TLS clients)."""
    tmp = Path(case.mktemp())
    tmp.mkdir(parents=True)
    running = start_proxy(tmp, *extra)
    case.addCleanup(stop_proxy, running)
    ca_file = str(tmp / "client-ca.pem")
    running.ca.cert_pem.write_to_path(ca_file)
    return running, ca_file


@inlineCallbacks
def stop_proxy(running: Running) -> Any:
    yield running.service.stopService()
    if running.standin.port is not None:
        for request in running.standin.stalled:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        yield running.standin.port.stopListening()


@implementer(IAgentEndpointFactory)
class _ToLoopback:
    def __init__(self, reactor: Any, running: Running) -> None:
        self.reactor = reactor
        self.running = running

    def endpointForURI(self, uri: Any) -> Any:
        if uri.scheme == b"https":
            trust = Certificate.loadPEM(self.running.ca.cert_pem.bytes())
            tls = optionsForClientTLS(uri.host.decode(), trustRoot=trust)
            return wrapClientTLS(
                tls, TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.running.https_port)
            )
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.running.http_port)


def client(running: Running, reactor: Any = global_reactor) -> HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent.usingEndpointFactory(reactor, _ToLoopback(reactor, running), pool))


def curl(running: Running, *args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run curl with the test CA and the tracking domains resolved to the proxy's ports."""
    ca = running.ca.cert_pem.bytes().decode()
    resolve = []
    for host in (DOMAIN, DOMAIN2):
        resolve += [
            "--resolve",
            f"{host}:{running.https_port}:127.0.0.1",
            "--resolve",
            f"{host}:{running.http_port}:127.0.0.1",
        ]
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
        f.write(ca)
    return getProcessOutputAndValue(
        "/usr/bin/curl",
        ["-sS", "--max-time", "20", "--cacert", f.name, *resolve, *args],
        env={"PATH": "/usr/bin:/bin"},
    )


def plain_curl(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """curl without the test CA or name overrides (for requests to 127.0.0.1)."""
    return getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "--max-time", "20", *args], env={"PATH": "/usr/bin:/bin"}
    )


def openssl(*args: str, stdin: bytes = b"") -> Deferred[tuple[bytes, bytes, int]]:
    import os

    return getProcessOutputAndValue(
        "/bin/sh", ["-c", "printf '' | openssl " + " ".join(args)], env=dict(os.environ)
    )


def openssl_pipeline(command: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run a shell pipeline of openssl commands (stdin closed at once)."""
    import os

    return getProcessOutputAndValue(
        "/bin/sh", ["-c", "exec < /dev/null; " + command], env=dict(os.environ)
    )


class ProxyTestCase(TestCase):
    """A trial TestCase that starts the real proxy (``self.start``) and stops it afterwards."""

    timeout = 60

    def start(self, *extra: str, **kw: Any) -> Running:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        self.tmp = tmp
        running = start_proxy(tmp, *extra, **kw)
        self.addCleanup(stop_proxy, running)
        self.running = running
        self.http = client(running)
        return running

    def start_with_two_certificates(self) -> Running:
        """The proxy serving a separate certificate for each of DOMAIN and DOMAIN2."""
        ca = make_ca()
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        c1, k1 = write_pair(issue(ca, DOMAIN), tmp, "one")
        c2, k2 = write_pair(issue(ca, DOMAIN2), tmp, "two")
        return self.start(
            "--cert", str(c1), "--key", str(k1), "--cert", str(c2), "--key", str(k2), ca=ca
        )
