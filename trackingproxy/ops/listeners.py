"""Listening services: one endpoint + factory each, failing start-up with one clear line.

"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.errors import ConfigError

log = Logger(namespace="trackingproxy.ops.listeners")


class ListenerService(Service):
    """Listens in privilegedStartService (so twistd can bind :80/:443 before dropping root).

    A listen that fails at once (port in use, permission denied) raises ConfigError naming the
    option to change; the caller (twistd start-up) turns that into one line and exit status 1.
    """

    def __init__(
        self,
        option: str,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
    ) -> None:
        self.option = option
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._failure: Failure | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, self._failed)
        if self._failure is not None:
            raise ConfigError(
                f"{self.option} {self.description}: cannot listen "
                f"({self._failure.getErrorMessage()}); free the port, run with "
                "CAP_NET_BIND_SERVICE for ports below 1024, or choose another endpoint"
            )

    def startService(self) -> None:
        if self.port is None and self._failure is None:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        log.info("{option} listening on {address}", option=self.option,
                 address=describe_address(port.getHost()))

    def _failed(self, reason: Failure) -> None:
        self._failure = reason
        log.critical(
            "{option} {description}: cannot listen: {error}",
            option=self.option,
            description=self.description,
            error=reason.getErrorMessage(),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            result: Deferred[None] | None = port.stopListening()
            return result
        return None


def describe_address(address: object) -> str:
    """``127.0.0.1:80``, ``[::]:443`` or a UNIX path: an address in words, not a repr."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(getattr(address, "name", address))
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
