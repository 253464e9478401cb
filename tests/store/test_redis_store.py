"""The Redis store beyond the contract: outages, health, answers, the domain list, events,
pipelined reads and the settings check, against real redis-servers on loopback."""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool

from tests.redis_server import RedisServer
from trackingproxy.acme.testing import LogCapture, self_signed
from trackingproxy.store.contract import LockLost, StoredCertificate, StoreUnavailable
from trackingproxy.store.redis import RedisStore, synchronous
from trackingproxy.store.redis import result_of as result
from trackingproxy.store.url import connect, parse_store_url

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
PASSWORD = "pa55-w0rd-xyz"
CERT = StoredCertificate(self_signed("a.example.com", NOW, NOW + 90 * DAY))


def make_store(client: redis.Redis, port: int, password: str | None = None) -> RedisStore:
    auth = ":***@" if password else ""
    return RedisStore(
        client, run=synchronous, clock=Clock(), prefix="t:", node_id="node-a",
        description=f"redis://{auth}127.0.0.1:{port}/0",
    )


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


@pytest.fixture
def own_server(redis_server_session: RedisServer) -> Iterator[RedisServer]:
    """A redis-server of this test alone (with a password), free to stop and restart."""
    server = RedisServer(redis_server_session.binary, password=PASSWORD)
    server.start()
    yield server
    server.close()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    client = redis_server.client()
    yield make_store(client, redis_server.port)
    client.close()


def connected(server: RedisServer, password: str | None) -> tuple[redis.Redis, RedisStore]:
    text = f"redis://:{password}@127.0.0.1:{server.port}/0" if password else server.url
    url = parse_store_url(text)
    client = connect(url, None, timeout=1.0)
    return client, RedisStore(
        client, run=synchronous, clock=Clock(), node_id="n", description=url.masked
    )


# -- outages ---------------------------------------------------------------------------------
def test_stopped_server_is_unavailable_in_one_line(own_server: RedisServer, logs: LogCapture) -> None:
    """With the server stopped every call fails with StoreUnavailable: one line naming the
    masked store and the cause, never the password; health goes down, logged once, and up
    again (logged once) when the server is back."""
    client, store = connected(own_server, PASSWORD)
    changes: list[tuple[bool, str | None]] = []
    store.health.listener = lambda up, reason: changes.append((up, reason))
    assert result(store.load("a.example.com")) is None
    own_server.stop()
    calls: tuple[Callable[[], Deferred[Any]], ...] = (
        lambda: store.load("a.example.com"), lambda: store.acquire("a.example.com", 60),
        lambda: store.put_challenge("h", "t", b"k", 60), lambda: store.ping(),
    )
    for call in calls:
        with pytest.raises(StoreUnavailable) as caught:
            result(call())
        message = str(caught.value)
        assert "\n" not in message and PASSWORD not in message
        assert message.startswith(f"store redis://:***@127.0.0.1:{own_server.port}/0: ")
    assert store.health.up is False and "refused" in (store.health.reason or "")
    own_server.start()
    result(store.ping())
    assert store.health.up is True
    lines = [line for line in logs.lines() if "store redis://" in line]
    assert len(lines) == 2, lines
    assert "is unreachable: " in lines[0] and "placing no orders" in lines[0]
    assert lines[1].endswith("is reachable again")
    assert [up for up, _ in changes] == [True, False, True]
    assert all(PASSWORD not in line for line in logs.lines())
    client.close()


def test_wrong_password_is_unavailable(own_server: RedisServer) -> None:
    """A refused password gives StoreUnavailable without either password in it."""
    client, store = connected(own_server, "not-the-" + PASSWORD)
    with pytest.raises(StoreUnavailable) as caught:
        result(store.load("a.example.com"))
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message and "not-the-" not in message
    assert store.health.up is False
    client.close()


