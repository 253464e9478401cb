"""The Redis store's Lua scripts, each refusal and acceptance, against a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.redis_server import RedisServer
from trackingproxy.store.scripts import Scripts

CHANNEL = "t:events"
LOCK, FENCE, CERT, ORDER, ERROR = (f"t:{{a}}:{p}" for p in ("lock", "fence", "cert", "order", "error"))
CERT_FIELDS = ["key_pem", "K", "chain_pem", "C", "serial", "abc"]


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    yield c
    c.close()


@pytest.fixture
def scripts(client: redis.Redis) -> Scripts:
    return Scripts.register(client)


class Events:
    """A subscription to the events channel. ``collect`` publishes a marker and returns what
    came before it: the server delivers in order, so no message can still be on its way."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(CHANNEL)
        assert self.pubsub.get_message(timeout=2.0)["type"] == "subscribe"

    def collect(self) -> list[str]:
        self.client.publish(CHANNEL, "-marker-")
        seen: list[str] = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "message":
                if message["data"] == b"-marker-":
                    return seen
                seen.append(message["data"].decode())
        raise AssertionError(f"the marker never came; saw {seen}")


@pytest.fixture
def events(client: redis.Redis) -> Iterator[Events]:
    e = Events(client)
    yield e
    e.pubsub.close()


def acquire(scripts: Scripts, token: str = "node:t1", ttl_ms: int = 60_000) -> Any:
    return scripts.acquire(keys=[LOCK, FENCE, CERT, ORDER], args=[token, ttl_ms])


def save_cert(scripts: Scripts, token: str, fence: int) -> bytes:
    return scripts.save_cert(
        keys=[LOCK, CERT, ORDER, ERROR], args=[token, fence, CHANNEL, "a", *CERT_FIELDS]
    )


def save_order(scripts: Scripts, token: str, fence: int) -> bytes:
    return scripts.save_order(keys=[LOCK, CERT, ORDER], args=[token, fence, "order_url", "u"])


# -- ACQUIRE ---------------------------------------------------------------------------------
def test_acquire_takes_free_lock_with_next_fence(client: redis.Redis, scripts: Scripts) -> None:
    """ACQUIRE sets the token with a PX expiry and returns the incremented fence."""
    assert acquire(scripts, ttl_ms=5000) == 1
    assert client.get(LOCK) == b"node:t1"
    assert 0 < client.pttl(LOCK) <= 5000


def test_acquire_refuses_held_lock(client: redis.Redis, scripts: Scripts) -> None:
    """ACQUIRE returns nil while another token holds the lock, and leaves it alone."""
    acquire(scripts)
    assert acquire(scripts, token="node:t2") is None
    assert client.get(LOCK) == b"node:t1"
    assert client.get(FENCE) == b"1"


def test_acquire_after_expiry_gets_higher_fence(client: redis.Redis, scripts: Scripts) -> None:
    """Once the lock key expired (deleted here), ACQUIRE succeeds with a higher fence."""
    assert acquire(scripts) == 1
    client.delete(LOCK)
    assert acquire(scripts, token="node:t2") == 2


def test_acquire_fence_above_stored_data(client: redis.Redis, scripts: Scripts) -> None:
    """A lost fence counter never yields a fence below the one stored with the data."""
    client.hset(CERT, mapping={"fence": 7})
    client.hset(ORDER, mapping={"fence": 9})
    assert acquire(scripts) == 10
    assert client.get(FENCE) == b"10"


# -- REFRESH / RELEASE -----------------------------------------------------------------------
def test_refresh_extends_own_lock(client: redis.Redis, scripts: Scripts) -> None:
    """REFRESH with the holder's token resets the expiry."""
    acquire(scripts, ttl_ms=1000)
    assert scripts.refresh(keys=[LOCK], args=["node:t1", 60_000]) == b"ok"
    assert client.pttl(LOCK) > 1000


def test_refresh_refuses_other_token_and_expired(client: redis.Redis, scripts: Scripts) -> None:
    """REFRESH says 'taken' for another token (expiry untouched) and 'expired' without a lock."""
    acquire(scripts, ttl_ms=1000)
    assert scripts.refresh(keys=[LOCK], args=["node:other", 60_000]) == b"taken"
    assert client.pttl(LOCK) <= 1000
    client.delete(LOCK)
    assert scripts.refresh(keys=[LOCK], args=["node:t1", 60_000]) == b"expired"
    assert not client.exists(LOCK)


def test_release_only_own_lock(client: redis.Redis, scripts: Scripts) -> None:
    """RELEASE deletes the lock only for its holder's token."""
    acquire(scripts)
    assert scripts.release(keys=[LOCK], args=["node:other"]) == 0
    assert client.exists(LOCK)
    assert scripts.release(keys=[LOCK], args=["node:t1"]) == 1
    assert not client.exists(LOCK)


