# -*- test-case-name: tests.outage.test_policy -*-
"""What outage mode does with one proxied request: the rules, in one place.

For a GET or HEAD (other methods are left alone):

- Every redirect the upstream answers is remembered for its exact target (`links`).
- When the upstream cannot be reached, or answers 503 before any body byte, the request is
  answered here: an open (``/q/``) with SparkPost's pixel, a remembered target with its
  redirect, another click (``/f/``) with a 503 page and ``Retry-After``. Other paths get the
  proxy's usual error answer.
- An open or a click journaled for a later re-send only if it provably never reached SparkPost:
  the failure says the request was never written to a connection (DNS, connect, TLS, the busy
  queue, a timeout while still waiting for a connection), or the upstream answered 503. A
  request that was written and then timed out or was reset may have been seen: it is counted
  as ambiguous and never re-sent. The same (Host, target, client address, User-Agent) is
  journaled at most once per 10 s (link scanners, reloads).
- The replayer hears of every failure and every answer (`UpstreamWatch`).

A failure that is not the upstream's (a request that cannot be put on the wire) keeps its usual
answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from typing import Final, Protocol

from twisted.internet.interfaces import IReactorTime

from trackingproxy.outage.answers import OPEN, UNAVAILABLE, LocalAnswer, redirect
from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.journal import Journal
from trackingproxy.outage.links import RememberedLinks
from trackingproxy.outage.records import JournaledRequest
from trackingproxy.upstream.errors import UpstreamError

__all__ = [
    "JOURNALED_METHODS",
    "REPEAT_WINDOW",
    "OutagePolicy",
    "OutageRequest",
    "UpstreamWatch",
    "classify",
]

JOURNALED_METHODS: Final = frozenset({b"GET", b"HEAD"})
REPEAT_WINDOW: Final = 10.0
_MAX_REPEAT_KEYS: Final = 200_000  # at most this many recent requests remembered for repeats


class UpstreamWatch(Protocol):
    """Who hears whether the upstream answers (the replayer)."""

    def upstream_failed(self) -> None: ...

    def upstream_answered(self) -> None: ...


def classify(error: BaseException) -> str | None:
    """``unreached`` (provably never reached the upstream), ``ambiguous`` (written, then no
    answer), or None (not an upstream outage: keep the usual answer)."""
    if not isinstance(error, UpstreamError):
        return None
    if error.written:
        return "ambiguous"
    if error.cause == "protocol":
        return None  # the request could not be put on the wire: the client's, not an outage
    return "unreached"


def _kind(target: bytes) -> str:
    path = target.partition(b"?")[0]
    if path.startswith(b"/q/"):
        return "open"
    if path.startswith(b"/f/"):
        return "click"
    return "other"


class OutagePolicy:
    """The rules of the module docstring, shared by every listener of the process.

    @ivar _recent: repeat key -> when it was journaled, oldest first (within the window).
    """

    def __init__(
        self,
        clock: IReactorTime,
        links: RememberedLinks,
        journal: Journal,
        counters: OutageCounters,
        watch: UpstreamWatch,
        *,
        journal_503: bool = True,
    ) -> None:
        self._clock = clock
        self.links = links
        self.journal = journal
        self.counters = counters
        self._watch = watch
        self._journal_503 = journal_503
        self._recent: OrderedDict[bytes, float] = OrderedDict()

    def request(
        self,
        method: bytes,
        host: str,
        target: bytes,
        client: str,
        user_agent: bytes | None,
        scheme: bytes,
    ) -> OutageRequest | None:
        """The outage handling of one request (None: not for this method)."""
        if method not in JOURNALED_METHODS:
            return None
        return OutageRequest(self, method, host, target, client, user_agent, scheme)

    # -- called through OutageRequest ------------------------------------------------------
    def _answered(
        self, req: OutageRequest, code: int, headers: Sequence[tuple[bytes, bytes]]
    ) -> LocalAnswer | None:
        if code == 503 and self._journal_503:
            answer = self._unreached(req)
            self._watch.upstream_failed()  # after journaling: it probes for what waits
            return answer
        self._watch.upstream_answered()
        if 300 <= code < 400:
            for name, value in headers:
                if name.lower() == b"location":
                    self.links.learn(req.host, req.target, code, value)
                    break
        return None

    def _failed(self, req: OutageRequest, error: BaseException) -> LocalAnswer | None:
        verdict = classify(error)
        if verdict is None:
            return None
        if verdict == "ambiguous":
            if req.kind != "other" and not req.seen:  # seen: its head arrived, then a failure
                self.counters.ambiguous += 1
            answer = self._local(req)
        else:
            answer = self._unreached(req)
        self._watch.upstream_failed()  # after journaling: it probes for what waits
        return answer

    def _unreached(self, req: OutageRequest) -> LocalAnswer | None:
        if req.kind != "other":
            self._journal(req)
        return self._local(req)

    def _local(self, req: OutageRequest) -> LocalAnswer | None:
        if req.kind == "open":
            answer = OPEN
        else:
            remembered = self.links.recall(req.host, req.target)
            if remembered is not None:
                answer = redirect(*remembered)
            elif req.kind == "click":
                answer = UNAVAILABLE  # never a redirect built from the request (target=...)
            else:
                return None
        self.counters.local_answers[answer.kind] += 1
        return answer

    def _journal(self, req: OutageRequest) -> None:
        now = self._clock.seconds()
        recent = self._recent
        while recent:
            key, when = next(iter(recent.items()))
            if now - when < REPEAT_WINDOW and len(recent) < _MAX_REPEAT_KEYS:
                break
            del recent[key]
        parts = (
            req.host.encode("ascii", "replace"),
            req.target,
            req.client.encode("ascii", "replace"),
            req.user_agent or b"",
        )
        key = blake2b(b"\x00".join(parts), digest_size=16).digest()
        if key in recent:
            self.counters.repeats += 1
            return
        recent[key] = now
        self.journal.add(
            JournaledRequest(
                req.method, req.host, req.target, req.client, req.user_agent, req.scheme, now
            )
        )


class OutageRequest:
    """One GET or HEAD as outage mode sees it; the proxy calls `on_response` with the head of
    the upstream's answer and `on_failure` when there is none. Either returns the answer to
    give instead of the upstream's (None: go on as usual)."""

    __slots__ = (
        "client",
        "host",
        "kind",
        "method",
        "policy",
        "scheme",
        "seen",
        "target",
        "user_agent",
    )

    def __init__(
        self,
        policy: OutagePolicy,
        method: bytes,
        host: str,
        target: bytes,
        client: str,
        user_agent: bytes | None,
        scheme: bytes,
    ) -> None:
        self.policy = policy
        self.method = method
        self.host = host
        self.target = target
        self.client = client
        self.user_agent = user_agent
        self.scheme = scheme
        self.kind = _kind(target)
        self.seen = False  # the upstream answered (a head arrived)

    def on_response(
        self, code: int, headers: Sequence[tuple[bytes, bytes]]
    ) -> LocalAnswer | None:
        self.seen = True
        return self.policy._answered(self, code, headers)

    def on_failure(self, error: BaseException) -> LocalAnswer | None:
        return self.policy._failed(self, error)
