"""Random HTTP/2 frames (hypothesis) against both HTTP/2 engines in memory: after a valid
preface, any sequence of frames of any type, flags, stream and payload, mixed with valid
requests and cut at random points, never raises, never logs an error, never crashes the
process (the libnghttp2 engine is C: a memory error would kill the test run), and every
request the handler sees is a well-formed tracking request. ``TP_PROPERTY_SCALE`` multiplies
the examples (the soak command runs more)."""

from __future__ import annotations

import os
import struct
from typing import Any

import h2.config
import h2.connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.server.test_http2 import AUTHORITY, _Owner, _request, _Server
from trackingproxy.server.http2 import H2ServerBase
from trackingproxy.server.http2_nghttp2 import NativeH2Connection
from trackingproxy.server.http2_python import PythonH2Connection

SCALE = max(1, int(os.environ.get("TP_PROPERTY_SCALE", "1")))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def _valid_request(stream_id: int, path: bytes, end: bool) -> bytes:
    """A HEADERS frame as a real client encodes it (fresh HPACK state: no dynamic table)."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.data_to_send()
    client.send_headers(stream_id, _request(path), end_stream=end)
    return client.data_to_send()


frames = st.one_of(
    st.builds(
        _frame,
        st.integers(0, 12),
        st.integers(0, 255),
        st.sampled_from([0, 1, 3, 5, 2, 0x7FFFFFFF]),
        st.binary(max_size=48),
    ),
    st.builds(
        _valid_request,
        st.sampled_from([1, 3, 5]),
        st.sampled_from([b"/q/a", b"/f/b?c=d", b"*", b"x"]),
        st.booleans(),
    ),
)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        # one body, two engines (the mixin): the same test from two classes is intended
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    )


class _Cases:
    engine: type[H2ServerBase]
    flushLoggedErrors: Any
    assertEqual: Any
    assertTrue: Any

    def _feed(self, data: bytes, cuts: list[int]) -> _Server:
        server = _Server()
        conn = self.engine(server, _Owner())
        transport = StringTransport()
        conn.makeConnection(transport)
        start = 0
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            conn.dataReceived(data[start:cut])
            start = cut
        server.clock.advance(3600)  # idle timeout: the connection closes itself
        conn.connectionLost()
        self.assertEqual(self.flushLoggedErrors(), [])
        for request in server.handled:
            self.assertEqual(request.header(b"host"), AUTHORITY)
            self.assertTrue(request.uri[:1] == b"/" or request.uri == b"*", request.uri)
        self.assertEqual(server.clock.getDelayedCalls(), [])
        return server

    @_settings(300)
    @given(st.lists(frames, max_size=12), st.lists(st.integers(0, 2000), max_size=4))
    def test_random_frames_after_the_preface(self, sequence: list[bytes], cuts: list[int]) -> None:
        self._feed(PREFACE + b"".join(sequence), cuts)

    @_settings(100)
    @given(st.binary(max_size=200))
    def test_random_bytes_instead_of_a_preface(self, data: bytes) -> None:
        server = self._feed(data, [])
        self.assertEqual(server.handled, [])

    def test_a_valid_request_is_still_answered(self) -> None:
        """The generator's valid request works on its own (so the property exercises more
        than refusals)."""
        server = _Server()
        conn = self.engine(server, _Owner())
        transport = StringTransport()
        conn.makeConnection(transport)
        conn.dataReceived(PREFACE + _valid_request(1, b"/q/a", True))
        self.assertEqual([r.uri for r in server.handled], [b"/q/a"])
        self.assertTrue(len(transport.value()) > 0)


class PythonEngineFrameTests(_Cases, SynchronousTestCase):
    engine = PythonH2Connection


class NativeEngineFrameTests(_Cases, SynchronousTestCase):
    engine = NativeH2Connection
