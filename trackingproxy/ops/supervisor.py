"""``--workers N``: N processes serve the HTTP and HTTPS listeners; the twistd process leads.

How the sockets are shared: the parent (the twistd process) binds, for each listener, N sockets
to the same address with ``SO_REUSEPORT``, in ``privilegedStartService``, i.e. before twistd
drops privileges, so ports 80/443 work without giving the workers any capability. It serves on
the first socket itself and hands one of the others to each of the N-1 worker processes, which
it spawns (after the privilege drop) with ``reactor.spawnProcess(..., childFDs=...)``; a worker
adopts its socket with ``reactor.adoptStreamPort``. Why one socket per process rather than one
inherited socket that every process accepts from: the kernel then spreads new connections
evenly over the processes (a hash of the connection's addresses), whereas processes sharing one
accept queue are all woken for each connection and the first to run takes it, and, as Twisted
accepts in batches, one process can end up with most of a burst of keep-alive connections
(nginx's old ``accept_mutex`` problem). The parent keeps its copy of every worker's socket, so a
worker that dies loses no connection: they wait in its queue until the restarted worker takes
them (connections the kernel hashed to it wait about a second).

Roles: only the parent runs the ACME issuer and the admin listener (``--admin-port``; health
and readiness describe the parent). Every process serves certificates and HTTP-01 tokens from
the shared state directory: a worker runs ``certwatch.build_worker_acme`` (responder +
certificate watcher) instead of the issuer. Metrics count every process: with an admin
listener each worker writes its totals once a second, as one line, on another pipe (fd 4, read
by the parent), and the pool hands the lines to ``WorkerReports``
(``trackingproxy.admin.workers``, where that design is explained). Listening sockets follow
from fd 5.

Life cycle: the parent passes its parsed options to a worker on a pipe (fd 3) and keeps that
pipe open; a worker stops when the pipe reaches end of file, i.e. when the parent is gone,
however it ended. A worker that exits while the parent runs is started again (after 0.5 s,
doubling up to 30 s while it keeps dying within 30 s of its start). SIGHUP to the parent is
forwarded to every worker (each reloads its files); SIGTERM makes the parent stop listening and
send SIGTERM to every worker, and each process drains its own requests in flight
(``--shutdown-timeout``); a worker still running 5 s after that is killed. Workers ignore SIGINT
(Ctrl-C in a terminal reaches the whole process group; the parent forwards SIGTERM).
Logs: every process writes to the same stdout; access lines are written in whole-line chunks of
at most PIPE_BUF bytes, so lines from different processes never mix within a line.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol, cast

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.config import ProxyConfig
from trackingproxy.errors import ConfigError
from trackingproxy.logs.access import AccessLog, build_access_log
from trackingproxy.logs.writer import BufferedLines

__all__ = [
    "ListenSpec",
    "SharedListeners",
    "WorkerPool",
    "WorkerReports",
    "line_safe_access_log",
    "parse_listen",
]

log = Logger(namespace="trackingproxy.ops.supervisor")

CONTROL_FD = 3  # parent -> worker: the spec, then kept open (end of file: the parent is gone)
REPORT_FD = 4  # worker -> parent: metrics reports, one line each (with an admin listener)
FIRST_FD = 5  # listening sockets follow in the order they were made
MAX_REPORT = 16 * 1024 * 1024  # a longer report line is dropped
KILL_GRACE = 5.0
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
QUICK_EXIT = 30.0  # a worker that dies sooner than this after its start backs off further
Wrapper = Callable[[IProtocolFactory], IProtocolFactory]


# -- endpoints --------------------------------------------------------------------------------
@frozen
class ListenSpec:
    """What a ``tcp:``/``tcp6:`` endpoint (possibly behind ``haproxy:``) listens on."""

    family: int
    host: str
    port: int
    backlog: int
    wrapper: Wrapper | None  # e.g. the PROXY-protocol wrapping factory of ``haproxy:``


def parse_listen(reactor: Any, option: str, description: str) -> ListenSpec:
    """Parse with Twisted's own endpoint parser, then read what it made; only TCP qualifies."""
    try:
        endpoint: Any = serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--{option} {description!r} is not a valid endpoint ({e}); use e.g. tcp:80, "
            "tcp:443:interface=::, haproxy:tcp:80 or none"
        ) from None
    wrapper: Wrapper | None = getattr(endpoint, "_wrapperFactory", None)
    if wrapper is not None:  # twisted.internet.endpoints._WrapperServerEndpoint (haproxy:)
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
    if isinstance(endpoint, TCP6ServerEndpoint):
        family, default_host = socket.AF_INET6, "::"
    elif isinstance(endpoint, TCP4ServerEndpoint):
        family, default_host = socket.AF_INET, "0.0.0.0"  # noqa: S104 (as tcp:80 does)
    else:
        raise ConfigError(
            f"--{option} {description!r}: --workers above 1 needs a tcp:, tcp6: or haproxy:tcp: "
            "endpoint (the listening sockets are shared by port); use one, or --workers 1"
        )
    return ListenSpec(
        family=family,
        host=endpoint._interface or default_host,
        port=int(endpoint._port),
        backlog=int(endpoint._backlog),
        wrapper=wrapper,
    )


