# -*- test-case-name: tests.admin.test_listing -*-
"""Which domains a reader sees, and in which order: problems first, then a search and pages.

``find_problems`` ranks the domains that need attention (no valid certificate, expiring within
``EXPIRING_DAYS``, ACME orders failing) most urgent first. ``DomainQuery`` is a search
(case-insensitive substring of the name), an optional problems-only filter and a page;
``select`` applies it. Everything here is one pass over the domains (plus sorting the
problems), so 10,000 domains cost milliseconds, and only the selected page is turned into
JSON or HTML by the callers (``status``, ``page``).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from attrs import frozen

if TYPE_CHECKING:
    from trackingproxy.admin.status import DomainFacts

__all__ = [
    "DEFAULT_PER_PAGE",
    "EXPIRING_DAYS",
    "MAX_PER_PAGE",
    "DomainQuery",
    "Listing",
    "Problem",
    "QueryError",
    "find_problems",
    "select",
]

EXPIRING_DAYS: Final = 7  # a certificate expiring sooner is a problem
DEFAULT_PER_PAGE: Final = 50
MAX_PER_PAGE: Final = 1000
MAX_QUERY: Final = 253  # the longest DNS name


class QueryError(ValueError):
    """A query parameter that is not what it should be (the message says which)."""


@frozen
class DomainQuery:
    """A search (``q``: substring of the domain name), an optional problems-only filter and a
    page (1-based) of ``per_page`` domains (None: every matching domain)."""

    q: str = ""
    problems_only: bool = False
    page: int = 1
    per_page: int | None = None

    @classmethod
    def from_args(
        cls, args: Mapping[bytes, Sequence[bytes]], default_per_page: int | None = None
    ) -> DomainQuery:
        """From a request's query arguments (``q``, ``problems``, ``page``, ``per_page``);
        raises QueryError naming a bad one. ``page`` alone pages by ``DEFAULT_PER_PAGE``."""

        def one(name: bytes) -> str | None:
            values = args.get(name)
            return values[-1].decode("utf-8", "replace").strip() if values else None

        def number(name: bytes, low: int, high: int) -> int | None:
            raw = one(name)
            if raw is None or raw == "":
                return None
            try:
                value = int(raw)
            except ValueError:
                raise QueryError(f"{name.decode()} must be a whole number") from None
            if not low <= value <= high:
                raise QueryError(f"{name.decode()} must be from {low} to {high}")
            return value

        page = number(b"page", 1, 10**9)
        per_page = number(b"per_page", 1, MAX_PER_PAGE)
        if per_page is None:
            per_page = DEFAULT_PER_PAGE if page is not None else default_per_page
        return cls(
            q=(one(b"q") or "")[:MAX_QUERY].lower(),
            problems_only=(one(b"problems") or "") not in ("", "0", "no", "false"),
            page=page or 1,
            per_page=per_page,
        )


@frozen
class Problem:
    """Why one domain needs attention. ``severity`` 0 (``error``): it has no valid
    certificate; 1 (``warning``): it expires within ``EXPIRING_DAYS`` or ACME orders fail."""

    facts: DomainFacts
    severity: int
    reasons: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.facts.name

    def json(self, now: float) -> dict[str, Any]:
        cert, renewal = self.facts.certificate, self.facts.renewal
        return {
            "name": self.name,
            "severity": ("error", "warning")[self.severity],
            "reasons": list(self.reasons),
            "expires_in_seconds": None
            if cert is None
            else round(cert.not_after.timestamp() - now, 3),
            "consecutive_failures": 0 if renewal is None else renewal.failures,
            "last_error": None if renewal is None else renewal.last_error,
        }


def _iso(when: datetime.datetime) -> str:
    return when.isoformat(timespec="seconds")


def find_problems(
    domains: Sequence[DomainFacts], now: datetime.datetime, https: bool = True
) -> list[Problem]:
    """The domains that need attention, most urgent first: no valid certificate (no
    certificate before an expired or not yet valid one), then by expiry, then by name.
    Without HTTPS (``https`` False) certificates are not needed, only ACME failures count."""
    soon = now + datetime.timedelta(days=EXPIRING_DAYS)
    found: list[tuple[tuple[int, float, str], Problem]] = []
    for d in domains:
        reasons: list[str] = []
        severity = 1
        cert, renewal = d.certificate, d.renewal
        expires = float("-inf")
        if cert is None:
            if https:
                reasons.append("no certificate yet")
                severity = 0
        else:
            expires = cert.not_after.timestamp()
            if cert.not_after <= now:
                reasons.append(f"the certificate expired at {_iso(cert.not_after)}")
                severity = 0
            elif cert.not_before > now:
                reasons.append(f"the certificate is valid only from {_iso(cert.not_before)}")
                severity = 0
            elif cert.not_after <= soon:
                reasons.append(
                    f"the certificate expires at {_iso(cert.not_after)}, within "
                    f"{EXPIRING_DAYS} days"
                )
        if renewal is not None and renewal.failures:
            s = "" if renewal.failures == 1 else "s"
            reasons.append(f"ACME: {renewal.failures} failed order{s} in a row")
        if reasons:
            found.append(((severity, expires, d.name), Problem(d, severity, tuple(reasons))))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


@frozen
class Listing:
    """The selected page of domains and where it lies: ``matched`` of ``total`` domains
    match the query; this is page ``page`` of ``pages``."""

    domains: list[DomainFacts]
    total: int
    matched: int
    page: int
    pages: int
    per_page: int | None
    query: DomainQuery

    @property
    def first(self) -> int:
        """The position (1-based) of the page's first domain among the matching ones."""
        if not self.domains:
            return 0
        return 1 if self.per_page is None else (self.page - 1) * self.per_page + 1

    def json(self) -> dict[str, Any]:
        return {
            "q": self.query.q,
            "problems_only": self.query.problems_only,
            "page": self.page,
            "pages": self.pages,
            "per_page": self.per_page,
            "matched": self.matched,
            "total": self.total,
        }


def select(
    domains: Sequence[DomainFacts],
    problems: Sequence[Problem],
    query: DomainQuery,
    clamp: bool = False,
) -> Listing:
    """The page of ``domains`` that ``query`` asks for. Problems-only lists them in the
    problems' order, else the configured order stays. ``clamp``: a page past the last one
    is the last one (for people; scripts get an empty page and stop)."""
    pool: Sequence[DomainFacts] = [p.facts for p in problems] if query.problems_only else domains
    q = query.q
    matching = [d for d in pool if q in d.name.lower()] if q else list(pool)
    per_page = query.per_page
    if per_page is None:
        return Listing(matching, len(domains), len(matching), 1, 1, None, query)
    pages = max(1, -(-len(matching) // per_page))
    page = min(query.page, pages) if clamp else query.page
    start = (page - 1) * per_page
    return Listing(
        matching[start : start + per_page], len(domains), len(matching), page, pages,
        per_page, query,
    )
