"""Serving ACME certificates without issuing them: what a ``--workers`` child process runs.

Exactly one process (the twistd parent) runs the ACME issuer; it saves every certificate it
obtains into the shared state directory. The other processes run a ``CertificateWatcher``
instead: on a timer (every 5 s) it looks at the files of each managed domain
(``STATE/certificates/<domain>/fullchain.pem`` and ``privkey.pem``: inode, mtime, size, so an
unchanged domain costs two ``stat`` calls), and when they changed it reads the certificate
through ``FileStore.load`` (the same parsing and checks as the issuer, under the store's shared
lock) and installs it in the SNI map when its serial differs from the one served. New
handshakes get the new certificate; established connections continue. HTTP-01 tokens come from
the same directory through the responder's own 1-s refresh (``acme/responder.py``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.settings import (
    AcmeParts,
    AcmeSettings,
    ResponderService,
    choose_state_dir,
)
from trackingproxy.proxy.challenges import NoChallenges
from trackingproxy.store.contract import StoredCertificate
from trackingproxy.store.files import FileStore
from trackingproxy.tls.sni import SNIContextMap

__all__ = ["WATCH_INTERVAL", "CertificateWatcher", "build_worker_acme"]

log = Logger(namespace="trackingproxy.acme.certwatch")
WATCH_INTERVAL = 5.0
_FILES = ("fullchain.pem", "privkey.pem")  # what FileStore.save writes for a certificate

_Stamp = tuple[tuple[int, int, int], ...]


class CertificateWatcher(Service):
    """Installs in ``sni`` the certificates that another process saved into ``store``."""

    name = "certificate-watcher"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        store: FileStore,
        state_dir: Path,
        sni: SNIContextMap,
        domains: Iterable[str],
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self._clock = clock
        self._store = store
        self._dir = state_dir / "certificates"
        self._sni = sni
        self._interval = interval
        self.domains: tuple[str, ...] = tuple(domains)
        self._seen: dict[str, _Stamp] = {}
        self._loop: LoopingCall | None = None

    def set_domains(self, domains: Iterable[str]) -> None:
        """Watch exactly ``domains`` from now on (SIGHUP reload); new ones are loaded at once."""
        self.domains = tuple(domains)
        self._seen = {d: s for d, s in self._seen.items() if d in self.domains}
        if self.running:
            self.check()

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("The certificate watcher stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> None:
        """Load and serve the certificates whose files changed since the last check."""
        for name in self.domains:
            stamp = self._stamp(name)
            if stamp is None or stamp == self._seen.get(name):
                continue
            # Stat first, then load under the store's lock: what is loaded is at least as new
            # as the stamp, so a save that happens meanwhile changes the stamp again.
            self._seen[name] = stamp
            d = self._store.load(name)
            d.addCallback(self._adopt, name)
            d.addErrback(self._load_failed, name)

    def _stamp(self, name: str) -> _Stamp | None:
        stamps = []
        for file in _FILES:
            try:
                st = os.stat(self._dir / name / file)
            except OSError:
                return None
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _adopt(self, stored: StoredCertificate | None, name: str) -> None:
        if stored is None or name not in self.domains:
            return
        cert = stored.cert
        current = self._sni.certificate_for(name)
        if current is not None and current.serial_hex == cert.serial_hex:
            return
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)
        if current is not None and cert.expired_at(now):
            return  # like the issuer: never replace a served certificate by an expired one
        if self._sni.install(cert, [name]):
            log.info(
                "{name}: serving certificate {serial} from {issuer}, valid until {not_after} "
                "(from the state directory)",
                name=name, serial=cert.serial_hex, issuer=cert.issuer,
                not_after=cert.not_after.isoformat(),
            )

    def _load_failed(self, failure: Failure, name: str) -> None:
        self._seen.pop(name, None)  # try again at the next check
        log.warn("{name}: cannot read the stored certificate: {error}",
                 name=name, error=failure.getErrorMessage())


def build_worker_acme(
    settings: AcmeSettings,
    domains: Iterable[str],
    skip_domains: Iterable[str],
    sni: SNIContextMap,
    reactor: IReactorTime,
) -> AcmeParts:
    """``build_acme`` for a worker process: the same responder, a watcher instead of an issuer.

    Same signature as ``trackingproxy.acme.settings.build_acme`` (``build_service`` takes
    either). With ``no_acme`` the service is empty and the responder answers nothing.
    """
    top = MultiService()
    top.setName("acme")
    if settings.no_acme:
        return AcmeParts(top, NoChallenges())
    skip = set(skip_domains)
    managed = [d for d in domains if d not in skip]
    state = choose_state_dir(settings)
    responder = HTTP01Responder(managed, reactor, shared_dir=state / "challenges")
    ResponderService(responder).setServiceParent(top)
    watcher = CertificateWatcher(
        clock=reactor, store=FileStore(state, reactor), state_dir=state, sni=sni, domains=managed
    )
    watcher.setServiceParent(top)
    return AcmeParts(top, responder, None, (watcher, responder))