def _bind_group(spec: ListenSpec, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, joined by SO_REUSEPORT (port 0: one port)."""
    sockets: list[socket.socket] = []
    port = spec.port
    try:
        for _ in range(count):
            s = socket.socket(spec.family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((spec.host, port))
            s.listen(spec.backlog)
            s.setblocking(False)
            port = s.getsockname()[1]
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


class _GroupEndpoint:
    """An IStreamServerEndpoint: binds the group, serves on the first socket, keeps the rest."""

    def __init__(self, owner: SharedListeners, option: str, spec: ListenSpec) -> None:
        self._owner = owner
        self._option = option
        self._spec = spec

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        spec = self._spec
        try:
            group = _bind_group(spec, self._owner.count)
        except OSError as e:
            return fail(CannotListenError(spec.host, spec.port, e))
        first, rest = group[0], group[1:]
        try:
            wrapped = spec.wrapper(factory) if spec.wrapper is not None else factory
            port = self._owner.reactor.adoptStreamPort(first.fileno(), spec.family, wrapped)
        except Exception:
            for s in group:
                s.close()
            return fail()
        finally:
            first.close()  # adoptStreamPort made its own copy
        self._owner.held[self._option] = rest
        return succeed(port)


class SharedListeners:
    """Makes the parent's listening endpoints and holds the workers' sockets (by option)."""

    def __init__(self, reactor: Any, count: int) -> None:
        self.reactor = reactor
        self.count = count
        self.held: dict[str, list[socket.socket]] = {}
        self.descriptions: dict[str, str] = {}

    def endpoint(self, option: str, description: str) -> _GroupEndpoint:
        """For ``build_service(listen=...)``: ``option`` is e.g. ``http-port``."""
        self.descriptions[option] = description
        return _GroupEndpoint(self, option, parse_listen(self.reactor, option, description))

    def for_worker(self, index: int) -> list[tuple[str, str, socket.socket]]:
        """(option, description, socket) of each listener for worker ``index`` (1 to N-1)."""
        return [(o, self.descriptions[o], group[index - 1]) for o, group in self.held.items()]

    def close(self) -> None:
        for group in self.held.values():
            for s in group:
                s.close()
        self.held.clear()


# -- the worker processes ---------------------------------------------------------------------
class WorkerReports(Protocol):
    """Receives the workers' metrics reports (``trackingproxy.admin.workers.WorkerMetrics``)."""

    def report(self, index: int, pid: int | None, line: bytes) -> None:
        """One report line (without its newline) from worker ``index``."""

    def worker_ended(self, index: int) -> None:
        """Worker ``index`` exited; every line it wrote was reported before."""


class _Worker(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int, payload: bytes) -> None:
        self.pool = pool
        self.index = index
        self.payload = payload
        self.pid: int | None = None
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()
        self._partial = b""  # the start of a report line not complete yet

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.writeToChild(CONTROL_FD, self.payload)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != REPORT_FD:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.pool._report(self, line)
        if len(self._partial) > MAX_REPORT:
            log.warn("worker {index}: metrics report longer than {limit} bytes dropped",
                     index=self.index, limit=MAX_REPORT)
            self._partial = b""

    def childConnectionLost(self, childFD: int) -> None:
        pass  # fd 3 closing on the worker's side is its business (it keeps it open)

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        if self.transport is not None and not self.ended.called:
            try:
                self.transport.signalProcess(name)
            except Exception:  # it is exiting already
                log.debug("worker {index}: cannot send SIG{name}", index=self.index, name=name)


class WorkerPool(Service):
    """Starts the N-1 worker processes, restarts the ones that die, signals and stops them."""

    name = "workers"

    def __init__(
        self,
        reactor: Any,
        listeners: SharedListeners,
        options: Mapping[str, Any],
        shutdown_timeout: float,
        argv: tuple[str, ...] = (sys.executable, "-m", "trackingproxy.worker"),
        reports: WorkerReports | None = None,
    ) -> None:
        self._reactor = reactor
        self._reports = reports
        self._listeners = listeners
        self._options = dict(options)
        self._shutdown_timeout = shutdown_timeout
        self._argv = argv
        self._workers: dict[int, _Worker] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping: Deferred[None] | None = None
        self.stops_with_listeners = True  # TrackingProxyService.stopService: stop it first

    @property
    def pids(self) -> dict[int, int]:
        """Worker index -> pid of the running workers."""
        return {i: w.pid for i, w in self._workers.items() if w.pid is not None}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._listeners.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping is not None:
            return
        sockets = self._listeners.for_worker(index)
        spec = {
            "index": index,
            "report_fd": REPORT_FD if self._reports is not None else None,
            "options": self._options,
            "listeners": [
                {"option": option, "description": description, "fd": FIRST_FD + n}
                for n, (option, description, _) in enumerate(sockets)
            ],
        }
        payload = json.dumps(spec, default=str).encode() + b"\n"
        fds: dict[int, int | str] = {1: 1, 2: 2, CONTROL_FD: "w"}
        if self._reports is not None:
            fds[REPORT_FD] = "r"
        for n, (_, _, sock) in enumerate(sockets):
            fds[FIRST_FD + n] = sock.fileno()
        worker = _Worker(self, index, payload)
        worker.started = self._reactor.seconds()
        self._workers[index] = worker
        try:
            self._reactor.spawnProcess(
                worker, self._argv[0], list(self._argv), env=dict(os.environ),
                path=os.getcwd(), childFDs=fds,
            )
        except Exception:
            log.failure("worker {index}: cannot start it", index=index)
            del self._workers[index]
            self._schedule_restart(index)
            return
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _report(self, worker: _Worker, line: bytes) -> None:
        if self._reports is not None and line:
            self._reports.report(worker.index, worker.pid, line)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if self._reports is not None:
            self._reports.worker_ended(worker.index)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"killed by signal {sig}" if sig else f"exit status {code}"
        if self._stopping is not None:
            log.info("worker {index} (pid {pid}) stopped ({how})",
                     index=worker.index, pid=worker.pid, how=how)
            return
        lived = self._reactor.seconds() - worker.started
        quick = lived < QUICK_EXIT
        self._failures[worker.index] = self._failures.get(worker.index, 0) + 1 if quick else 0
        delay = self._schedule_restart(worker.index)
        log.error("worker {index} (pid {pid}) exited ({how}); starting it again in {delay:.1f} s",
                  index=worker.index, pid=worker.pid, how=how, delay=delay)

    def _schedule_restart(self, index: int) -> float:
        delay = float(min(RESTART_MAX, RESTART_FIRST * 2 ** self._failures.get(index, 0)))
        self._restarts[index] = self._reactor.callLater(delay, self._spawn, index)
        return delay

    def reload(self) -> None:
        """SIGHUP: every worker reloads its files (the parent reloads its own)."""
        for worker in list(self._workers.values()):
            worker.signal("HUP")

    def stopService(self) -> Deferred[None]:
        """SIGTERM to every worker; fires when all have exited (killed after the drain time)."""
        if self._stopping is not None:
            return self._stopping
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        # Close our copies now: the kernel stops giving connections to a socket once the worker
        # holding it stops listening too.
        self._listeners.close()
        workers = list(self._workers.values())
        for worker in workers:
            worker.signal("TERM")

        def kill() -> None:
            for worker in workers:
                if not worker.ended.called:
                    log.warn("worker {index} (pid {pid}) did not stop in time; killing it",
                             index=worker.index, pid=worker.pid)
                    worker.signal("KILL")

        timer = self._reactor.callLater(self._shutdown_timeout + KILL_GRACE, kill)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        self._stopping = DeferredList([w.ended for w in workers]).addCallback(done)
        return self._stopping


# -- access log -------------------------------------------------------------------------------
class _WholeLines:
    """A write-only binary stream on a file descriptor that writes at most PIPE_BUF bytes per
    ``write`` call, cut at line ends: writes of that size to a pipe are atomic, so the lines of
    processes sharing stdout never interleave within a line (a single longer line still may)."""

    def __init__(
        self, fd: int, limit: int = select.PIPE_BUF, write: Callable[[int, Any], int] = os.write
    ) -> None:
        self._fd = fd
        self._limit = limit
        self._write = write

    def write(self, data: bytes) -> int:
        start = 0
        while start < len(data):
            end = start + self._limit
            if end < len(data):
                cut = data.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else data.find(b"\n", end) + 1 or len(data)
            view = memoryview(data)[start:end]
            while view:
                view = view[self._write(self._fd, view) :]
            start = end
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # stdout belongs to the process


def line_safe_access_log(config: ProxyConfig, reactor: Any) -> AccessLog:
    """``build_access_log`` for processes sharing stdout (files are opened with O_APPEND)."""
    if config.access_log != "stdout":
        return build_access_log(config.access_log, config.log_format, config.log_paths, reactor)
    writer = BufferedLines(reactor, stream=cast(IO[bytes], _WholeLines(1)))
    reactor.addSystemEventTrigger("after", "shutdown", writer.close)
    return AccessLog(config.log_format, config.log_paths, write=writer)
