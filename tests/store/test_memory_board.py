"""The memory store's HTTP-01 answers and domain list (doubles for code using a shared store)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.store.contract import ChallengeBoard, DomainList
from trackingproxy.store.memory import MemoryStore


class MemoryChallengeBoardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.board: ChallengeBoard = self.store

    def test_answer_until_ttl(self) -> None:
        """An answer is readable until its ttl passes on the clock, per host and token."""
        self.successResultOf(self.board.put_challenge("a.example.com", "tok", b"tok.th", 30))
        self.assertEqual(self.successResultOf(self.board.get_challenge("a.example.com", "tok")), b"tok.th")
        self.assertIsNone(self.successResultOf(self.board.get_challenge("b.example.com", "tok")))
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(self.board.get_challenge("a.example.com", "tok")))
        self.assertEqual(self.store.challenges, {})

    def test_delete(self) -> None:
        """A deleted answer is gone; deleting a missing one is fine."""
        self.successResultOf(self.board.put_challenge("a.example.com", "tok", b"x", 30))
        self.successResultOf(self.board.delete_challenge("a.example.com", "tok"))
        self.successResultOf(self.board.delete_challenge("a.example.com", "tok"))
        self.assertIsNone(self.successResultOf(self.board.get_challenge("a.example.com", "tok")))


class MemoryDomainListTests(SynchronousTestCase):
    def test_add_remove_list(self) -> None:
        """add/remove say whether they changed the list; the list comes sorted."""
        domains: DomainList = MemoryStore(Clock())
        self.assertTrue(self.successResultOf(domains.add_domain("b.example.com")))
        self.assertTrue(self.successResultOf(domains.add_domain("a.example.com")))
        self.assertFalse(self.successResultOf(domains.add_domain("a.example.com")))
        self.assertEqual(
            self.successResultOf(domains.list_domains()), ["a.example.com", "b.example.com"]
        )
        self.assertTrue(self.successResultOf(domains.remove_domain("b.example.com")))
        self.assertFalse(self.successResultOf(domains.remove_domain("b.example.com")))
        self.assertEqual(self.successResultOf(domains.list_domains()), ["a.example.com"])
