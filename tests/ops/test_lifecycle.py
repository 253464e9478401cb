"""Shutdown: at SIGTERM every open client connection hears of it through its listener's
registry (closed ones are no longer there), one that fails does not stop the others, and what
is still open after the grace period is aborted."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.ops.lifecycle import OpenConnections
from trackingproxy.server.registry import SHUTDOWN, ConnectionRegistry, ShutdownNotice


class _Connection:
    """A client connection as the registry holds it."""

    def __init__(self, registry: ConnectionRegistry, fail: bool = False) -> None:
        self.registry = registry
        self.fail = fail
        self.notices: list[ShutdownNotice] = []
        self.calls: list[str] = []
        registry.add(self)

    def shutdown_notice(self, notice: ShutdownNotice = SHUTDOWN) -> None:
        self.notices.append(notice)
        if self.fail:
            raise RuntimeError("boom")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")
        self.registry.discard(self)


class NotifyShutdownTests(SynchronousTestCase):
    def test_every_open_connection_hears_of_it(self) -> None:
        """Every registered connection of every watched listener gets the typed notice; one
        that fails is logged and does not stop the others; a closed one is no longer there."""
        connections = OpenConnections(Clock())
        http, https = ConnectionRegistry(), ConnectionRegistry()
        connections.watch(http)
        connections.watch(https)
        failing, plain, gone, tls = (
            _Connection(http, fail=True), _Connection(http), _Connection(http), _Connection(https)
        )
        http.discard(gone)  # its connectionLost ran
        connections.notify_shutdown()
        self.assertEqual(
            [len(c.notices) for c in (failing, plain, gone, tls)], [1, 1, 0, 1]
        )
        self.assertEqual(tls.notices, [SHUTDOWN])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_close_is_polite_then_aborts_what_is_left(self) -> None:
        """All are closed politely; those still open after the grace period are aborted and
        counted."""
        clock = Clock()
        connections = OpenConnections(clock)
        registry = ConnectionRegistry()
        connections.watch(registry)
        quick, stuck = _Connection(registry), _Connection(registry)
        done = connections.close(grace=2.0)
        self.assertEqual((quick.calls, stuck.calls), (["close"], ["close"]))
        registry.discard(quick)  # it closed
        clock.advance(2.0)
        self.assertEqual(self.successResultOf(done), 1)
        self.assertEqual(stuck.calls, ["close", "abort"])


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
