"""A ``--workers`` child process: ``python -m trackingproxy.worker``, spawned by the parent only.

It reads one JSON line from fd 3 (its index, the parent's parsed options, which inherited
file descriptors are its listening sockets and which one takes its metrics reports), builds
the same service tree as the parent with three differences (listeners adopted from the
inherited sockets, a certificate watcher instead of the ACME issuer, a metrics reporter writing
to fd 4 instead of the admin listener), and runs it until SIGTERM or until fd 3 reaches end of
file (the parent is gone). SIGTERM drains the requests in flight like the parent does; SIGHUP
reloads the files. See ``trackingproxy.ops.supervisor`` for the whole design and
``trackingproxy.admin.workers`` for the metrics.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import (
    FileLogObserver,
    Logger,
    formatEventAsClassicLogText,
    globalLogBeginner,
)

from trackingproxy.acme.certwatch import build_worker_acme
from trackingproxy.admin.workers import worker_admin
from trackingproxy.config import config_from_options
from trackingproxy.errors import ConfigError, exit_with
from trackingproxy.logs.jsonlines import JSONLinesObserver
from trackingproxy.ops import tcpwrite
from trackingproxy.ops.supervisor import line_safe_access_log, parse_listen
from trackingproxy.service import TrackingProxyService, build_service

__all__ = ["main"]

log = Logger(namespace="trackingproxy.worker")
CONTROL_FD = 3


class _AdoptedEndpoint:
    """An IStreamServerEndpoint listening on an inherited, already listening socket."""

    def __init__(self, reactor: Any, fd: int, description: str, option: str) -> None:
        self._reactor = reactor
        self._fd = fd
        self._spec = parse_listen(reactor, option, description)

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        wrapper = self._spec.wrapper
        try:
            port = self._reactor.adoptStreamPort(
                self._fd, self._spec.family, wrapper(factory) if wrapper else factory
            )
        except Exception:
            return fail()
        finally:
            os.close(self._fd)  # adoptStreamPort made its own copy
        return succeed(port)


class _ParentWatch:
    """Reads fd 3 (the parent keeps its end open); end of file means the parent is gone."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._reactor.removeReader(self)
            log.warn("The parent process is gone; stopping")
            _stop(self._reactor)

    def connectionLost(self, reason: object) -> None:
        pass


class _ReportPipe:
    """The worker's end of the metrics pipe: whole report lines, written without blocking.

    While a line is still being written, a newer one replaces the one waiting (each report
    holds the full totals, so only the latest matters); a closed pipe (the parent is gone)
    ends the reports quietly.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._pending = memoryview(b"")
        self._next: bytes | None = None
        self._waiting = False  # registered as a writer
        self._closed = False
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "metrics-pipe"

    def send(self, line: bytes) -> None:
        if self._closed:
            return
        if self._pending:
            self._next = line
            return
        self._pending = memoryview(line)
        self.doWrite()

    def doWrite(self) -> None:
        while self._pending:
            try:
                written = os.write(self._fd, self._pending)
            except BlockingIOError:
                if not self._waiting:
                    self._waiting = True
                    self._reactor.addWriter(self)
                return
            except OSError:  # EPIPE: the parent is gone (the control pipe says so too)
                self._closed = True
                self._pending, self._next = memoryview(b""), None
                break
            self._pending = self._pending[written:]
            if not self._pending and self._next is not None:
                self._pending, self._next = memoryview(self._next), None
        if self._waiting:
            self._waiting = False
            self._reactor.removeWriter(self)

    def connectionLost(self, reason: object) -> None:
        pass


def _no_admin(*args: object) -> None:
    return None


def _stop(reactor: Any) -> None:
    if reactor.running and not getattr(reactor, "_trackingproxy_stopping", False):
        reactor._trackingproxy_stopping = True
        reactor.stop()


def _read_spec(fd: int) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            sys.exit("trackingproxy worker: the parent closed the control pipe before the spec")
        data += chunk
    spec: dict[str, Any] = json.loads(data)
    return spec


def _start_logging(index: int, json_format: bool) -> None:
    if json_format:
        observer: Any = JSONLinesObserver(sys.stdout)
    else:
        def text(event: Any) -> str | None:
            level = getattr(event.get("log_level"), "name", "info")
            namespace = event.get("log_namespace", "log_legacy")
            where = "-" if namespace == "log_legacy" else f"{namespace}#{level}"
            return formatEventAsClassicLogText({**event, "log_system": f"worker {index} {where}"})

        observer = FileLogObserver(sys.stdout, text)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM instead
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the service installs its reload
    spec = _read_spec(CONTROL_FD)
    index = int(spec["index"])
    options: dict[str, Any] = spec["options"]
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    _start_logging(index, options.get("log-format") == "json")
    try:
        now = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
        config = evolve(config_from_options(options, now), workers=1)
        report_fd = spec.get("report_fd")  # None: the parent has no admin listener
        admin_builder: Any = _no_admin
        if report_fd is not None:
            admin_builder = worker_admin(_ReportPipe(reactor, int(report_fd)).send)
        tcpwrite.install()
        fds = {item["option"]: (int(item["fd"]), item["description"])
               for item in spec["listeners"]}

        def listen(option: str, description: str) -> object:
            fd, _ = fds[option]
            return _AdoptedEndpoint(reactor, fd, description, option)

        service: TrackingProxyService = build_service(
            config, reactor, listen=listen, acme_builder=build_worker_acme,
            access_log=line_safe_access_log(config, reactor), admin_builder=admin_builder,
        )
    except ConfigError as e:
        exit_with(e.message)
    service.install_signals = True  # SIGHUP reloads; the GC is tuned once running
    service.privilegedStartService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(service.startService)
    reactor.addReader(_ParentWatch(reactor, CONTROL_FD))
    signal.signal(signal.SIGTERM, lambda n, f: reactor.callFromThread(_stop, reactor))
    log.info("worker {index} (pid {pid}) running", index=index, pid=os.getpid())
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()
