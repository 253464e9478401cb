"""The seam between the port-80 site and whoever answers ACME HTTP-01 challenges."""

from __future__ import annotations

from typing import Protocol


class ChallengeResponder(Protocol):
    """Answers ``GET /.well-known/acme-challenge/<token>`` for a configured domain.

    ``key_authorization`` is called on the reactor thread for every such request, so it must not
    block: implementations keep pending tokens in memory (refreshed from shared storage by a
    timer or an event, not per request). It returns None when no order is pending for the token.
    """

    def key_authorization(self, host: str, token: str) -> bytes | None: ...


class NoChallenges:
    """The responder used when ACME is off: every token is unknown."""

    def key_authorization(self, host: str, token: str) -> bytes | None:
        return None
