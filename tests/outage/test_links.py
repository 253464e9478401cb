"""Remembered click redirects: exact target per Host, least recently used dropped first, never
older than 24 h, and only well-formed redirects are kept."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.outage.links import MAX_AGE, RememberedLinks

HOST = "click.example.com"
LANDING = b"https://www.example.com/landing?utm=1"


class RememberedLinksTests(SynchronousTestCase):
    def test_a_learned_redirect_is_recalled_for_its_exact_target_and_host_only(self) -> None:
        """The Location is answered for the same Host, path and query, nothing else."""
        links = RememberedLinks(Clock(), 10)
        links.learn(HOST, b"/f/abc?x=1", 302, LANDING)
        self.assertEqual(links.recall(HOST, b"/f/abc?x=1"), (302, LANDING))
        self.assertIsNone(links.recall(HOST, b"/f/abc"))
        self.assertIsNone(links.recall(HOST, b"/f/abc?x=2"))
        self.assertIsNone(links.recall("click2.example.com", b"/f/abc?x=1"))

    def test_the_least_recently_used_link_goes_first(self) -> None:
        """Past the capacity the link used longest ago is dropped; a recall counts as a use."""
        links = RememberedLinks(Clock(), 2)
        links.learn(HOST, b"/f/1", 302, b"https://a.example/1")
        links.learn(HOST, b"/f/2", 302, b"https://a.example/2")
        links.recall(HOST, b"/f/1")
        links.learn(HOST, b"/f/3", 302, b"https://a.example/3")
        self.assertEqual(len(links), 2)
        self.assertIsNone(links.recall(HOST, b"/f/2"))
        self.assertIsNotNone(links.recall(HOST, b"/f/1"))
        self.assertIsNotNone(links.recall(HOST, b"/f/3"))

    def test_a_link_older_than_24_hours_is_forgotten(self) -> None:
        """A link learned 24 h ago is no longer answered (and is dropped); re-learning renews."""
        clock = Clock()
        links = RememberedLinks(clock, 10)
        links.learn(HOST, b"/f/old", 302, LANDING)
        links.learn(HOST, b"/f/renewed", 302, LANDING)
        clock.advance(MAX_AGE - 1)
        links.learn(HOST, b"/f/renewed", 302, LANDING)
        clock.advance(1)
        self.assertIsNone(links.recall(HOST, b"/f/old"))
        self.assertEqual(links.recall(HOST, b"/f/renewed"), (302, LANDING))
        self.assertEqual(len(links), 1)

    def test_only_redirects_with_a_clean_location_are_kept(self) -> None:
        """A 200, a missing, overlong or CR/LF/NUL-holding Location is not remembered; the
        redirect's own status (e.g. 301) is."""
        links = RememberedLinks(Clock(), 10)
        links.learn(HOST, b"/f/ok", 200, LANDING)
        links.learn(HOST, b"/f/empty", 302, b"")
        links.learn(HOST, b"/f/crlf", 302, b"https://a.example/\r\nSet-Cookie: x=1")
        links.learn(HOST, b"/f/nul", 302, b"https://a.example/\x00")
        links.learn(HOST, b"/f/long", 302, b"https://a.example/" + b"x" * 9000)
        links.learn(HOST, b"/f/moved", 301, LANDING)
        self.assertEqual(len(links), 1)
        self.assertEqual(links.recall(HOST, b"/f/moved"), (301, LANDING))

    def test_tracking_tokens_are_not_kept_in_the_table(self) -> None:
        """The table holds digests of the targets, not the tokens themselves."""
        links = RememberedLinks(Clock(), 10)
        links.learn(HOST, b"/f/SECRET-TOKEN", 302, LANDING)
        self.assertNotIn(b"SECRET-TOKEN", b"".join(links._links))