def test_health_logged_once_per_change(store: RedisStore, logs: LogCapture) -> None:
    """Only changes are logged: not the first success, not a repeated failure or success,
    not a refused write (the store answered)."""
    result(store.ping())
    assert logs.lines() == [] and store.health.up is True
    store.health.mark_down(f"store {store.description}: boom")
    store.health.mark_down(f"store {store.description}: again")
    assert store.health.reason == "boom"
    result(store.ping())
    result(store.ping())
    stale = result(store.acquire("a.example.com", 60))
    result(store.release(stale))
    result(store.acquire("a.example.com", 60))
    with pytest.raises(LockLost):
        result(store.save(stale, CERT))
    assert logs.lines() == [
        f"store {store.description} is unreachable: boom; serving the certificates already "
        "loaded, placing no orders",
        f"store {store.description} is reachable again",
    ]
    assert store.health.up is True and store.health.since is not None


# -- answers, domains ------------------------------------------------------------------------
def test_challenges_expire_on_redis_clock(store: RedisStore, redis_server: RedisServer) -> None:
    """An HTTP-01 answer is readable until its ttl passes on Redis's clock, or it is
    deleted; answers are per host and token."""
    result(store.put_challenge("a.example.com", "tok", b"tok.thumb", 0.05))
    result(store.put_challenge("a.example.com", "kept", b"kept.thumb", 60))
    assert result(store.get_challenge("a.example.com", "tok")) == b"tok.thumb"
    assert result(store.get_challenge("b.example.com", "tok")) is None
    deadline = time.monotonic() + 5
    while result(store.get_challenge("a.example.com", "tok")) is not None:
        assert time.monotonic() < deadline, "the answer never expired"
        time.sleep(0.01)
    result(store.delete_challenge("a.example.com", "kept"))
    assert result(store.get_challenge("a.example.com", "kept")) is None
    assert redis_server.client().keys("t:*") == []


def test_domain_list(store: RedisStore) -> None:
    """Domains are added and removed once each and listed sorted."""
    assert result(store.add_domain("b.example.com")) is True
    assert result(store.add_domain("a.example.com")) is True
    assert result(store.add_domain("a.example.com")) is False
    assert result(store.list_domains()) == ["a.example.com", "b.example.com"]
    assert result(store.remove_domain("b.example.com")) is True
    assert result(store.remove_domain("b.example.com")) is False
    assert result(store.list_domains()) == ["a.example.com"]


# -- pipelined reads, corrupt entries ---------------------------------------------------------
class CountingConnection(redis.Connection):
    """Counts the packets sent: a pipeline sends all its commands in one."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


def test_load_many_and_serials_pipelined(redis_server: RedisServer) -> None:
    """load_many reads 600 names in two round trips (batches of 500) and serials in one;
    names without a certificate are left out."""
    pool = redis.ConnectionPool(
        host="127.0.0.1", port=redis_server.port, connection_class=CountingConnection
    )
    client = redis.Redis(connection_pool=pool)
    store = make_store(client, redis_server.port)
    names = [f"d{i}.example.com" for i in range(600)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hset(f"t:{{{name}}}:cert", mapping={
            "key_pem": CERT.cert.key_pem(), "chain_pem": CERT.cert.fullchain_pem(),
            "serial": CERT.cert.serial_hex, "fence": 0,
        })
    pipe.execute()
    CountingConnection.sends = 0
    loaded = result(store.load_many([*names, "missing.example.com"]))
    assert sorted(loaded) == sorted(names) and CountingConnection.sends == 2
    CountingConnection.sends = 0
    serials = result(store.serials([*names, "missing.example.com"]))
    assert serials == {n: CERT.cert.serial_hex for n in names} and CountingConnection.sends == 1
    client.close()


def test_corrupt_entry_is_missing_and_reported_once(
    store: RedisStore, redis_server: RedisServer, logs: LogCapture
) -> None:
    """A truncated chain loads as missing (load and load_many), with one log line."""
    client = redis_server.client()
    client.hset("t:{a.example.com}:cert", mapping={
        "key_pem": CERT.cert.key_pem(), "chain_pem": CERT.cert.fullchain_pem()[:100],
        "serial": "1", "fence": 0,
    })
    assert result(store.load("a.example.com")) is None
    assert result(store.load_many(["a.example.com"])) == {}
    lines = logs.lines()
    assert len(lines) == 1 and "a.example.com is unusable" in lines[0], lines
    client.close()


# -- settings --------------------------------------------------------------------------------
def test_settings_warnings(store: RedisStore, redis_server: RedisServer) -> None:
    """No persistence and an evicting policy each give one warning naming the fix; none
    once both are safe."""
    client = redis_server.client()
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        warnings = result(store.settings_warnings())
        assert len(warnings) == 2
        assert "appendonly yes" in warnings[0] and "maxmemory-policy noeviction" in warnings[1]
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("save", "3600 1")
        assert result(store.settings_warnings()) == []
    finally:
        client.config_set("save", "")
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_settings_unknown_without_config(redis_server_session: RedisServer) -> None:
    """Where CONFIG is disabled (managed services) there is nothing to warn about."""
    server = RedisServer(
        redis_server_session.binary,
        extra=("--save", "", "--appendonly", "no", "--rename-command", "CONFIG", ""),
    )
    server.start()
    try:
        client = server.client()
        assert result(make_store(client, server.port).settings_warnings()) == []
        client.close()
    finally:
        server.close()


# -- events ----------------------------------------------------------------------------------
class Seen:
    """What the watcher delivered, collected from its thread; ``wait_for`` polls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.subscribed = 0

    def event(self, kind: str, arg: str) -> None:
        with self.lock:
            self.events.append((kind, arg))

    def on_subscribed(self) -> None:
        with self.lock:
            self.subscribed += 1

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if check():
                    return
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.events}"
            time.sleep(0.01)


