"""A stand-in for SparkPost's tracking endpoint: a real HTTPS server on 127.0.0.1 that records
every request it receives (and on which connection) and answers like spgo.io does."""

from __future__ import annotations

from typing import Any

import trustme
from attrs import define, field
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.certs import ServerTLS

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x03D\x01\x00\x00;"
)  # 1x1 transparent GIF whose image data block is one byte longer: 44 bytes, like SparkPost's
assert len(GIF) == 44


@define
class Seen:
    method: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    connection: int


@define
class StandIn:
    """The recording upstream. ``mode`` changes how it answers (e.g. 'stall', 'reset').

    With ``holding`` set, opens (``/q/``) and clicks (``/f/``) are not answered at once: each
    answer waits in ``held`` until the test calls ``release()`` (a slow upstream whose requests
    are surely in flight at the proxy for as long as the test needs).
    """

    seen: list[Seen] = field(factory=list)
    mode: str = "normal"
    stalled: list[Request] = field(factory=list)
    port: IListeningPort | None = None
    connections: int = 0
    holding: bool = False
    held: list[Request] = field(factory=list)

    def header(self, index: int, name: bytes) -> list[bytes]:
        return self.seen[index].headers.get(name.lower(), [])

    def release(self, count: int | None = None) -> int:
        """Answer the first ``count`` held requests (all when None) whose connection is still
        open; returns how many were answered."""
        count = len(self.held) if count is None else count
        batch, self.held = self.held[:count], self.held[count:]
        answered = 0
        for request in batch:
            if not request._disconnected:
                path = request.uri.partition(b"?")[0]
                request.write(_tracking_answer(request, path))
                request.finish()
                answered += 1
        return answered


def _tracking_answer(request: Request, path: bytes) -> bytes:
    """SparkPost's answer to an open (``/q/``: the GIF) or a click (``/f/``: 302)."""
    request.setHeader(b"server", b"msys-http")
    request.setHeader(b"cache-control", b"no-cache, max-age=0")
    if path.startswith(b"/q/"):
        request.setHeader(b"content-type", b"image/gif")
        return GIF
    request.setResponseCode(302)
    request.setHeader(b"location", b"https://www.example.com/landing?utm=1")
    request.setHeader(b"content-type", b"text/html")
    return b"<a href='https://www.example.com/landing?utm=1'>moved</a>"


class _Root(Resource):
    isLeaf = True

    def __init__(self, state: StandIn) -> None:
        super().__init__()
        self.state = state

    def render(self, request: Request) -> Any:
        state = self.state
        headers = {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read() if request.content is not None else b""
        state.seen.append(
            Seen(request.method, request.uri, headers, body, request.transport.getPeer().port)
        )
        path = request.uri.partition(b"?")[0]
        if state.mode == "stall" or path.startswith(b"/stall"):
            state.stalled.append(request)
            return NOT_DONE_YET
        if state.mode == "reset" or path.startswith(b"/reset"):
            request.transport.abortConnection()
            return NOT_DONE_YET
        if path.startswith((b"/q/", b"/f/")):
            if state.holding:
                request.notifyFinish().addErrback(lambda _: None)
                state.held.append(request)
                return NOT_DONE_YET
            return _tracking_answer(request, path)
        request.setHeader(b"server", b"msys-http")
        request.setHeader(b"cache-control", b"no-cache, max-age=0")
        if path.startswith(b"/delay"):
            from twisted.internet import reactor

            def answer() -> None:
                if not request._disconnected:
                    request.setHeader(b"content-type", b"image/gif")
                    request.write(GIF)
                    request.finish()

            reactor.callLater(1.0, answer)
            return NOT_DONE_YET
        if path.startswith(b"/big"):
            request.setHeader(b"content-type", b"application/octet-stream")
            for _ in range(64):
                request.write(b"x" * 16384)
            request.finish()
            return NOT_DONE_YET
        if path.startswith(b"/echo"):
            return body
        request.setResponseCode(404)
        return b"not found"


class _CountingFactory(TLSMemoryBIOFactory):
    def __init__(self, state: StandIn, *args: Any) -> None:
        super().__init__(*args)
        self.state = state

    def buildProtocol(self, addr: Any) -> Any:
        self.state.connections += 1
        return super().buildProtocol(addr)


def start_standin(ca: trustme.CA, reactor: Any = global_reactor) -> StandIn:
    """Start on 127.0.0.1 with an ephemeral port; the certificate is for 127.0.0.1 and localhost."""
    state = StandIn()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    options = ServerTLS(leaf)
    site = Site(_Root(state))
    factory: Any = _CountingFactory(state, options, False, site)
    state.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return state
