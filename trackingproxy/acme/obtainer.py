"""The seam between the issuing service and whoever signs certificates (ACME or the local CA).

The issuing service decides *when* and *for what* (schedule, locks, store, SNI); an
``Obtainer`` only turns a name and a private key into a full chain, and reports failures as
``ObtainFailed`` carrying one log line and, when the CA said so, a Retry-After time.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred

from trackingproxy.store.contract import AriWindow, PendingOrder
from trackingproxy.tls.certificates import PrivateKey

__all__ = ["ObtainFailed", "ObtainRequest", "Obtainer"]


@frozen
class ObtainRequest:
    """Obtain a certificate for ``name`` with ``key``.

    ``replaces`` is the full chain being renewed (for ARI's ``replaces``), ``resume`` a stored
    pending order to pick up, and ``save_order(PendingOrder(url, key, directory))`` must be
    called (and waited for) once a new order exists and before it is finalized, so a successor
    can resume it.
    """

    name: str
    key: PrivateKey
    save_order: Callable[[PendingOrder], Deferred[None]]
    replaces: bytes | None = None
    resume: PendingOrder | None = None


class ObtainFailed(Exception):
    """A failed attempt: ``message`` is the one log line (problem and likely fix)."""

    def __init__(
        self,
        message: str,
        retry_after: datetime.datetime | None = None,
        problem_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.problem_type = problem_type

    def __str__(self) -> str:
        return self.message


class Obtainer(Protocol):
    """Signs certificates; ``start``/``stop`` follow the issuing service."""

    @property
    def description(self) -> str:
        """Who signs, for log lines (e.g. the ACME directory URL)."""

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...

    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        """The full chain (PEM, leaf first) for ``request``; fails with ObtainFailed."""

    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        """The ARI window for a certificate; None when the CA offers no ARI."""
