"""--workers: the option, shared sockets, the certificate watcher, and real twistd processes.

The integration tests tell the processes apart through /proc: for a client connection they find
the server-side socket in /proc/net/tcp and the process holding it in /proc/PID/fd.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.certs import issue, loaded, make_ca
from tests.harness import DOMAIN, TWISTD, proxy_args
from tests.ports import free_port
from tests.standin import start_standin
from trackingproxy.acme.certwatch import CertificateWatcher
from trackingproxy.config import config_from_options, parse_workers
from trackingproxy.errors import ConfigError
from trackingproxy.ops.supervisor import SharedListeners, _WholeLines, parse_listen
from trackingproxy.options import Options
from trackingproxy.store.contract import StoredCertificate
from trackingproxy.store.files import FileStore
from trackingproxy.tls.sni import SNIContextMap

ROOT = Path(__file__).resolve().parent.parent


# -- units ------------------------------------------------------------------------------------
class OptionTests(SynchronousTestCase):
    def test_numbers_auto_and_refusals(self):
        """--workers takes 1-256 or auto (the CPUs this process may use); anything else is one
        ConfigError line naming the option; TRACKINGPROXY_WORKERS sets it too."""
        self.assertEqual(parse_workers("3"), 3)
        self.assertEqual(parse_workers(" AUTO "), len(os.sched_getaffinity(0)))
        for bad in ("0", "-1", "two", "257", ""):
            with self.assertRaises(ConfigError) as caught:
                parse_workers(bad)
            self.assertIn("--workers", caught.exception.message)
        opts = Options(environ={"TRACKINGPROXY_WORKERS": "2"})
        opts.parseOptions(["--domain", DOMAIN, "--no-acme", "--https-port", "none"])
        config = config_from_options(opts, datetime.datetime.now(datetime.UTC))
        self.assertEqual(config.workers, 2)
        opts = Options(environ={})
        opts.parseOptions(["--domain", DOMAIN, "--no-acme", "--https-port", "none"])
        self.assertEqual(config_from_options(opts, datetime.datetime.now(datetime.UTC)).workers, 1)

    def test_endpoints(self):
        """Only TCP endpoints (optionally behind haproxy:) can be shared; others are refused."""
        spec = parse_listen(reactor, "https-port", "tcp:443:interface=127.0.0.1:backlog=100")
        self.assertEqual((spec.family, spec.host, spec.port, spec.backlog, spec.wrapper),
                         (socket.AF_INET, "127.0.0.1", 443, 100, None))
        self.assertEqual(parse_listen(reactor, "http-port", "tcp6:80").family, socket.AF_INET6)
        self.assertEqual(parse_listen(reactor, "http-port", "tcp:80").host, "0.0.0.0")
        self.assertIsNotNone(parse_listen(reactor, "http-port", "haproxy:tcp:80").wrapper)
        with self.assertRaises(ConfigError) as caught:
            parse_listen(reactor, "http-port", "unix:/tmp/x.sock")
        self.assertIn("--workers", caught.exception.message)

    def test_one_port_many_sockets(self):
        """tcp:0 with 3 processes: three SO_REUSEPORT sockets on one ephemeral port; the parent
        serves on the first and keeps the other two for the workers."""
        shared = SharedListeners(reactor, 3)
        endpoint = shared.endpoint("http-port", "tcp:0:interface=127.0.0.1")
        port = self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        self.addCleanup(port.stopListening)
        self.addCleanup(shared.close)
        number = port.getHost().port
        held = [s for _, _, s in (shared.for_worker(1) + shared.for_worker(2))]
        self.assertEqual([s.getsockname() for s in held], [("127.0.0.1", number)] * 2)

    def test_whole_line_chunks(self):
        """Access lines go out in writes of at most PIPE_BUF bytes cut at line ends (a longer
        single line is written whole)."""
        writes: list[bytes] = []

        def record(fd: int, data: Any) -> int:
            writes.append(bytes(data))
            return len(data)

        lines = [b"a" * 5 + b"\n", b"b" * 7 + b"\n", b"c" * 30 + b"\n", b"d\n"]
        _WholeLines(1, limit=16, write=record).write(b"".join(lines))
        self.assertEqual(writes, [lines[0] + lines[1], lines[2], lines[3]])


class CertificateWatcherTests(SynchronousTestCase):
    def test_picks_up_what_another_process_saved(self):
        """The watcher serves the stored certificate at start and a renewed one at the next
        check, and leaves the SNI map alone while the files do not change."""
        state = Path(self.mktemp())
        clock = Clock()
        store = FileStore(state, clock)
        ca = make_ca()
        sni = SNIContextMap([DOMAIN])

        def save(cert: Any) -> None:
            lock = self.successResultOf(store.acquire(DOMAIN, 60))
            self.successResultOf(store.save(lock, StoredCertificate(cert)))
            self.successResultOf(store.release(lock))

        first, second = loaded(issue(ca, DOMAIN)), loaded(issue(ca, DOMAIN))
        save(first)
        watcher = CertificateWatcher(
            clock=clock, store=store, state_dir=state, sni=sni, domains=[DOMAIN], interval=5
        )
        changes: list[str] = []
        sni.add_listener(changes.append)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.assertEqual(sni.certificate_for(DOMAIN).serial_hex, first.serial_hex)
        clock.advance(5)
        self.assertEqual(changes, [DOMAIN])
        save(second)
        clock.advance(5)
        self.assertEqual(sni.certificate_for(DOMAIN).serial_hex, second.serial_hex)
        self.assertEqual(changes, [DOMAIN, DOMAIN])


# -- real processes ---------------------------------------------------------------------------


def _server_pid(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The process among ``pids`` holding the server side of 127.0.0.1:client_port's connection."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port):
                inode = fields[9]
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def _connect(port: int, pids: list[int], tls: ssl.SSLContext | None = None) -> tuple[Any, int]:
    """(connected socket, pid of the process that accepted it). Blocking: run in a thread."""
    import time

    sock: Any = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=DOMAIN)
    client_port = sock.getsockname()[1]
    for _ in range(200):
        pid = _server_pid(port, client_port, pids)
        if pid is not None:
            return sock, pid
        time.sleep(0.01)
    sock.close()
    raise AssertionError(f"no process among {pids} holds the connection from {client_port}")


def _get(sock: Any, path: str) -> int:
    """Send one request (Connection: close) on ``sock``; the status code. Blocking."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1])


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else -1
        self.ended.callback(code)


