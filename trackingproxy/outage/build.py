# -*- test-case-name: tests.outage.test_integration,tests.outage.test_service -*-
"""Building outage mode from its settings: where the journal lives (the state directory, chosen
as the certificates' one is), the parts wired together, and the service that opens the journal
and runs the replayer while the process runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from trackingproxy.errors import ConfigError
from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.journal import Journal
from trackingproxy.outage.links import RememberedLinks
from trackingproxy.outage.metrics import OutageCollector
from trackingproxy.outage.policy import OutagePolicy
from trackingproxy.outage.replay import Replayer, Sender
from trackingproxy.outage.writer import Run, open_journal_file
from trackingproxy.store.files import usable_private_dir

__all__ = [
    "JOURNAL_SUBDIR",
    "Outage",
    "OutageService",
    "OutageSettings",
    "build_outage",
    "journal_directory",
]

log = Logger(namespace="trackingproxy.outage")

JOURNAL_SUBDIR = "outage"  # STATE_DIR/outage/journal-N (0600) and journal-N.lock


@frozen
class OutageSettings:
    """The outage options (``--remember-links``, ``--journal-ttl``, ``--journal-max-bytes``)
    and where the state directory is: ``state_dir`` (``--state-dir``), else ``default_dir``
    if writable, else ``fallback_dir`` (as ``acme.settings.choose_state_dir``)."""

    remember_links: int
    journal_ttl: float
    journal_max_bytes: int
    state_dir: Path | None
    default_dir: Path
    fallback_dir: Path
    rate: float = 20.0
    concurrency: int = 4
    probe_interval: float = 5.0
    journal_503: bool = True  # an upstream 503 before any body byte counts as not reached


def journal_directory(settings: OutageSettings) -> Path:
    """``STATE_DIR/outage``, the state directory chosen as the certificates' is (without
    logging it again); ConfigError when none is writable."""
    if settings.state_dir is not None:
        if not usable_private_dir(settings.state_dir):
            raise ConfigError(
                f"--state-dir {settings.state_dir}: cannot create or write it (the outage "
                "journal lives there); fix its permissions or pass another directory"
            )
        return settings.state_dir / JOURNAL_SUBDIR
    for candidate in (settings.default_dir, settings.fallback_dir):
        if usable_private_dir(candidate):
            return candidate / JOURNAL_SUBDIR
    raise ConfigError(
        f"--outage-mode replay: neither {settings.default_dir} nor {settings.fallback_dir} is "
        "writable for its journal; pass --state-dir with a writable directory"
    )


class OutageService(Service):
    """Opens the journal and starts the replayer; at stop, stops replaying and closes the
    journal (what is buffered is written). A journal that cannot be opened is one log line:
    local answers still work, nothing is journaled. `status` gives the facts for /status."""

    name = "outage"

    def __init__(
        self,
        journal: Journal,
        replayer: Replayer,
        links: RememberedLinks,
        counters: OutageCounters,
        clock: IReactorTime,
        directory: Path,
    ) -> None:
        self.journal = journal
        self.replayer = replayer
        self._links = links
        self._counters = counters
        self._clock = clock
        self._directory = directory

    def startService(self) -> None:
        super().startService()
        try:
            self.journal.open()
        except OSError as e:
            log.error(
                "Outage journal in {dir} cannot be used ({error}): opens and remembered clicks "
                "are still answered during an outage, but nothing is journaled for re-sending",
                dir=str(self._directory), error=e.strerror or str(e),
            )
        else:
            log.info("Outage mode replay: journal {path}", path=str(self.journal.path))
        self.replayer.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.replayer.stop()
        return self.journal.close()

    def status(self) -> dict[str, Any]:
        """Facts for /status: the upstream as outage mode sees it, the journal, the links and
        the counters (nothing of any request)."""
        journal = self.journal
        oldest = journal.oldest()
        c = self._counters
        return {
            "mode": "replay",
            "upstream": self.replayer.state,
            "down_since": self.replayer.down_since,
            "journal": {
                "available": journal.available,
                "path": None if journal.path is None else str(journal.path),
                "entries": len(journal),
                "bytes": journal.file_bytes,
                "max_bytes": journal.max_bytes,
                "oldest_age_seconds": (
                    None if oldest is None else round(self._clock.seconds() - oldest, 1)
                ),
                "ttl_seconds": journal.ttl,
            },
            "remembered_links": len(self._links),
            "local_answers": dict(c.local_answers),
            "journaled": c.journaled,
            "repeats": c.repeats,
            "replayed": c.replayed,
            "dropped": dict(c.dropped),
            "ambiguous": c.ambiguous,
            "journal_write_errors": c.write_errors,
        }


@frozen
class Outage:
    """The built parts (see the module docstring)."""

    policy: OutagePolicy
    journal: Journal
    links: RememberedLinks
    replayer: Replayer
    counters: OutageCounters
    service: OutageService
    collector: OutageCollector

    def status(self) -> dict[str, Any]:
        return self.service.status()


def build_outage(
    settings: OutageSettings,
    reactor: Any,
    upstream: Sender,
    hosts: Callable[[], Iterable[str]],
    *,
    clock: IReactorTime | None = None,
    run: Run | None = None,
) -> Outage:
    """The outage parts for ``--outage-mode replay``: journal I/O in ``reactor``'s thread pool
    (``run`` replaces it in tests), time from ``clock`` (default: the reactor)."""
    clock = clock or reactor
    if run is None:

        def run(call: Callable[[], Any]) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), call)

    directory = journal_directory(settings)
    counters = OutageCounters()
    links = RememberedLinks(clock, settings.remember_links)
    journal = Journal(
        lambda: open_journal_file(directory), clock, run, counters,
        ttl=settings.journal_ttl, max_bytes=settings.journal_max_bytes,
    )
    replayer = Replayer(
        clock, upstream, journal, counters, links, hosts,
        rate=settings.rate, concurrency=settings.concurrency,
        probe_interval=settings.probe_interval, journal_503=settings.journal_503,
    )
    policy = OutagePolicy(clock, links, journal, counters, replayer,
                          journal_503=settings.journal_503)
    collector = OutageCollector(
        counters, lambda: len(journal), lambda: journal.file_bytes, lambda: len(links),
        lambda: replayer.down_since is not None,
    )
    service = OutageService(journal, replayer, links, counters, clock, directory)
    return Outage(policy, journal, links, replayer, counters, service, collector)
