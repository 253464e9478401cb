"""ACME configuration (a frozen value with one-line validation) and building the service.

``tap.py`` turns options into ``AcmeSettings``, calls ``validate()``, and passes it to
``build_acme``, which chooses the real collaborators (file store in the state directory, the
ACME obtainer or the local CA, the shared HTTP-01 responder) and returns the service to add
to the tree plus the responder to mount on the port-80 site.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.application.service import IService, MultiService, Service
from twisted.internet.interfaces import IReactorFromThreads, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.acme.client import AcmeObtainer
from trackingproxy.acme.issuer import IssuingService
from trackingproxy.acme.localca import LocalCA
from trackingproxy.acme.obtainer import Obtainer
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.sync import StoreSync
from trackingproxy.errors import ConfigError
from trackingproxy.proxy.challenges import ChallengeResponder, NoChallenges
from trackingproxy.store.contract import CertificateStore
from trackingproxy.store.files import FileStore, usable_private_dir
from trackingproxy.store.settings import StoreSettings
from trackingproxy.store.shared import OpenedStore, open_shared_store
from trackingproxy.tls.certificates import PrivateKey
from trackingproxy.tls.sni import SNIContextMap

__all__ = [
    "DEFAULT_STATE_DIR",
    "DIRECTORY_ALIASES",
    "FALLBACK_STATE_DIR",
    "KEY_TYPES",
    "AcmeParts",
    "AcmeSettings",
    "DomainsFollower",
    "build_acme",
    "choose_state_dir",
    "key_generator",
    "open_store",
]

log = Logger()

DIRECTORY_ALIASES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
    "zerossl": "https://acme.zerossl.com/v2/DV90",
    "google": "https://dv.acme-v02.api.pki.goog/directory",
}
_EAB_REQUIRED = {"zerossl": "ZeroSSL", "google": "Google Trust Services"}
LOCAL = "local"
KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa2048", "rsa4096")
DEFAULT_STATE_DIR = Path("/var/lib/trackingproxy")
FALLBACK_STATE_DIR = Path("trackingproxy-state")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PROFILE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]{8,}={0,2}$")


@frozen
class AcmeSettings:
    """Every ACME option; ``directory`` may be an alias, ``local`` or a URL."""

    email: str | None = None
    directory: str = "letsencrypt"
    ca_bundle: Path | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)  # a secret: never in logs
    profile: str | None = None
    key_type: str = "ecdsa-p256"
    state_dir: Path | None = None  # None: DEFAULT_STATE_DIR, else FALLBACK_STATE_DIR
    no_acme: bool = False
    panic_command: str | None = None
    check_interval: float = 600.0
    store: StoreSettings | None = None  # --store: shared by replicas (None: the state dir)
    node_id: str = ""  # --node-id: in lock tokens, logs, metrics and /status
    order_lock_ttl: float = 120.0  # --order-lock-ttl
    max_orders_per_hour: int = 90  # --acme-max-orders-per-hour

    @property
    def is_local(self) -> bool:
        return self.directory == LOCAL

    @property
    def directory_url(self) -> str:
        return DIRECTORY_ALIASES.get(self.directory, self.directory)

    def validate(self) -> None:
        """Raise ConfigError with one line naming the problem and the fix."""
        if self.no_acme:
            return
        if self.email is not None and not _EMAIL.match(self.email):
            raise ConfigError(
                f"--email {self.email!r} is not an e-mail address; pass e.g. ops@example.com"
            )
        if not self.is_local and self.directory not in DIRECTORY_ALIASES:
            url = urlsplit(self.directory)
            loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
            if not (url.scheme == "https" or (url.scheme == "http" and loopback)) or not url.netloc:
                raise ConfigError(
                    f"--acme-directory {self.directory!r} is neither an https:// URL nor one of "
                    f"{', '.join([*DIRECTORY_ALIASES, LOCAL])}; pass e.g. letsencrypt-staging"
                )
        if self.ca_bundle is not None and not (
            self.ca_bundle.is_file() and os.access(self.ca_bundle, os.R_OK)
        ):
            raise ConfigError(
                f"--acme-ca-bundle {self.ca_bundle}: not a readable file; pass the PEM file "
                "with the root certificate of your ACME server"
            )
        if bool(self.eab_kid) != bool(self.eab_hmac_key):
            raise ConfigError(
                "--eab-kid and --eab-hmac-key go together; pass both (from your CA's account page)"
            )
        if self.eab_hmac_key:
            if not _B64URL.match(self.eab_hmac_key):
                raise ConfigError(
                    "--eab-hmac-key is not base64url; copy the HMAC key exactly as your CA shows it"
                )
        elif self.directory in _EAB_REQUIRED:
            raise ConfigError(
                f"--acme-directory {self.directory} needs External Account Binding: pass "
                f"--eab-kid and --eab-hmac-key from your {_EAB_REQUIRED[self.directory]} account"
            )
        if self.profile is not None and not _PROFILE.match(self.profile):
            raise ConfigError(
                f"--acme-profile {self.profile!r} is not a profile name; pass e.g. tlsserver"
            )
        if self.key_type not in KEY_TYPES:
            raise ConfigError(
                f"--key-type {self.key_type!r} is unknown; use one of {', '.join(KEY_TYPES)}"
            )
        if not self.check_interval > 0:
            raise ConfigError("the renewal check interval must be positive; e.g. 600 seconds")
        if not 5 <= self.order_lock_ttl <= 3600:
            raise ConfigError("--order-lock-ttl: give 5 to 3600 seconds, e.g. 120")
        if self.panic_command is not None and not self.panic_command.strip():
            raise ConfigError("--panic-command is empty; pass a shell command or leave it out")


def key_generator(key_type: str) -> Callable[[], PrivateKey]:
    """A function making new certificate keys of ``key_type`` (one of KEY_TYPES)."""
    if key_type == "ecdsa-p256":
        return lambda: ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return lambda: ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa4096"):
        bits = int(key_type[3:])
        return lambda: rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise ConfigError(f"--key-type {key_type!r} is unknown; use one of {', '.join(KEY_TYPES)}")


def choose_state_dir(
    settings: AcmeSettings, default: Path = DEFAULT_STATE_DIR, fallback: Path = FALLBACK_STATE_DIR
) -> Path:
    """The state directory (created 0700); says in the log which one and why."""
    if settings.state_dir is not None:
        if not usable_private_dir(settings.state_dir):
            raise ConfigError(
                f"--state-dir {settings.state_dir}: cannot create or write it; fix its "
                "permissions or pass another directory"
            )
        log.info("State directory: {dir}", dir=str(settings.state_dir))
        return settings.state_dir
    if usable_private_dir(default):
        log.info("State directory: {dir}", dir=str(default))
        return default
    if usable_private_dir(fallback):
        log.warn(
            "State directory: {dir} ({default} is not writable); certificates and the ACME "
            "account are kept there, keep it across restarts",
            dir=str(fallback.resolve()), default=str(default),
        )
        return fallback
    raise ConfigError(
        f"neither {default} nor {fallback} is writable; pass --state-dir with a writable directory"
    )


class _PanicProtocol(ProcessProtocol):
    def __init__(self, command: str) -> None:
        self._command = command

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if code:
            log.error("--panic-command {cmd!r} exited with status {code}",
                      cmd=self._command, code=code)


def _panic_runner(command: str, reactor: IReactorProcess) -> Callable[[str, str], None]:
    def run(name: str, message: str) -> None:
        env = dict(os.environ)
        env["TRACKINGPROXY_PANIC_DOMAIN"] = name
        env["TRACKINGPROXY_PANIC_MESSAGE"] = message
        reactor.spawnProcess(_PanicProtocol(command), "/bin/sh", ["/bin/sh", "-c", command], env)

    return run


class ResponderService(Service):
    """Runs the responder's refresh of tokens published by other processes."""

    def __init__(self, responder: HTTP01Responder) -> None:
        self._responder = responder

    def startService(self) -> None:
        super().startService()
        self._responder.start()

    def stopService(self) -> None:
        super().stopService()
        self._responder.stop()


