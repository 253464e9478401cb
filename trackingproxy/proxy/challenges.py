"""The seam between the port-80 site and whoever answers ACME HTTP-01 challenges."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred


class Busy(Exception):
    """Too many challenge lookups are in flight: answer 503 (the CA retries)."""


class ChallengeResponder(Protocol):
    """Answers ``GET /.well-known/acme-challenge/<token>`` for a configured domain.

    ``key_authorization`` is called on the reactor thread for every such request, so it must not
    block: implementations keep pending tokens in memory (refreshed from shared storage by a
    timer or an event). It returns None when no order is pending for the token; a responder
    backed by a shared store may return a Deferred for a token it does not hold (a bounded
    lookup: it raises Busy when too many are in flight).
    """

    def key_authorization(
        self, host: str, token: str
    ) -> bytes | Deferred[bytes | None] | None: ...


class NoChallenges:
    """The responder used when ACME is off: every token is unknown."""

    def key_authorization(self, host: str, token: str) -> bytes | None:
        return None
