"""The store URL against real servers on loopback: ``rediss://`` (TLS verified against a
private CA given as ``--store-ca-bundle``) and ``redis+sentinel://`` (the master found through
Sentinel, and found again after Sentinel promotes a replica)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from twisted.internet.task import Clock

from tests.ports import free_port
from tests.redis_server import (
    RedisServer,
    SentinelServer,
    TLSFiles,
    make_tls_files,
    require_redis_server,
    require_tls_support,
)
from trackingproxy.acme.testing import self_signed
from trackingproxy.store.contract import StoredCertificate, StoreUnavailable
from trackingproxy.store.redis import RedisStore, synchronous
from trackingproxy.store.redis import result_of as result
from trackingproxy.store.url import StoreURL, connect, parse_store_url, probe

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
CERT = StoredCertificate(self_signed("a.example.com", NOW, NOW + datetime.timedelta(days=90)))
PASSWORD = "tls-pa55-w0rd"
FAILOVER_WAIT = 20.0  # seconds: Sentinel needs about 3 (down after 1 s, then the election)


def store_for(text: str, ca_bundle: Path | None) -> tuple[StoreURL, redis.Redis, RedisStore]:
    """The URL, client and store the proxy would make of ``--store text``."""
    url = parse_store_url(text)
    client = connect(url, ca_bundle, timeout=1.0)
    store = RedisStore(
        client, run=synchronous, clock=Clock(), prefix="t:", node_id="n",
        description=url.masked,
    )
    return url, client, store


def probe_message(text: str, ca_bundle: Path | None) -> str:
    """The StoreUnavailable line of the start-up probe (checked to be one line, masked)."""
    url = parse_store_url(text)
    client = connect(url, ca_bundle, timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            probe(client, url.masked)
    finally:
        client.close()
    message = str(caught.value)
    assert "\n" not in message and url.masked in message, message
    assert PASSWORD not in message, message
    return message


def round_trip(store: RedisStore) -> None:
    """Seed and load a certificate, take a fenced lock and save through it, edit the
    domain list: each kind of call the proxy makes (plain commands, pipelines, Lua)."""
    assert result(store.seed("a.example.com", CERT)) is True
    loaded = result(store.load("a.example.com"))
    assert loaded is not None and loaded.cert.fullchain_pem() == CERT.cert.fullchain_pem()
    lock = result(store.acquire("b.example.com", 60))
    result(store.save(lock, CERT))
    assert sorted(result(store.load_many(["a.example.com", "b.example.com"]))) == [
        "a.example.com", "b.example.com",
    ]
    assert result(store.add_domain("a.example.com")) is True
    assert result(store.list_domains()) == ["a.example.com"]


@pytest.fixture(scope="module")
def binary() -> str:
    return require_redis_server()


@pytest.fixture(scope="module")
def tls_binary(binary: str) -> str:
    """redis-server, built with TLS (skipped otherwise, failed under CI=true)."""
    require_tls_support(binary)
    return binary


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A private CA and a certificate it signed for 127.0.0.1."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tls_binary: str, tls_files: TLSFiles) -> Iterator[RedisServer]:
    """A redis-server speaking only TLS, with a password."""
    server = RedisServer(tls_binary, tls=tls_files, password=PASSWORD)
    server.start()
    yield server
    server.close()


@pytest.fixture
def tls_clean(tls_server: RedisServer) -> RedisServer:
    tls_server.flushall()
    return tls_server


# -- rediss:// ---------------------------------------------------------------------------------
def test_rediss_with_ca_bundle_round_trip(tls_clean: RedisServer, tls_files: TLSFiles) -> None:
    """rediss:// with --store-ca-bundle = the private CA passes the probe and carries every
    kind of store call over TLS; plain redis:// to the same port gets nowhere."""
    text = f"rediss://:{PASSWORD}@127.0.0.1:{tls_clean.port}/0"
    url, client, store = store_for(text, tls_files.ca)
    try:
        assert client.connection_pool.connection_class is redis.SSLConnection
        probe(client, url.masked)
        round_trip(store)
        assert store.health.up is True
    finally:
        client.close()
    assert tls_clean.client().exists("t:{a.example.com}:cert") == 1
    plain = probe_message(text.replace("rediss://", "redis://"), None)
    assert "unreachable" in plain


@pytest.mark.parametrize("which", ["system CAs", "another CA"])
def test_rediss_untrusted_certificate(
    tls_server: RedisServer, tmp_path: Path, which: str
) -> None:
    """Without the CA bundle (system CAs) or with another CA the probe fails in one line
    naming the certificate problem and the option that fixes it, without the password."""
    bundle = None if which == "system CAs" else make_tls_files(tmp_path).ca
    message = probe_message(f"rediss://:{PASSWORD}@127.0.0.1:{tls_server.port}/0", bundle)
    assert "TLS certificate not trusted" in message and "certificate verify failed" in message
    assert "--store-ca-bundle" in message