# -- SAVE_CERT -------------------------------------------------------------------------------
def test_save_cert_commits_clears_and_publishes(
    client: redis.Redis, scripts: Scripts, events: Events
) -> None:
    """SAVE_CERT with the lock and a current fence replaces the hash (with the fence and a
    server timestamp), drops the order and the error, and publishes ``cert <name>``."""
    fence = acquire(scripts)
    client.hset(CERT, mapping={"ari": "stale"})
    client.hset(ORDER, mapping={"order_url": "u"})
    client.set(ERROR, "boom")
    assert save_cert(scripts, "node:t1", fence) == b"ok"
    stored = client.hgetall(CERT)
    assert stored[b"key_pem"] == b"K" and stored[b"serial"] == b"abc"
    assert stored[b"fence"] == str(fence).encode() and int(stored[b"updated"]) > 0
    assert b"ari" not in stored
    assert not client.exists(ORDER) and not client.exists(ERROR)
    assert events.collect() == ["cert a"]


def test_save_cert_refusals(client: redis.Redis, scripts: Scripts, events: Events) -> None:
    """SAVE_CERT writes nothing and publishes nothing when the lock is missing ('expired'),
    held by another token ('taken') or its fence is older than the stored one ('older')."""
    assert save_cert(scripts, "node:t1", 1) == b"expired"
    fence = acquire(scripts)
    assert save_cert(scripts, "node:other", fence) == b"taken"
    client.hset(CERT, mapping={"fence": fence + 1, "serial": "kept"})
    assert save_cert(scripts, "node:t1", fence) == b"older"
    assert client.hgetall(CERT) == {b"fence": str(fence + 1).encode(), b"serial": b"kept"}
    assert events.collect() == []


def test_save_cert_refuses_fence_older_than_order(client: redis.Redis, scripts: Scripts) -> None:
    """An order written by a newer fence also refuses an older holder's certificate."""
    fence = acquire(scripts)
    client.hset(ORDER, mapping={"fence": fence + 1})
    assert save_cert(scripts, "node:t1", fence) == b"older"
    assert not client.exists(CERT)


# -- SAVE_ORDER ------------------------------------------------------------------------------
def test_save_order_commits_with_fence(client: redis.Redis, scripts: Scripts) -> None:
    """SAVE_ORDER replaces the order hash and records the writer's fence."""
    fence = acquire(scripts)
    client.hset(ORDER, mapping={"stale": "x"})
    assert save_order(scripts, "node:t1", fence) == b"ok"
    assert client.hgetall(ORDER) == {b"fence": str(fence).encode(), b"order_url": b"u"}


def test_save_order_refusals(client: redis.Redis, scripts: Scripts) -> None:
    """SAVE_ORDER refuses a missing lock, another token and an older fence, writing nothing."""
    assert save_order(scripts, "node:t1", 1) == b"expired"
    fence = acquire(scripts)
    assert save_order(scripts, "node:other", fence) == b"taken"
    client.hset(CERT, mapping={"fence": fence + 3})
    assert save_order(scripts, "node:t1", fence) == b"older"
    assert not client.exists(ORDER)


# -- SEED / SAVE_ARI / DOMAINS ---------------------------------------------------------------
def test_seed_only_into_empty(client: redis.Redis, scripts: Scripts, events: Events) -> None:
    """SEED writes (fence 0) and publishes only when no certificate hash exists."""
    assert scripts.seed(keys=[CERT], args=[CHANNEL, "a", *CERT_FIELDS]) == 1
    assert client.hget(CERT, "fence") == b"0"
    assert scripts.seed(keys=[CERT], args=[CHANNEL, "a", "serial", "other"]) == 0
    assert client.hget(CERT, "serial") == b"abc"
    assert events.collect() == ["cert a"]


def test_save_ari_only_for_stored_serial(client: redis.Redis, scripts: Scripts) -> None:
    """SAVE_ARI writes the window only when the stored serial matches."""
    client.hset(CERT, mapping={"serial": "abc"})
    assert scripts.save_ari(keys=[CERT], args=["def", "{}"]) == 0
    assert client.hget(CERT, "ari") is None
    assert scripts.save_ari(keys=[CERT], args=["abc", '{"start": 1}']) == 1
    assert client.hget(CERT, "ari") == b'{"start": 1}'
    assert scripts.save_ari(keys=["t:{b}:cert"], args=["abc", "{}"]) == 0
    assert not client.exists("t:{b}:cert")


def test_domains_publish_only_changes(client: redis.Redis, scripts: Scripts, events: Events) -> None:
    """DOMAINS add/remove report whether the set changed and publish ``domains`` only then."""
    key = "t:domains"
    assert scripts.domains(keys=[key], args=["add", "a.example.com", CHANNEL]) == 1
    assert scripts.domains(keys=[key], args=["add", "a.example.com", CHANNEL]) == 0
    assert scripts.domains(keys=[key], args=["remove", "a.example.com", CHANNEL]) == 1
    assert scripts.domains(keys=[key], args=["remove", "a.example.com", CHANNEL]) == 0
    assert events.collect() == ["domains", "domains"]


def test_scripts_survive_script_flush(client: redis.Redis, scripts: Scripts) -> None:
    """After the server forgot the scripts (restart, SCRIPT FLUSH) they are loaded again."""
    assert acquire(scripts) == 1
    client.script_flush()
    assert scripts.release(keys=[LOCK], args=["node:t1"]) == 1
