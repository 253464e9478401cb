"""HTTP-01 through a shared store: an answer is in the store before ``add`` fires, any
replica answers a token another published, only for its domain, with bounded lookups."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.proxy.test_handler import DOMAIN, FakeExchange, UpstreamSpy
from trackingproxy.acme.responder import MAX_LOOKUPS, HTTP01Responder
from trackingproxy.proxy.challenges import Busy
from trackingproxy.proxy.forwarded import ForwardedFor, parse_networks
from trackingproxy.proxy.handler import TrackingHandler
from trackingproxy.store.memory import MemoryStore

TOKEN = "A" * 43
OTHER = "other.example.com"


class SlowBoard(MemoryStore):
    """A board whose lookups wait for the test (a store round trip in flight)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.waiting: list[Deferred[bytes | None]] = []

    def get_challenge(self, host: str, token: str) -> Deferred[bytes | None]:
        d: Deferred[bytes | None] = Deferred()
        answer = self.challenges.get((host, token))
        self.waiting.append(d)
        d.addCallback(lambda _: None if answer is None else answer[0])
        return d


class ResponderBoardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.board = MemoryStore(self.clock)
        self.publisher = HTTP01Responder([DOMAIN, OTHER], self.clock, board=self.board)
        self.replica = HTTP01Responder([DOMAIN], self.clock, board=self.board)

    def test_add_writes_the_store_before_firing(self) -> None:
        """``add`` fires once the answer is in the store, where another replica finds it."""
        self.successResultOf(self.publisher.add(DOMAIN, TOKEN, b"key-auth"))
        self.assertIn((DOMAIN, TOKEN), self.board.challenges)
        lookup = self.replica.key_authorization(DOMAIN, TOKEN)
        assert isinstance(lookup, Deferred)
        self.assertEqual(self.successResultOf(lookup), b"key-auth")

    def test_own_tokens_need_no_lookup(self) -> None:
        """A token this replica published is answered from memory (no Deferred)."""
        self.successResultOf(self.publisher.add(DOMAIN, TOKEN, b"key-auth"))
        self.assertEqual(self.publisher.key_authorization(DOMAIN, TOKEN), b"key-auth")

    def test_only_for_the_domain_it_belongs_to(self) -> None:
        """A token published for one domain is not answered for another, nor for a domain
        this replica does not serve (no store access for those)."""
        self.successResultOf(self.publisher.add(OTHER, TOKEN, b"key-auth"))
        lookup = self.replica.key_authorization(DOMAIN, TOKEN)
        assert isinstance(lookup, Deferred)
        self.assertIsNone(self.successResultOf(lookup))
        self.assertIsNone(self.replica.key_authorization(OTHER, TOKEN))
        self.assertIsNone(self.replica.key_authorization(DOMAIN, "bad token!"))

    def test_remove_withdraws_it_from_the_store(self) -> None:
        """``remove`` deletes the answer in the store; lookups then find nothing."""
        self.successResultOf(self.publisher.add(DOMAIN, TOKEN, b"key-auth"))
        self.successResultOf(self.publisher.remove(DOMAIN, TOKEN))
        lookup = self.replica.key_authorization(DOMAIN, TOKEN)
        assert isinstance(lookup, Deferred)
        self.assertIsNone(self.successResultOf(lookup))

    def test_lookups_are_bounded(self) -> None:
        """At most MAX_LOOKUPS store lookups run at once; the next raises Busy (503)."""
        board = SlowBoard(self.clock)
        replica = HTTP01Responder([DOMAIN], self.clock, board=board)
        for _ in range(MAX_LOOKUPS):
            replica.key_authorization(DOMAIN, TOKEN)
        self.assertRaises(Busy, replica.key_authorization, DOMAIN, TOKEN)
        board.waiting[0].callback(None)
        self.assertIsInstance(replica.key_authorization(DOMAIN, TOKEN), Deferred)


class HandlerLookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.board = SlowBoard(self.clock)
        self.successResultOf(self.board.put_challenge(DOMAIN, TOKEN, b"key-auth", 60))
        self.handler = TrackingHandler(
            scheme=b"http",
            domains=lambda: frozenset({DOMAIN}),
            upstream=UpstreamSpy(),
            forwarded=ForwardedFor(parse_networks(())),
            well_known=dict,
            challenges=HTTP01Responder([DOMAIN], self.clock, board=self.board),
        )

    def _get(self) -> FakeExchange:
        exchange = FakeExchange(uri=b"/.well-known/acme-challenge/" + TOKEN.encode())
        self.handler.handle(exchange)
        return exchange

    def test_answer_from_the_store(self) -> None:
        """The port-80 handler answers 200 once the store lookup returns; the lookup counts
        as work in flight on the connection until then."""
        exchange = self._get()
        self.assertEqual((exchange.answer, exchange.work), ([], [1]))
        self.board.waiting[0].callback(None)
        self.assertEqual((exchange.code, exchange.answer[0][3]), (200, b"key-auth"))
        self.assertEqual(exchange.work, [1, -1])

    def test_client_gone_before_the_answer(self) -> None:
        """A client that went away gets nothing written; the work still ends."""
        exchange = self._get()
        assert exchange.lost is not None
        exchange.lost()
        self.board.waiting[0].callback(None)
        self.assertEqual((exchange.answer, exchange.work), ([], [1, -1]))

    def test_too_many_lookups_is_503(self) -> None:
        """Past the lookup bound the handler answers 503 with Retry-After at once."""
        for _ in range(MAX_LOOKUPS):
            self._get()
        exchange = self._get()
        self.assertEqual(exchange.code, 503)
        self.assertIn((b"retry-after", b"1"), exchange.answer[0][2])