def test_rediss_certificate_for_another_name(tls_binary: str, tmp_path: Path) -> None:
    """A certificate from the trusted CA but for another name is refused (the host is checked)."""
    files = make_tls_files(tmp_path, "redis.internal")
    server = RedisServer(tls_binary, tls=files, password=PASSWORD)
    server.start()
    try:
        message = probe_message(f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0", files.ca)
    finally:
        server.close()
    assert "TLS certificate not trusted" in message and "mismatch" in message


def test_rediss_wrong_password(tls_server: RedisServer, tls_files: TLSFiles) -> None:
    """Over a trusted TLS connection a refused password is told as such, neither password shown."""
    message = probe_message(f"rediss://:not-the-{PASSWORD}@127.0.0.1:{tls_server.port}/0",
                            tls_files.ca)
    assert "wrong password or user (AUTH failed" in message and "not-the-" not in message


# -- redis+sentinel:// -------------------------------------------------------------------------
@pytest.fixture
def sentinel_pair(binary: str) -> Iterator[tuple[RedisServer, SentinelServer]]:
    """A master with a password and one Sentinel monitoring it as ``mymaster``."""
    master = RedisServer(binary, password=PASSWORD)
    sentinel = SentinelServer(binary, master.port, password=PASSWORD)
    try:
        master.start()
        sentinel.start()
        yield master, sentinel
    finally:
        sentinel.close()
        master.close()


def test_sentinel_round_trip(sentinel_pair: tuple[RedisServer, SentinelServer]) -> None:
    """redis+sentinel://sentinels/mymaster/0 finds the master (past a Sentinel that is
    down), authenticates to it with the URL's password and carries every kind of call."""
    master, sentinel = sentinel_pair
    text = f"redis+sentinel://:{PASSWORD}@127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}/mymaster/0"
    url, client, store = store_for(text, None)
    try:
        probe(client, url.masked)
        round_trip(store)
    finally:
        client.close()
    assert master.client().smembers("t:domains") == {b"a.example.com"}


def test_sentinel_unknown_service(sentinel_pair: tuple[RedisServer, SentinelServer]) -> None:
    """A service name the Sentinels do not know is told as such, not as a network failure."""
    _, sentinel = sentinel_pair
    message = probe_message(f"redis+sentinel://:{PASSWORD}@127.0.0.1:{sentinel.port}/nope/0", None)
    assert "name no usable master 'nope'" in message and "unreachable" not in message


def test_sentinel_unreachable() -> None:
    """No Sentinel answering: 'unreachable', each Sentinel named by its address only."""
    port = free_port()
    message = probe_message(f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/mymaster/0", None)
    assert "unreachable" in message and f"Sentinel 127.0.0.1:{port}" in message
    assert "redis.client.Redis" not in message and len(message) < 400, message


def test_rediss_sentinel_round_trip(
    tls_binary: str, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """rediss+sentinel:// speaks TLS to the Sentinel and to the master, both verified
    against the CA bundle; another CA is refused as an untrusted certificate."""
    master = RedisServer(tls_binary, tls=tls_files, password=PASSWORD)
    sentinel = SentinelServer(tls_binary, master.port, password=PASSWORD, tls=tls_files)
    try:
        master.start()
        sentinel.start()
        url, client, store = store_for(sentinel.url, tls_files.ca)
        try:
            assert url.tls and url.sentinel
            probe(client, url.masked)
            round_trip(store)
        finally:
            client.close()
        message = probe_message(sentinel.url, make_tls_files(tmp_path).ca)
        assert "TLS certificate not trusted" in message
    finally:
        sentinel.close()
        master.close()


def test_sentinel_failover(binary: str) -> None:
    """When the master dies and Sentinel promotes its replica, the same store (no new
    client) fails with one-line StoreUnavailable meanwhile, then reaches the new master by
    itself: what was written before is there (replicated) and fenced writes work."""
    master = RedisServer(binary, password=PASSWORD)
    replica = RedisServer(binary, password=PASSWORD, replica_of=master.port)
    sentinel = SentinelServer(binary, master.port, password=PASSWORD)
    client: redis.Redis | None = None
    try:
        master.start()
        replica.start()
        replica.wait_replicating()
        sentinel.start()
        sentinel.wait_replicas_known(1)
        url, client, store = store_for(sentinel.url, None)
        probe(client, url.masked)
        round_trip(store)
        assert master.client().wait(1, 5000) == 1  # the replica has every write

        master.kill()
        started = time.monotonic()
        outages: list[str] = []
        while True:
            try:
                domains = result(store.list_domains())
                break
            except StoreUnavailable as e:
                outages.append(str(e))
            assert time.monotonic() - started < FAILOVER_WAIT, (
                f"no new master after {FAILOVER_WAIT:g} s: {outages[-1:]}\n{sentinel.log}"
            )
            time.sleep(0.05)
        took = time.monotonic() - started

        assert sentinel.master_address() == ("127.0.0.1", replica.port)
        replica.wait_role("master", timeout=1.0)
        assert domains == ["a.example.com"]
        assert result(store.load("a.example.com")) is not None
        lock = result(store.acquire("c.example.com", 60))
        result(store.save(lock, CERT))
        assert replica.client().exists("t:{c.example.com}:cert") == 1
        assert outages and store.health.up is True
        assert all("\n" not in m and PASSWORD not in m for m in outages)
        assert took < FAILOVER_WAIT
    finally:
        if client is not None:
            client.close()
        sentinel.close()
        replica.close()
        master.close()
