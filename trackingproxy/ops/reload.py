"""SIGHUP: re-read ``--certs-dir`` (and ``--cert``/``--key``), ``--well-known-dir`` and
``--domains-file`` without dropping connections.

Everything is read and checked first; only when all of it is valid is it applied (a bad file is
logged and the running configuration stays). Domains added get certificates (user-supplied or
ACME), domains removed stop being served.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Protocol

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from trackingproxy.config import ProxyConfig
from trackingproxy.domains import normalise_domain, read_domains_file
from trackingproxy.errors import ConfigError
from trackingproxy.proxy.wellknown import WellKnownFile, load_well_known
from trackingproxy.tls.certificates import (
    LoadedCertificate,
    check_usable,
    covered_domains,
    load_certs_dir,
    load_pair,
)
from trackingproxy.tls.sni import SNIContextMap

log = Logger(namespace="trackingproxy.ops.reload")


class ManagesDomains(Protocol):
    """The ACME issuer and responder: told which domains they manage now."""

    def set_domains(self, domains: Iterable[str]) -> None: ...


class MutableRuntime(Protocol):
    domains: frozenset[str]
    well_known: dict[bytes, WellKnownFile] | object


@frozen
class Snapshot:
    """What the files say now, fully validated."""

    domains: tuple[str, ...]
    certificates: tuple[LoadedCertificate, ...]
    well_known: dict[bytes, WellKnownFile]


def read_snapshot(
    config: ProxyConfig, now: datetime.datetime, store_domains: Iterable[str] = ()
) -> Snapshot:
    """Read every reloadable file; raise ConfigError (one line) on the first problem.

    ``store_domains`` is the cluster-wide list kept in the shared store (``--store``)."""
    names = list(config.command_line_domains)
    if config.domains_file is not None:
        names.extend(read_domains_file(config.domains_file))
    names.extend(store_domains)
    if not names:
        raise ConfigError("no domain left after reading --domains-file; keep at least one")
    domains = tuple(dict.fromkeys(normalise_domain(n) for n in names))
    certs = [load_pair(c, k) for c, k in config.cert_files]
    if config.certs_dir is not None:
        certs.extend(load_certs_dir(config.certs_dir, config.certs_dir_files))
    check_usable(certs, domains, now)
    well_known = load_well_known(config.well_known_dir) if config.well_known_dir else {}
    return Snapshot(domains, tuple(certs), well_known)


class Reloader:
    """Applies a new Snapshot to the running process."""

    def __init__(
        self,
        config: ProxyConfig,
        clock: IReactorTime,
        sni: SNIContextMap,
        apply_runtime: Callable[[frozenset[str], dict[bytes, WellKnownFile]], None],
        acme: Iterable[ManagesDomains] = (),
    ) -> None:
        self._config = config
        self._clock = clock
        self._sni = sni
        self._apply_runtime = apply_runtime
        self._acme = tuple(acme)
        self.store_domains: tuple[str, ...] = ()

    def store_domains_changed(self, names: Iterable[str]) -> None:
        """The shared store's domain list changed (``trackingproxy domains add|remove``)."""
        names = tuple(sorted(names))
        if names != self.store_domains:
            self.store_domains = names
            self.reload()

    def reload(self) -> bool:
        """Re-read and apply; returns False (and logs why) when nothing was changed."""
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)
        try:
            snap = read_snapshot(self._config, now, self.store_domains)
        except ConfigError as e:
            log.error("Reload refused, keeping the running configuration: {error}", error=str(e))
            return False
        before = set(self._sni.domains)
        user_covered = set(covered_domains(snap.certificates, snap.domains))
        self._sni.set_domains(snap.domains)
        for name in snap.domains:
            # A name whose user certificate was removed goes back to ACME's certificate, or none.
            current = self._sni.certificate_for(name)
            if current is not None and name not in user_covered and current.source.startswith("--"):
                self._sni.remove(name)
        for cert in snap.certificates:
            self._sni.install(cert)
        self._apply_runtime(frozenset(snap.domains), snap.well_known)
        managed = [d for d in snap.domains if d not in user_covered]
        for part in self._acme:
            part.set_domains(managed)
        added = sorted(set(snap.domains) - before)
        removed = sorted(before - set(snap.domains))
        log.info(
            "Reloaded: {count} domain(s) (added: {added}; removed: {removed}), "
            "{certs} user certificate(s), {files} well-known file(s)",
            count=len(snap.domains),
            added=", ".join(added) or "none",
            removed=", ".join(removed) or "none",
            certs=len(snap.certificates),
            files=len(snap.well_known),
        )
        return True
