"""Raw loopback clients for the resource matrix (``test_resource_matrix``): a non-blocking
socket, plain or TLS over memory BIOs (a write never blocks in the middle of a record, and a
client may stop reading for good), the HTTP/2 frames a hostile client sends, built by hand
(hpack for the header blocks) so nothing checks them on the way out, and a small reader of what
the server answers (statuses, resets, GOAWAY, EOF).

Each attack here is bounded in time and bytes and blocking: tests run it in a thread
(``deferToThread``) while the proxy runs in the reactor of the same process.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence

import hpack
from attrs import define, field

from tests.harness import DOMAIN

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
CANCEL = 0x8
MAX_WINDOW = 2**31 - 1
SMALL_RCVBUF = 4096  # a client that never reads: the proxy's output backs up at once


class Wire:
    """One client connection, plain or TLS (memory BIOs), non-blocking after the handshake.

    @ivar sent: bytes the kernel took from us.
    @ivar eof: the server closed the connection (FIN, reset, TLS close_notify).
    """

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None) -> None:
        self.sock = sock
        self.tls = tls
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.pending = bytearray()
        self.sent = 0
        self.eof = False
        self.opened = time.monotonic()

    @classmethod
    def connect(
        cls,
        port: int,
        ca_file: str | None = None,
        alpn: str | None = None,
        rcvbuf: int | None = None,
    ) -> Wire:
        """Connect to 127.0.0.1:``port``; with ``ca_file``, complete a TLS handshake for
        ``DOMAIN`` offering ``alpn`` (and check the server chose it)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        wire = cls(sock)
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=ca_file)
            if alpn is not None:
                ctx.set_alpn_protocols([alpn])
            tls = ctx.wrap_bio(wire.incoming, wire.outgoing, server_hostname=DOMAIN)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(wire.outgoing.read())
                    data = sock.recv(65536)
                    if not data:
                        raise AssertionError("closed during the handshake") from None
                    wire.incoming.write(data)
            sock.sendall(wire.outgoing.read())
            if alpn is not None and tls.selected_alpn_protocol() != alpn:
                raise AssertionError(f"ALPN chose {tls.selected_alpn_protocol()!r}, not {alpn}")
            wire.tls = tls
        sock.setblocking(False)
        return wire

    def write(self, data: bytes) -> None:
        """Queue ``data`` (encrypted at once on TLS); `flush` sends it."""
        if self.tls is None:
            self.pending += data
        else:
            self.tls.write(data)
            self.pending += self.outgoing.read()

    def flush(self) -> bool:
        """Send what the kernel takes now; True once nothing is pending."""
        while self.pending and not self.eof:
            try:
                n = self.sock.send(self.pending)
            except BlockingIOError:
                return False
            except OSError:
                self.eof = True  # the server closed (reset) the connection
                return False
            del self.pending[:n]
            self.sent += n
        return not self.pending

    def receive(self) -> bytes:
        """What has arrived (decrypted), without waiting; sets ``eof`` when the server closed."""
        got = bytearray()
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
            if self.tls is None:
                got += data
            elif data:
                self.incoming.write(data)
        if self.tls is not None:
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLError):
                    self.eof = True
                    break
                if not chunk:  # close_notify
                    self.eof = True
                    break
                got += chunk
            self.pending += self.outgoing.read()  # e.g. a key update
        return bytes(got)

    def close(self, reset: bool = False) -> None:
        """Close; with ``reset``, abortively (RST: SO_LINGER 0)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -- HTTP/2 frames -----------------------------------------------------------------------------
def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream_id)
        + payload
    )


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def ping(n: int) -> bytes:
    return frame(PING, 0, 0, struct.pack(">Q", n))


def rst_stream(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def data(stream_id: int, payload: bytes, end: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end else 0, stream_id, payload)


def open_windows() -> bytes:
    """SETTINGS_INITIAL_WINDOW_SIZE and the connection window at their largest: only the
    transport holds the server's output back."""
    return settings((0x4, MAX_WINDOW)) + frame(
        WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535)
    )