@frozen
class AcmeParts:
    """What `build_acme` (or `certwatch.build_worker_acme`) makes: the service to start, the
    HTTP-01 responder the port-80 handler reads, the issuer the status page reports on (None
    in a worker, or without ACME), and the parts that a SIGHUP hands the new domain list to."""

    service: IService
    responder: ChallengeResponder
    issuer: IssuingService | None = None
    follow_domains: tuple[DomainsFollower, ...] = ()
    store: OpenedStore | None = None  # the shared store (--store), for the status page


class DomainsFollower(Protocol):
    """A part that serves or watches a domain list, told the new one on SIGHUP."""

    def set_domains(self, domains: Iterable[str]) -> None: ...


def build_acme(
    settings: AcmeSettings,
    domains: Iterable[str],
    skip_domains: Iterable[str],
    sni: SNIContextMap,
    reactor: IReactorTime,
    *,
    opened: OpenedStore | None = None,
    on_store_domains: Callable[[list[str]], None] | None = None,
) -> AcmeParts:
    """The certificate service for ``domains`` (minus ``skip_domains``) and its responder.

    With ``no_acme`` the service is empty and the responder answers nothing. ``opened`` is
    the shared store (``open_store``) of a cluster replica; its domain list changes go to
    ``on_store_domains``. ``reactor`` must also provide IReactorFromThreads and
    IReactorProcess (the global reactor does).
    """
    top = MultiService()
    top.setName("acme")
    if settings.no_acme:
        return AcmeParts(top, NoChallenges())
    settings.validate()
    skip = set(skip_domains)
    managed = [d for d in domains if d not in skip]
    state = opened.state_dir if opened is not None else choose_state_dir(settings)
    store: CertificateStore = FileStore(state, reactor) if opened is None else opened.store
    responder = HTTP01Responder(
        managed, reactor, shared_dir=state / "challenges",
        board=opened.store if opened is not None else None,
    )
    obtainer: Obtainer
    if settings.is_local:
        obtainer = LocalCA(state, reactor)
    else:
        obtainer = AcmeObtainer(
            reactor=IReactorFromThreads(reactor),
            clock=reactor,
            directory_url=settings.directory_url,
            store=store,
            responder=responder,
            email=settings.email,
            ca_bundle=settings.ca_bundle,
            eab_kid=settings.eab_kid,
            eab_hmac_key=settings.eab_hmac_key,
            profile=settings.profile,
        )
    panic = None
    if settings.panic_command:
        panic = _panic_runner(settings.panic_command, IReactorProcess(reactor))
    issuer = IssuingService(
        clock=reactor,
        store=store,
        obtainer=obtainer,
        sni=sni,
        domains=managed,
        key_generator=key_generator(settings.key_type),
        panic=panic,
        check_interval=settings.check_interval,
        lock_ttl=settings.order_lock_ttl,
        busy_retry=min(60.0, settings.order_lock_ttl / 2),
        max_orders_per_hour=settings.max_orders_per_hour,
    )
    if opened is not None:
        opened.pool_service.setServiceParent(top)  # first: started before, stopped after
    ResponderService(responder).setServiceParent(top)
    issuer.setServiceParent(top)
    if opened is not None:
        StoreSync(
            clock=reactor,
            shared=opened.store,
            issuer=issuer,
            call_in_reactor=IReactorFromThreads(reactor).callFromThread,
            on_domains=on_store_domains,
        ).setServiceParent(top)
    return AcmeParts(top, responder, issuer, (issuer, responder), opened)


def open_store(
    settings: AcmeSettings, domains: Iterable[str], reactor: IReactorTime
) -> OpenedStore | None:
    """The shared store of ``--store`` (None without it, or without ACME); start-up only."""
    if settings.store is None or settings.no_acme:
        return None
    state = choose_state_dir(settings)
    return open_shared_store(
        settings.store, reactor=reactor, local=FileStore(state, reactor),
        node_id=settings.node_id, domains=domains, state_dir=state,
    )
