"""Shutdown notices: at SIGTERM every open client connection hears of it (the HTTP connection
itself, or the one under the TLS layer), closed ones are skipped, and one that fails does not
stop the others."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.ops.lifecycle import OpenConnections


class _Socket:
    def __init__(self, disconnected: bool) -> None:
        self.disconnected = disconnected


class _HTTP(Protocol):
    notices = 0
    fail = False

    def shutdown_notice(self) -> None:
        self.notices += 1
        if self.fail:
            raise RuntimeError("boom")


class _TLS(Protocol):
    def __init__(self) -> None:
        self.wrappedProtocol = _HTTP()


class NotifyShutdownTests(SynchronousTestCase):
    def test_every_open_connection_hears_of_it(self) -> None:
        connections = OpenConnections(Clock())
        plain = connections.track(Factory.forProtocol(_HTTP))
        tls = connections.track(Factory.forProtocol(_TLS))
        built: list[Any] = []
        for factory, disconnected, fail in (
            (plain, False, True),  # raises: logged, the others still hear
            (plain, False, False),
            (plain, True, False),  # already closed: skipped
            (tls, False, False),
        ):
            protocol = factory.buildProtocol(None)
            protocol.transport = _Socket(disconnected)
            target = getattr(protocol, "wrappedProtocol", protocol)
            target.fail = fail
            built.append(target)
        connections.notify_shutdown()
        self.assertEqual([p.notices for p in built], [1, 1, 0, 1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class OpenFilesLimitTests(SynchronousTestCase):
    def test_soft_limit_is_raised_to_the_hard_limit(self) -> None:
        """A soft open-files limit below the hard one is raised to it (each connection is a
        file); at the hard limit already, nothing changes."""
        import resource

        from trackingproxy.ops.lifecycle import raise_open_files_limit

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if hard == resource.RLIM_INFINITY or hard <= 256:
            self.fail(f"this machine's hard limit {hard} leaves nothing to test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        self.assertEqual(raise_open_files_limit(), (256, hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
        self.assertIsNone(raise_open_files_limit())