class Streams:
    """Request HEADERS frames on one connection (one HPACK encoder, streams 1, 3, 5...)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.next_id = 1

    def request(
        self,
        path: str,
        method: str = "GET",
        end: bool = True,
        extra: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        sid, self.next_id = self.next_id, self.next_id + 2
        block = self.encoder.encode(
            [
                (":method", method),
                (":scheme", "https"),
                (":authority", DOMAIN),
                (":path", path),
                *extra,
            ]
        )
        return sid, frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block)


@define
class H2Reader:
    """What the server sent on one connection, frame by frame."""

    buffer: bytearray = field(factory=bytearray)
    decoder: hpack.Decoder = field(factory=hpack.Decoder)
    statuses: dict[int, int] = field(factory=dict)
    resets: dict[int, int] = field(factory=dict)
    goaway: int | None = None
    settings: int = 0  # SETTINGS frames (not ACKs) to acknowledge
    ping_acks: int = 0
    _block: bytearray = field(factory=bytearray)
    _block_stream: int = 0

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                return
            kind, flags = self.buffer[3], self.buffer[4]
            sid = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buffer[9 : 9 + length])
            del self.buffer[: 9 + length]
            self._frame(kind, flags, sid, payload)

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY:
                    payload = payload[5:]
                self._block, self._block_stream = bytearray(), sid
            self._block += payload
            if flags & END_HEADERS:
                for name, value in self.decoder.decode(bytes(self._block), raw=True):
                    if name == b":status":
                        self.statuses[self._block_stream] = int(value)
        elif kind == RST_STREAM:
            self.resets[sid] = int.from_bytes(payload[:4], "big")
        elif kind == GOAWAY:
            self.goaway = int.from_bytes(payload[4:8], "big")
        elif kind == SETTINGS and not flags & ACK:
            self.settings += 1
        elif kind == PING and flags & ACK:
            self.ping_acks += 1


def h2_connect(port: int, ca_file: str, rcvbuf: int | None = None, prelude: bytes = b"") -> Wire:
    """A TLS connection with ALPN h2 whose preface (and an empty SETTINGS, then ``prelude``)
    is queued."""
    wire = Wire.connect(port, ca_file, "h2", rcvbuf)
    wire.write(PREFACE + settings() + prelude)
    return wire


def h2_poll(wire: Wire, reader: H2Reader) -> None:
    """Read what arrived, acknowledge the server's SETTINGS, send what is pending."""
    reader.feed(wire.receive())
    while reader.settings:
        reader.settings -= 1
        wire.write(frame(SETTINGS, ACK, 0))
    wire.flush()


# -- attacks (each bounded in time and bytes) ----------------------------------------------------
def _h1_head(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"{path} HTTP/1.1", f"Host: {DOMAIN}", *extra, "", ""]).encode()


def _hold(wires: Sequence[Wire], until: float, more: Callable[[int], bytes] | None = None) -> int:
    """Until ``until`` (monotonic), send what is pending on ``wires`` (and ``more(i)``, while
    less than 64 KiB waits) and read nothing; bytes sent."""
    total = 0
    while time.monotonic() < until:
        for i, wire in enumerate(wires):
            if more is not None and len(wire.pending) < 65536 and not wire.eof:
                wire.write(more(i))
            before = wire.sent
            wire.flush()
            total += wire.sent - before
        time.sleep(0.002)  # let the reactor (this process) take its share
    return total


def unread_h1(port: int, ca_file: str | None, conns: int, requests: int, seconds: float) -> int:
    """``conns`` connections (TLS with ALPN http/1.1 when ``ca_file`` is given) each pipeline
    ``requests`` GETs of /big (1 MiB answers) at once and never read for ``seconds``; then
    they are reset. Bytes sent."""
    wires = [
        Wire.connect(port, ca_file, "http/1.1" if ca_file else None, SMALL_RCVBUF)
        for _ in range(conns)
    ]
    for c, wire in enumerate(wires):
        wire.write(b"".join(_h1_head(f"GET /big/{c}-{i}") for i in range(requests)))
    sent = _hold(wires, time.monotonic() + seconds)
    for wire in wires:
        wire.close(reset=True)
    return sent