def direct(f: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    f(*args, **kwargs)


def test_watch_delivers_events_and_resubscribes(own_server: RedisServer) -> None:
    """watch() reports ``cert`` after save and seed and ``domains`` after add/remove; after
    the server restarts it subscribes again and says so; stop() ends the thread quickly."""
    client, store = connected(own_server, PASSWORD)
    seen = Seen()
    watch = store.watch(seen.event, seen.on_subscribed, direct)
    try:
        seen.wait_for(lambda: seen.subscribed == 1, "the subscription")
        lock = result(store.acquire("a.example.com", 60))
        result(store.save(lock, CERT))
        assert result(store.seed("b.example.com", CERT)) is True
        result(store.add_domain("c.example.com"))
        result(store.remove_domain("c.example.com"))
        expected = [("cert", "a.example.com"), ("cert", "b.example.com"),
                    ("domains", ""), ("domains", "")]
        seen.wait_for(lambda: seen.events == expected, "four events")
        own_server.kill()
        own_server.start()
        seen.wait_for(lambda: seen.subscribed >= 2, "the second subscription")
        result(store.add_domain("d.example.com"))
        seen.wait_for(lambda: len(seen.events) == 5, "an event after the restart")
    finally:
        started = time.monotonic()
        watch.stop()
        assert not watch.running and time.monotonic() - started < 1.5
        client.close()


class QueueReactor:
    """Stands in for the reactor thread: callFromThread queues, ``drain`` runs the queue."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = (
            queue.Queue()
        )

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args, kwargs))

    def drain(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            try:
                f, args, kwargs = self.calls.get(timeout=0.05)
            except queue.Empty:
                continue
            f(*args, **kwargs)


def test_thread_pool_runner(redis_server: RedisServer) -> None:
    """With the production runner (deferToThreadPool) calls run in the pool and their
    results, health included, arrive on the reactor thread."""
    reactor = QueueReactor()
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-store")
    pool.start()
    client = redis_server.client()
    try:
        store = RedisStore(
            client, run=lambda f: deferToThreadPool(reactor, pool, f), clock=Clock(),
            node_id="n", description="redis://test",
        )
        marked_in: list[threading.Thread] = []
        store.health.listener = lambda up, reason: marked_in.append(threading.current_thread())
        seen: list[Any] = []
        store.acquire("a.example.com", 60).addBoth(seen.append)
        reactor.drain(lambda: bool(seen))
        assert seen[0].fence == 1 and store.health.up is True
        assert marked_in == [threading.current_thread()]
    finally:
        pool.stop()
        client.close()
