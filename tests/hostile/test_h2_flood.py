"""Control-frame floods from a client that never reads, against the real proxy (in this process,
both HTTP/2 engines) over real TLS on loopback: the proxy stops reading from a client whose
answers it cannot send, so what it holds for that connection stays bounded; and in memory, the
engines' flood guards: output held while the transport is full, GOAWAY(ENHANCE_YOUR_CALM) when
a paused client keeps asking for answers."""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

from attrs import define
from hyperframe.frame import GoAwayFrame
from twisted.internet import reactor, tcp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import DOMAIN, start_proxy_for
from tests.hostile.h2client import Request, exchange
from tests.server.test_http2 import _frames, _Peer, _Server
from trackingproxy.server.http2 import ENHANCE_YOUR_CALM, H2ServerBase
from trackingproxy.server.http2_nghttp2 import NativeH2Connection
from trackingproxy.server.http2_python import PythonH2Connection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
FLOOD_SECONDS = 3.0  # the client sends for at most this long...
FLOOD_BYTES = 16 * 1024 * 1024  # ...or this many bytes of PING frames
SETTLE_SECONDS = 4.0  # then the proxy reads what it has received, or stops reading
# What the proxy may hold for the flooding connection (its socket buffer and TLS layer): the
# transport's high-water mark (64 KiB) and one write beyond it, as TLS records. Before the
# fix, every ACK the kernel could not take piled up there: 10 MiB and more in these seconds.
HELD_LIMIT = 1024 * 1024
SIOCINQ = 0x541B  # Linux: bytes received on a socket and not read yet (FIONREAD)


def _ping(n: int) -> bytes:
    return struct.pack(">I", 8)[1:] + b"\x06\x00" + b"\x00\x00\x00\x00" + struct.pack(">Q", n)


@define
class Flood:
    sent: int  # bytes of PING frames the kernel took
    sock: socket.socket  # still open: closed by the test once it has measured


def flood(port: int, ca_file: str) -> Flood:
    """Handshake (TLS, ALPN h2, preface), then send PING frames and read nothing. TLS runs in
    memory BIOs, so sending never blocks in the middle of a record."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["h2"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the proxy's output backs up
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=DOMAIN)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise AssertionError("closed during the handshake") from None
            incoming.write(data)
    if tls.selected_alpn_protocol() != "h2":
        raise AssertionError(f"ALPN chose {tls.selected_alpn_protocol()!r}")
    tls.write(PREFACE + SETTINGS)
    block = b"".join(_ping(i) for i in range(900))  # under one TLS record
    pending = bytearray(outgoing.read())
    sent = 0
    sock.setblocking(False)
    deadline = time.monotonic() + FLOOD_SECONDS
    while sent < FLOOD_BYTES and time.monotonic() < deadline:
        if len(pending) < 65536:
            tls.write(block)
            pending += outgoing.read()
        try:
            n = sock.send(pending)
        except BlockingIOError:
            n = 0
        except OSError:
            break  # the proxy closed the connection (GOAWAY, then close)
        del pending[:n]
        sent += n
        time.sleep(0.001)  # let the reactor (this process) take its share
    return Flood(sent, sock)


def _server_side(port: int) -> list[tcp.Server]:
    """The proxy's TCP connections to ``port`` (those registered with the reactor)."""
    fds = set(reactor.getReaders()) | set(reactor.getWriters())  # type: ignore[attr-defined]
    return [fd for fd in fds if isinstance(fd, tcp.Server) and fd.getHost().port == port]


def _held(connection: tcp.Server) -> int:
    """Bytes the proxy holds to send on ``connection``: its TCP transport's buffer and its TLS
    layer's (Twisted's private state, read only)."""
    total = len(connection.dataBuffer) - connection.offset + connection._tempDataLen
    tls: Any = connection.protocol
    total += sum(map(len, getattr(tls, "_appSendBuffer", None) or ()))
    aggregator = getattr(tls, "_aggregator", None)
    return total + sum(map(len, getattr(aggregator, "_buffer", None) or ()))