def unread_h2(port: int, ca_file: str, conns: int, streams: int, seconds: float) -> int:
    """Over ``seconds``, one connection after another (``conns`` in all, flow-control windows
    wide open) sends ``streams`` GETs of /big at once (within the 100 concurrent streams) and
    never reads; then all are reset. Bytes sent."""
    wires: list[Wire] = []
    start = time.monotonic()
    sent = 0
    for c in range(conns):
        requests = Streams()
        blocks = [requests.request(f"/big/{c}-{i}")[1] for i in range(streams)]
        wires.append(h2_connect(port, ca_file, SMALL_RCVBUF, open_windows() + b"".join(blocks)))
        sent += _hold(wires, start + (c + 1) * seconds / conns)
    for wire in wires:
        wire.close(reset=True)
    return sent


@define
class Flood:
    sent: int  # bytes of frames the kernel took
    closed: bool  # the server closed the connection (a send failed)


def control_flood(
    port: int, ca_file: str, one: Callable[[int], bytes], seconds: float, limit: int
) -> Flood:
    """One connection sends ``one(i)`` frames, 900 to a write (one TLS record), for ``seconds``
    or ``limit`` bytes, and never reads; it stays open 0.5 s more, then is reset."""
    wire = h2_connect(port, ca_file, SMALL_RCVBUF)
    count = [0]

    def block(_: int) -> bytes:
        start, count[0] = count[0], count[0] + 900
        return b"".join(one(n) for n in range(start, start + 900))

    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline and sent < limit and not wire.eof:
        sent += _hold([wire], min(deadline, time.monotonic() + 0.05), block)
    _hold([wire], time.monotonic() + 0.5)
    closed = wire.eof
    wire.close(reset=True)
    return Flood(sent, closed)


@define
class Ending:
    """How one connection of a slow or idle client ended, in seconds since it was opened."""

    status: int | None = None  # the answer (HTTP/1.1 status, or :status of the stream)
    reset: int | None = None  # RST_STREAM error code of the stream
    goaway: int | None = None
    answered_after: float | None = None
    closed_after: float | None = None  # None: still open when the client gave up


def _every_tenth(
    wires: Sequence[Wire], seconds: float, step: Callable[[int, Wire, Ending], None]
) -> list[Ending]:
    """Every 0.1 s, for ``seconds`` or until the server has closed all ``wires``, run
    ``step(i, wire, ending)`` for those still open, noting when the server closed each; then
    reset what is left."""
    endings = [Ending() for _ in wires]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(e.closed_after is None for e in endings):
        for i, (wire, ending) in enumerate(zip(wires, endings, strict=True)):
            if ending.closed_after is None:
                step(i, wire, ending)
                if wire.eof:
                    ending.closed_after = time.monotonic() - wire.opened
        time.sleep(0.1)
    for wire in wires:
        wire.close(reset=True)
    return endings


def slow_bodies_h1(port: int, clients: int, seconds: float) -> list[Ending]:
    """``clients`` connections each send a POST head announcing 1000 body bytes, then trickle
    the body a byte every 0.1 s until answered; each then waits for the server to close."""
    wires = [Wire.connect(port) for _ in range(clients)]
    received = [bytearray() for _ in wires]
    for i, wire in enumerate(wires):
        wire.write(_h1_head(f"POST /f/slow-{i}", "Content-Length: 1000"))

    def step(i: int, wire: Wire, ending: Ending) -> None:
        if ending.status is None:
            wire.write(b"x")
        wire.flush()
        got = received[i]
        got += wire.receive()
        if ending.status is None and got.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in got:
            ending.status, ending.answered_after = int(got[9:12]), time.monotonic() - wire.opened

    return _every_tenth(wires, seconds, step)


def slow_bodies_h2(port: int, ca_file: str, clients: int, seconds: float) -> list[Ending]:
    """``clients`` HTTP/2 connections each open a POST stream announcing 1000 body bytes and
    trickle it in DATA frames of one byte every 0.1 s until the stream is answered or reset;
    each then waits (reading) for the server to close the connection."""
    wires = []
    for i in range(clients):
        head = Streams().request(f"/f/slow-{i}", "POST", False, [("content-length", "1000")])[1]
        wires.append(h2_connect(port, ca_file, prelude=head))
    readers = [H2Reader() for _ in wires]

    def step(i: int, wire: Wire, ending: Ending) -> None:
        reader = readers[i]
        if 1 not in reader.statuses and 1 not in reader.resets and reader.goaway is None:
            wire.write(data(1, b"x"))
        h2_poll(wire, reader)
        if ending.answered_after is None and (1 in reader.statuses or 1 in reader.resets):
            ending.answered_after = time.monotonic() - wire.opened
        ending.status, ending.reset = reader.statuses.get(1), reader.resets.get(1)
        ending.goaway = reader.goaway

    return _every_tenth(wires, seconds, step)


