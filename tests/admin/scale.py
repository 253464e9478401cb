"""10,000 configured domains for the admin tests at scale: real certificates (one shared key,
so building them takes about a second, once per process), renewal states, a few domains
in trouble placed at the end of the configured order, where only "problems first" puts them
on the first page, and an ACME order queue of ``QUEUED`` domains (those in trouble, then a
wave of renewals from the start of the order) at the default pace."""

from __future__ import annotations

import datetime
import functools

import attrs
from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock

from tests.admin.test_status import (
    FakeCertificates,
    FakeListener,
    FakePort,
    FakeRenewals,
    idle_queue,
    state,
)
from trackingproxy.acme.issuer import RenewalState
from trackingproxy.acme.queue import QueueSummary
from trackingproxy.admin.metrics import ProxyMetrics
from trackingproxy.admin.status import StatusSource
from trackingproxy.tls.certificates import LoadedCertificate

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
COUNT = 10_000
MISSING = tuple(range(COUNT - 3, COUNT))  # no certificate yet
EXPIRING = (COUNT - 10, COUNT - 20)  # expires within 7 days
FAILING = (COUNT - 30,)  # ACME orders failing
WAVE = 995  # renewals waiting for their order: the first WAVE domains
QUEUED = (*EXPIRING, *MISSING, *range(WAVE))  # in the order queue, in this order
RUNNING = 4  # queued orders running
LETS_ENCRYPT = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Let's Encrypt"),
        x509.NameAttribute(NameOID.COMMON_NAME, "R11"),
    ]
)


def name(i: int) -> str:
    """The i-th domain, as long as a typical tracking domain (22 characters)."""
    return f"click{i:05d}.example.com"


def _cert(key: ec.EllipticCurvePrivateKey, domain: str, days_old: float) -> LoadedCertificate:
    start = NOW - datetime.timedelta(days=days_old)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(LETS_ENCRYPT)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + 90 * DAY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return LoadedCertificate(
        key=key, chain=(leaf,), source=f"state /var/lib/trackingproxy/certificates/{domain}"
    )


@functools.cache
def certificates(count: int = COUNT) -> dict[str, LoadedCertificate]:
    """A certificate for every domain but the ``MISSING`` ones (``EXPIRING`` ones end within
    a week), built once per process."""
    key = ec.generate_private_key(ec.SECP256R1())
    out = {}
    for i in range(count):
        if i in MISSING:
            continue
        out[name(i)] = _cert(key, name(i), 85 if i in EXPIRING else (i % 60))
    return out


def eta(position: int) -> datetime.datetime:
    """The estimated start of the ``position``-th waiting domain at the default pace (90
    orders an hour, the first 10 at once, then one every 40 s)."""
    return NOW + max(0, position - 10) * 40 * datetime.timedelta(seconds=1)


def queue() -> QueueSummary:
    """The order queue holding the ``QUEUED`` domains."""
    return attrs.evolve(
        idle_queue(),
        length=len(QUEUED),
        running=RUNNING,
        orders_last_hour=RUNNING,
        next_start=eta(1),
        drained_at=eta(len(QUEUED)),
    )


def renewals(count: int = COUNT) -> dict[str, RenewalState]:
    """The issuer's state for every domain: renewal planned, one failing with an error, the
    ``QUEUED`` ones waiting in the order queue."""
    out = {}
    for i in range(count):
        if i in FAILING:
            out[name(i)] = state(
                NOW + 3600 * datetime.timedelta(seconds=1),
                4,
                f"{name(i)}: validation failed: <b>DNS</b> points elsewhere",
                NOW - DAY,
                issued=1,
                failed=4,
            )
        else:
            out[name(i)] = state(NOW + (60 - i % 60) * DAY, issued=1)  # at 2/3 of its life
    for position, i in enumerate(QUEUED, start=1):
        if i < count:
            out[name(i)] = attrs.evolve(
                out[name(i)], next_attempt=NOW, queue_position=position, queue_eta=eta(position)
            )
    return out


@frozen
class Fleet:
    """A StatusSource over ``count`` domains, with the metrics it reads."""

    source: StatusSource
    metrics: ProxyMetrics
    names: tuple[str, ...]
    clock: Clock


def fleet(count: int = COUNT, *, acme: bool = True, per_domain: str = "auto") -> Fleet:
    """``count`` domains with certificates (and, with ``acme``, renewal states)."""
    clock = Clock()
    clock.advance(NOW.timestamp())
    names = tuple(name(i) for i in range(count))
    certs = FakeCertificates(names, dict(certificates(count)))
    states = FakeRenewals(renewals(count), queue()) if acme else FakeRenewals()
    configured = frozenset(names)
    metrics = ProxyMetrics(lambda: configured, per_domain=per_domain, process_metrics=False)
    source = StatusSource(
        clock=clock,
        certificates=certs,
        https_enabled=True,
        listeners=lambda: [
            FakeListener("--http-port", "tcp:80", FakePort(80)),
            FakeListener("--https-port", "tcp:443", FakePort(443)),
        ],
        renewals=lambda: states,
        metrics=metrics,
        started=NOW.timestamp() - 86400,
    )
    return Fleet(source, metrics, names, clock)
