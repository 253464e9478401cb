"""What the admin tests feed the metrics: a finished request, as the listener hands it over."""

from __future__ import annotations

from attrs import define

from trackingproxy.server.exchange import Outcome


@define
class FakeRequest:
    """A finished request: its target, status, the domain it was for and its protocol."""

    uri: bytes
    code: int = 200
    host: str = "-"
    clientproto: bytes = b"HTTP/1.1"

    @property
    def outcome(self) -> Outcome:
        return Outcome(host=self.host)