def _unread(connection: tcp.Server) -> int:
    raw = fcntl.ioctl(connection.socket.fileno(), SIOCINQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _request(path: str) -> Request:
    return Request(
        [(":method", "GET"), (":scheme", "https"), (":authority", DOMAIN), (":path", path)]
    )


class _PingFloodCases:
    engine: str
    timeout = 30
    mktemp: Any
    addCleanup: Any
    assertEqual: Any
    assertIn: Any
    assertLess: Any
    assertGreater: Any

    def setUp(self) -> None:
        self.running, self.ca_file = start_proxy_for(self, "--http2-engine", self.engine)

    @inlineCallbacks
    def test_ping_flood_from_a_client_that_never_reads_stays_bounded(self) -> Any:
        """A client floods PINGs (up to 16 MiB, 3 s) and never reads: the proxy stops reading
        from it (or closes it) instead of buffering ACKs, holds at most ``HELD_LIMIT`` for it
        meanwhile, and a new connection is served afterwards."""
        port = self.running.https_port
        peak = [0]

        def sample() -> None:
            for connection in _server_side(port):
                peak[0] = max(peak[0], _held(connection))

        sampler = LoopingCall(sample)
        sampler.start(0.01)
        rss_before = _rss_mib()
        try:
            result: Flood = yield deferToThread(flood, port, self.ca_file)
            # The proxy works through what it has received, unless it stopped reading.
            state = "reading"
            deadline = time.monotonic() + SETTLE_SECONDS
            while time.monotonic() < deadline:
                connections = _server_side(port)
                if not connections:
                    state = "closed"
                    break
                (connection,) = connections
                if connection not in reactor.getReaders():  # type: ignore[attr-defined]
                    state = "not reading"
                    break
                if not _unread(connection):
                    state = "read it all"
                    break
                yield deferLater(reactor, 0.02)
        finally:
            sampler.stop()
        sample()
        rss_growth = _rss_mib() - rss_before
        result.sock.close()
        print(
            f"\n{self.engine}: flood of {result.sent} B, proxy {state}, held at most"
            f" {peak[0]} B, RSS {rss_growth:+.1f} MiB"
        )
        self.assertGreater(result.sent, 2 * HELD_LIMIT)  # a flood indeed
        self.assertLess(peak[0], HELD_LIMIT)
        self.assertIn(state, ("not reading", "closed"))
        (outcome,) = yield deferToThread(
            exchange, port, DOMAIN, self.ca_file, [_request("/q/after-flood")]
        )
        self.assertEqual(outcome.status, 200, outcome.describe())


class Nghttp2PingFloodTests(_PingFloodCases, TestCase):
    engine = "nghttp2"


class PythonPingFloodTests(_PingFloodCases, TestCase):
    engine = "python"


def _settings_frame() -> bytes:
    return SETTINGS  # empty: the server answers with a SETTINGS ACK


class _PausedCases:
    """In memory: the transport pauses the connection as a full buffer would."""

    engine: type[H2ServerBase]
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertIsNone: Any
    assertIsNotNone: Any
    assertLess: Any

    def _paused_peer(self) -> _Peer:
        peer = _Peer(self.engine, _Server())
        peer.transport.clear()
        (peer.transport.producer or peer.conn).pauseProducing()
        return peer

    def test_paused_connection_stops_reading_and_holds_its_output(self) -> None:
        """While its transport is full the connection has the transport stop reading and
        writes nothing; once resumed it reads again and the answers held back (a PING ACK)
        leave."""
        peer = self._paused_peer()
        self.assertIsNotNone(peer.transport.producer)  # registered from the start
        self.assertEqual(peer.transport.producerState, "paused")
        peer.conn.dataReceived(_ping(7))
        self.assertEqual(peer.transport.value(), b"")
        peer.transport.producer.resumeProducing()
        self.assertEqual(peer.transport.producerState, "producing")
        frames = _frames(peer.transport.value())
        self.assertEqual([(f.type, f.flags) for f in frames], [(0x6, {"ACK"})])

    def test_control_frame_flood_while_paused_gets_goaway_enhance_your_calm(self) -> None:
        """A client that keeps sending PINGs, or SETTINGS, while the connection cannot send
        (it does not read) gets GOAWAY(ENHANCE_YOUR_CALM) once about 1000 ACKs are held back;
        the connection closes (unregistered first: TLS would hold the close back) and what it
        wrote stays small."""
        for name, frame in (("PING", _ping), ("SETTINGS", lambda i: _settings_frame())):
            peer = self._paused_peer()
            for start in range(0, 3000, 900):  # one TLS record of frames per read
                peer.conn.dataReceived(b"".join(frame(i) for i in range(start, start + 900)))
                if peer.transport.disconnecting:
                    break
            written = peer.transport.value()
            goaway = [f for f in _frames(written) if isinstance(f, GoAwayFrame)]
            self.assertEqual([g.error_code for g in goaway], [ENHANCE_YOUR_CALM], name)
            self.assertTrue(peer.transport.disconnecting, name)
            self.assertIsNone(peer.transport.producer, name)
            self.assertLess(len(written), 64 * 1024, name)

    def test_control_frames_while_reading_are_all_answered(self) -> None:
        """The flood guard counts only what is held back: 4500 PINGs read in records of 900,
        each record's ACKs sent before the next, are all answered and nothing is closed."""
        peer = _Peer(self.engine, _Server())
        peer.transport.clear()
        for start in range(0, 4500, 900):
            peer.conn.dataReceived(b"".join(_ping(i) for i in range(start, start + 900)))
        frames = _frames(peer.transport.value())
        self.assertEqual(len(frames), 4500)
        self.assertTrue(all(f.type == 0x6 and "ACK" in f.flags for f in frames))
        self.assertFalse(peer.transport.disconnecting)

    def test_goaway_at_shutdown_leaves_even_while_paused(self) -> None:
        """Shutdown on a connection whose transport is full still sends its GOAWAY(NO_ERROR)
        and closes (unregistered): a paused connection never holds the shutdown back."""
        peer = self._paused_peer()
        peer.conn.shutdown_notice()
        goaway = [f for f in _frames(peer.transport.value()) if isinstance(f, GoAwayFrame)]
        self.assertEqual([g.error_code for g in goaway], [0])
        self.assertTrue(peer.transport.disconnecting)
        self.assertIsNone(peer.transport.producer)

    def test_closed_connection_whose_client_takes_nothing_is_aborted(self) -> None:
        """A connection closed (here at the idle timeout) whose client takes none of what is
        left to send is aborted one idle timeout later, not kept for good."""
        server = _Server()
        peer = _Peer(self.engine, server)
        for _ in range(12):
            if peer.transport.disconnecting:
                break
            server.clock.advance(server.idle_timeout / 4)
        self.assertTrue(peer.transport.disconnecting)
        self.assertFalse(peer.transport.disconnected)
        server.clock.advance(server.idle_timeout)
        self.assertTrue(peer.transport.disconnected)  # StringTransport.abortConnection
        peer.conn.connectionLost()
        self.assertEqual(server.clock.getDelayedCalls(), [])


class NativePausedTests(_PausedCases, SynchronousTestCase):
    engine = NativeH2Connection


class PythonPausedTests(_PausedCases, SynchronousTestCase):
    engine = PythonH2Connection
