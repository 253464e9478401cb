"""Faults on loopback for the outage tests: a TCP relay in front of the recording stand-in that
can be taken down (connections refused, open ones reset) and brought back on the same port,
and the real proxy started in process with ``--outage-mode replay`` behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater

from tests.certs import make_ca
from tests.harness import Running, start_proxy
from tests.standin import StandIn, start_standin


class _Outbound(Protocol):
    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def connectionMade(self) -> None:
        self.inbound.outbound = self
        if self.inbound.buffer:
            self.transport.write(b"".join(self.inbound.buffer))
            self.inbound.buffer = []
        if self.inbound.gone:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.inbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.inbound.gone:
            self.inbound.transport.loseConnection()


class _OutboundFactory(ClientFactory):
    noisy = False

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def buildProtocol(self, addr: Any) -> _Outbound:
        return _Outbound(self.inbound)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.inbound.transport.abortConnection()


class _Inbound(Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.outbound: _Outbound | None = None
        self.buffer: list[bytes] = []
        self.gone = False

    def connectionMade(self) -> None:
        self.relay.open.add(self)
        self.relay.reactor.connectTCP("127.0.0.1", self.relay.target, _OutboundFactory(self))

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is None:
            self.buffer.append(data)
        else:
            self.outbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True
        self.relay.open.discard(self)
        if self.outbound is not None:
            self.outbound.transport.abortConnection()


class Relay:
    """Forwards TCP from its port to ``target`` while up; ``down()`` stops listening (new
    connections are refused) and resets every open one; ``up()`` listens on the same port."""

    def __init__(self, target: int, reactor: Any = global_reactor) -> None:
        self.target = target
        self.reactor = reactor
        self.port = 0
        self.open: set[_Inbound] = set()
        self._listening: IListeningPort | None = None

    def up(self) -> None:
        factory = Factory.forProtocol(lambda: _Inbound(self))
        factory.noisy = False
        self._listening = self.reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port

    @inlineCallbacks
    def down(self) -> Any:
        listening, self._listening = self._listening, None
        if listening is not None:
            yield listening.stopListening()
        for inbound in list(self.open):
            inbound.transport.abortConnection()
        yield deferLater(self.reactor, 0.2, lambda: None)  # the proxy hears of the resets


def start_outage_proxy(tmp: Path, *extra: str) -> tuple[Running, Relay]:
    """The real proxy (``--outage-mode replay``, state in ``tmp/state``, 127.0.0.1 a trusted
    proxy so tests can name clients in X-Forwarded-For) whose upstream is a relay to the
    recording stand-in."""
    ca = make_ca()
    standin: StandIn = start_standin(ca)
    assert standin.port is not None
    relay = Relay(standin.port.getHost().port)
    relay.up()
    running = start_proxy(
        tmp,
        "--upstream", f"https://127.0.0.1:{relay.port}",
        "--outage-mode", "replay",
        "--state-dir", str(tmp / "state"),
        "--trusted-proxy", "127.0.0.1",
        *extra,
        ca=ca, standin=standin,
    )
    return running, relay


@inlineCallbacks
def wait_for(check: Any, timeout: float = 15.0, step: float = 0.05) -> Any:
    """Poll ``check()`` on the real reactor until true (AssertionError after ``timeout``)."""
    waited = 0.0
    while not check():
        if waited >= timeout:
            raise AssertionError(f"not reached within {timeout} s")
        yield deferLater(global_reactor, step, lambda: None)
        waited += step


@inlineCallbacks
def stop_all(running: Running, relay: Relay) -> Any:
    """Stop the proxy, the relay and the stand-in."""
    yield running.service.stopService()
    yield relay.down()
    if running.standin.port is not None:
        for request in running.standin.held + running.standin.stalled:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        yield running.standin.port.stopListening()


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(global_reactor, seconds, lambda: None)