def aborts_h1(port: int, ca_file: str | None, clients: int) -> None:
    """``clients`` connections (TLS with ``ca_file``) each send a click and close at once,
    every other one with a reset instead of a FIN."""
    for i in range(clients):
        wire = Wire.connect(port, ca_file, "http/1.1" if ca_file else None)
        wire.write(_h1_head(f"GET /f/gone-{i}"))
        _flush_all(wire)
        wire.close(reset=bool(i % 2))


def aborts_h2(port: int, ca_file: str, conns: int, streams: int) -> list[H2Reader]:
    """``conns`` connections each open ``streams`` click streams and reset each (RST_STREAM
    (CANCEL)): the first half in the write that opens them, the others 50 ms later (their
    requests are on their way upstream by then); fewer resets than the rapid-reset guard
    tolerates. Each connection reads for 0.2 s more, then closes."""
    readers = []
    for c in range(conns):
        requests = Streams()
        at_once, later = bytearray(), bytearray()
        for i in range(streams):
            sid, block = requests.request(f"/f/gone-{c}-{i}")
            if i < streams // 2:
                at_once += block + rst_stream(sid)
            else:
                at_once += block
                later += rst_stream(sid)
        wire = h2_connect(port, ca_file, prelude=bytes(at_once))
        reader = H2Reader()
        for until, then in ((0.05, bytes(later)), (0.2, b"")):
            deadline = time.monotonic() + until
            while time.monotonic() < deadline and not wire.eof:
                h2_poll(wire, reader)
                time.sleep(0.01)
            wire.write(then)
        wire.close()
        readers.append(reader)
    return readers


@define
class RapidReset:
    pairs: int  # HEADERS + RST_STREAM pairs sent
    goaway: int | None
    closed_after: float | None  # seconds from the last pair sent to the close


def rapid_reset(port: int, ca_file: str, most: int, seconds: float) -> RapidReset:
    """One connection sends HEADERS for an upstream path and RST_STREAM(CANCEL) at once, 20
    pairs a write, until GOAWAY, ``most`` pairs or ``seconds``; then reads until the close."""
    wire, reader, requests = h2_connect(port, ca_file), H2Reader(), Streams()
    pairs = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and pairs < most and reader.goaway is None and not wire.eof:
        for _ in range(20):
            sid, block = requests.request(f"/q/rr-{pairs}")
            wire.write(block + rst_stream(sid))
            pairs += 1
        h2_poll(wire, reader)
        time.sleep(0.005)
    stopped = time.monotonic()
    while time.monotonic() < stopped + 3 and not wire.eof:
        h2_poll(wire, reader)
        time.sleep(0.01)
    closed = time.monotonic() - stopped if wire.eof else None
    wire.close(reset=True)
    return RapidReset(pairs, reader.goaway, closed)


def idle_pings_h2(port: int, ca_file: str, conns: int, seconds: float) -> list[Ending]:
    """``conns`` HTTP/2 connections send nothing but a PING every 0.1 s (and the SETTINGS
    ACK), reading, until the server closes them or ``seconds`` pass."""
    wires = [h2_connect(port, ca_file) for _ in range(conns)]
    readers = [H2Reader() for _ in wires]

    def step(i: int, wire: Wire, ending: Ending) -> None:
        wire.write(ping(i))
        h2_poll(wire, readers[i])
        ending.goaway = readers[i].goaway

    return _every_tenth(wires, seconds, step)


def idle_blank_lines_h1(port: int, conns: int, seconds: float) -> list[Ending]:
    """``conns`` HTTP/1.1 connections send nothing but an empty line (CRLF, which a server
    skips before a request line) every 0.1 s, until the server closes them or ``seconds``."""

    def step(i: int, wire: Wire, ending: Ending) -> None:
        wire.write(b"\r\n")
        wire.flush()
        wire.receive()

    return _every_tenth([Wire.connect(port) for _ in range(conns)], seconds, step)


def _flush_all(wire: Wire) -> None:
    deadline = time.monotonic() + 5
    while not wire.flush() and not wire.eof and time.monotonic() < deadline:
        time.sleep(0.001)
