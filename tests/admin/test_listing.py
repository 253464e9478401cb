"""Which domains a reader sees: query parameters, problem ranking, search and pages
(``trackingproxy.admin.listing``), over plain facts."""

from __future__ import annotations

import datetime

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.admin.test_status import state
from trackingproxy.acme.testing import self_signed
from trackingproxy.admin.listing import (
    DEFAULT_PER_PAGE,
    MAX_PER_PAGE,
    DomainQuery,
    QueryError,
    find_problems,
    select,
)
from trackingproxy.admin.status import CertificateFacts, DomainFacts

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def facts(name: str, days_left: float | None = 60, failures: int = 0) -> DomainFacts:
    cert = None
    if days_left is not None:
        end = T0 + days_left * DAY
        cert = CertificateFacts.of(self_signed(name, end - 90 * DAY, end))
    renewal = state(T0 + DAY, failures, "boom" if failures else None, T0) if failures else None
    return DomainFacts(name, cert, renewal)


class QueryTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """No parameters: no search, every domain on one page (or the default page size)."""
        self.assertEqual(DomainQuery.from_args({}), DomainQuery())
        self.assertEqual(
            DomainQuery.from_args({}, default_per_page=DEFAULT_PER_PAGE).per_page,
            DEFAULT_PER_PAGE,
        )

    def test_parameters(self) -> None:
        """q is trimmed and lower-cased, problems is a flag, page alone pages by 50."""
        query = DomainQuery.from_args(
            {b"q": [b"  Click.EX "], b"problems": [b"1"], b"page": [b"3"]}
        )
        self.assertEqual(query, DomainQuery("click.ex", True, 3, DEFAULT_PER_PAGE))
        self.assertFalse(DomainQuery.from_args({b"problems": [b"0"]}).problems_only)
        self.assertEqual(DomainQuery.from_args({b"q": [b"x" * 999]}).q, "x" * 253)
        self.assertEqual(DomainQuery.from_args({b"q": [b"\xff"]}).q, "\ufffd")

    def test_bad_numbers(self) -> None:
        """A page that is no number, 0, or a page size beyond the limit is refused."""
        for args in ({b"page": [b"two"]}, {b"page": [b"0"]},
                     {b"per_page": [str(MAX_PER_PAGE + 1).encode()]}):
            self.assertRaises(QueryError, DomainQuery.from_args, args)


class ProblemTests(SynchronousTestCase):
    def test_ranking(self) -> None:
        """Missing first, then expired, then by expiry; fine domains are left out."""
        domains = [
            facts("fine"),
            facts("soon", 5),
            facts("sooner", 1),
            facts("failing", 60, failures=1),
            facts("expired", -1),
            facts("missing", None),
        ]
        problems = find_problems(domains, T0)
        self.assertEqual(
            [(p.name, p.severity) for p in problems],
            [("missing", 0), ("expired", 0), ("sooner", 1), ("soon", 1), ("failing", 1)],
        )
        self.assertEqual(problems[-1].reasons, ("ACME: 1 failed order in a row",))
        self.assertIn("within 7 days", problems[2].reasons[0])

    def test_waiting_in_the_order_queue_changes_nothing(self) -> None:
        """Domains waiting for an ACME order rank, with the same reasons, as they would
        without waiting: a missing certificate is still an error and first."""
        domains = [
            facts("fine"),
            facts("soon", 5),
            facts("failing", 60, failures=1),
            facts("missing", None),
        ]
        waiting = [
            attrs.evolve(
                d,
                renewal=attrs.evolve(d.renewal or state(None), queue_position=i,
                                     queue_eta=T0 + i * DAY),
            )
            for i, d in enumerate(domains, start=1)
        ]
        before = [(p.name, p.severity, p.reasons) for p in find_problems(domains, T0)]
        after = [(p.name, p.severity, p.reasons) for p in find_problems(waiting, T0)]
        self.assertEqual(after, before)
        self.assertEqual(after[0], ("missing", 0, ("no certificate yet",)))

    def test_without_https(self) -> None:
        """Without HTTPS a missing certificate is no problem; failing orders still are."""
        problems = find_problems([facts("missing", None), facts("failing", 60, 2)], T0, False)
        self.assertEqual([p.name for p in problems], ["failing"])


class SelectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.domains = [facts(f"d{i:02d}.example.com", None) for i in range(25)]
        self.problems = find_problems(self.domains, T0)

    def names(self, query: DomainQuery, clamp: bool = False) -> list[str]:
        return [d.name for d in select(self.domains, self.problems, query, clamp).domains]

    def test_pages(self) -> None:
        """Pages follow the configured order; past the last: empty, or clamped the last."""
        self.assertEqual(len(self.names(DomainQuery(page=1, per_page=10))), 10)
        self.assertEqual(self.names(DomainQuery(page=3, per_page=10))[0], "d20.example.com")
        listing = select(self.domains, self.problems, DomainQuery(page=3, per_page=10))
        self.assertEqual((listing.pages, listing.first, len(listing.domains)), (3, 21, 5))
        self.assertEqual(self.names(DomainQuery(page=4, per_page=10)), [])
        self.assertEqual(len(self.names(DomainQuery(page=4, per_page=10), clamp=True)), 5)

    def test_search_and_problems_only(self) -> None:
        """A substring search counts what matches; problems-only keeps the problems' order."""
        listing = select(self.domains, self.problems, DomainQuery(q="d1", per_page=4))
        self.assertEqual((listing.matched, listing.total, listing.pages), (10, 25, 3))
        self.domains[3] = facts("d03.example.com", 2)
        self.domains[7] = facts("d07.example.com", 1)
        ok = [facts(f"ok{i}", 60) for i in range(3)]
        problems = find_problems([*ok, self.domains[3], self.domains[7]], T0)
        listing = select([*ok, self.domains[3], self.domains[7]], problems,
                         DomainQuery(problems_only=True))
        self.assertEqual([d.name for d in listing.domains], ["d07.example.com",
                                                              "d03.example.com"])
        empty = select([], [], DomainQuery(per_page=50))
        self.assertEqual((empty.pages, empty.first, empty.matched), (1, 0, 0))