class WorkerProcessTests(TestCase):
    """``twistd trackingproxy --workers 2`` for real: a parent and one worker."""

    timeout = 60

    def spawn(self, args: list[str]) -> tuple[_Collect, int, int]:
        http, https = free_port(), free_port()
        args[args.index("--http-port") + 1] = f"tcp:{http}:interface=127.0.0.1"
        args[args.index("--https-port") + 1] = f"tcp:{https}:interface=127.0.0.1"
        proto = _Collect()
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
        reactor.spawnProcess(proto, sys.executable, [*TWISTD, *args, "--workers", "2"],
                             env=env, path=str(self.tmp))
        self.addCleanup(self._kill, proto)
        return proto, http, https

    def _kill(self, proto: _Collect) -> Deferred[int] | None:
        if not proto.ended.called:
            proto.transport.signalProcess("KILL")
            for pid in self.worker_pids(proto):  # they would stop by themselves; be quick
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return proto.ended
        return None

    @staticmethod
    def worker_pids(proto: _Collect) -> list[int]:
        return [int(p) for p in re.findall(rb"worker 1 started \(pid (\d+)\)", proto.out)]

    @inlineCallbacks
    def wait_for(self, proto: _Collect, pattern: bytes, count: int = 1, seconds: float = 20):
        for _ in range(int(seconds / 0.05)):
            if len(re.findall(pattern, proto.out)) >= count or proto.ended.called:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(len(re.findall(pattern, proto.out)), count, proto.out.decode())

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).resolve()
        self.tmp.mkdir(parents=True)
        self.ca = make_ca()
        self.standin = start_standin(self.ca)
        self.addCleanup(self.standin.port.stopListening)

    @inlineCallbacks
    def test_both_serve_and_the_worker_follows_renewals(self):
        """With ACME (the built-in CA): HTTPS connections are spread over both processes, both
        serve the certificate the parent obtained, and a certificate saved into the state
        directory later is served by the worker on new connections without a restart."""
        state = self.tmp / "state"
        args = proxy_args(self.tmp, self.ca, self.standin)
        args.remove("--no-acme")
        i = args.index("--cert")
        del args[i : i + 4]  # no --cert/--key: ACME manages both domains
        args += ["--acme-directory", "local", "--state-dir", str(state)]
        proto, _, https = self.spawn(args)
        yield self.wait_for(proto, rb"worker 1 \(pid \d+\) running")
        pids = [proto.transport.pid, *self.worker_pids(proto)]
        yield self.wait_for(proto, rb"serving certificate .* \(from the state directory\)",
                            seconds=15)
        trusting = ssl.create_default_context(cafile=str(state / "local-ca.pem"))
        served: dict[int, int] = {}
        for _ in range(20):
            sock, pid = yield deferToThread(_connect, https, pids, trusting)
            status = yield deferToThread(_get, sock, "/q/1")
            self.assertEqual(status, 200)
            served[pid] = served.get(pid, 0) + 1
        self.assertEqual(set(served), set(pids), served)

        renewed = loaded(issue(self.ca, DOMAIN))
        store = FileStore(state, reactor)
        lock = self.successResultOf(store.acquire(DOMAIN, 60))
        self.successResultOf(store.save(lock, StoredCertificate(renewed)))
        self.successResultOf(store.release(lock))
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        worker = pids[1]
        serial = None
        for _ in range(150):  # the watcher checks every 5 s
            sock, pid = yield deferToThread(_connect, https, pids, unverified)
            der = sock.getpeercert(binary_form=True)
            sock.close()
            if pid == worker:
                from cryptography import x509

                serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
                if serial == renewed.serial_hex:
                    break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(serial, renewed.serial_hex)
        proto.transport.signalProcess("TERM")
        self.assertEqual((yield proto.ended), 0, proto.out.decode())

    @inlineCallbacks
    def test_signals_restart_and_graceful_stop(self):
        """SIGHUP reaches the worker (both reload); a killed worker is started again and serves;
        SIGTERM to the parent lets requests in flight in both processes finish, stops the
        worker and exits 0."""
        proto, http, _ = self.spawn(proxy_args(self.tmp, self.ca, self.standin))
        yield self.wait_for(proto, rb"worker 1 \(pid \d+\) running")
        parent, first = proto.transport.pid, self.worker_pids(proto)[0]

        os.kill(parent, signal.SIGHUP)
        yield self.wait_for(proto, rb"Reloaded: ", count=2)
        self.assertIn(b"worker 1 trackingproxy.ops.reload#info] Reloaded", proto.out)

        os.kill(first, signal.SIGKILL)
        yield self.wait_for(proto, rb"worker 1 started \(pid \d+\)", count=2)
        yield self.wait_for(proto, rb"worker 1 \(pid \d+\) running", count=2)
        second = self.worker_pids(proto)[-1]
        self.assertNotEqual(second, first)
        self.assertIn(b"exited (killed by signal 9); starting it again", proto.out)

        # One slow request (the stand-in answers /delay/ after 1 s) held by each process.
        held: dict[int, Any] = {}
        for _ in range(60):
            sock, pid = yield deferToThread(_connect, http, [parent, second])
            if pid in held:
                sock.close()
            else:
                held[pid] = sock
            if len(held) == 2:
                break
        self.assertEqual(set(held), {parent, second})
        pending = [deferToThread(_get, sock, "/delay/q/1") for sock in held.values()]
        for _ in range(100):
            if len(self.standin.seen) >= 2:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        proto.transport.signalProcess("TERM")
        for d in pending:
            self.assertEqual((yield d), 200)
        self.assertEqual((yield proto.ended), 0, proto.out.decode())
        self.assertIn(b"worker 1 (pid %d) stopped (exit status 0)" % second, proto.out)
        self.assertFalse(Path(f"/proc/{second}").exists())
