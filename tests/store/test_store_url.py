"""The store URL: parsing, masking (the password never shown), connecting and the probe."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from tests.ports import free_port
from tests.redis_server import RedisServer
from trackingproxy.errors import ConfigError
from trackingproxy.store.contract import StoreUnavailable
from trackingproxy.store.url import StoreURL, connect, parse_store_url, probe, unavailable_cause

SECRET = "s3cr3t/p@ss:w0rd"
ENCODED = "s3cr3t%2Fp%40ss%3Aw0rd"


def test_plain_url() -> None:
    """redis://user:password@host:port/db gives each part; the port and db have defaults."""
    url = parse_store_url("redis://app:pw@redis.internal:6380/2")
    assert (url.tls, url.sentinel, url.hosts, url.db) == (False, False, (("redis.internal", 6380),), 2)
    assert (url.username, url.password, url.service) == ("app", "pw", None)
    bare = parse_store_url("redis://localhost")
    assert (bare.hosts, bare.db, bare.username, bare.password) == ((("localhost", 6379),), 0, None, None)


def test_tls_and_password_only() -> None:
    """rediss:// means TLS; ``:password@`` gives a password without a user."""
    url = parse_store_url("rediss://:pw@[::1]:6390/0")
    assert url.tls and url.hosts == (("::1", 6390),)
    assert (url.username, url.password) == (None, "pw")
    assert url.masked == "rediss://:***@[::1]:6390/0"


def test_sentinel_url() -> None:
    """redis+sentinel:// takes several hosts (default port 26379), the service and the db."""
    url = parse_store_url("rediss+sentinel://u:pw@s1:26380,s2,s3:26381/mymaster/3")
    assert url.sentinel and url.tls
    assert url.hosts == (("s1", 26380), ("s2", 26379), ("s3", 26381))
    assert (url.service, url.db) == ("mymaster", 3)
    assert url.masked == "rediss+sentinel://u:***@s1:26380,s2:26379,s3:26381/mymaster/3"


def test_percent_encoded_password() -> None:
    """A percent-encoded password is decoded for AUTH and masked everywhere else."""
    url = parse_store_url(f"redis://app:{ENCODED}@h:1/0")
    assert url.password == SECRET
    for text in (url.masked, str(url), repr(url)):
        assert SECRET not in text and ENCODED not in text and "pw" not in text
    assert url.masked == "redis://app:***@h:1/0"


@pytest.mark.parametrize(
    "text",
    [
        f"http://u:{ENCODED}@h:1/0",
        f"redis://u:{ENCODED}@h:notaport/0",
        f"redis://u:{ENCODED}@h:1/zero",
        f"redis://u:{ENCODED}@a:1,b:2/0",
        f"redis+sentinel://u:{ENCODED}@a:1,b:2",
        f"redis://u:{ENCODED}@h:1/0?ssl_cert_reqs=none",
        f"redis://u:{ENCODED}@:1/0",
        f"redis://u:{ENCODED}@h:1/0/extra",
        f"u:{ENCODED}@h:1",
    ],
)
def test_bad_urls_name_the_fix_without_the_password(text: str) -> None:
    """Anything else is a ConfigError: one line, naming the accepted forms, no password."""
    with pytest.raises(ConfigError) as caught:
        parse_store_url(text)
    message = str(caught.value)
    assert "\n" not in message and "redis://" in message
    assert SECRET not in message and ENCODED not in message


def test_connect_plain_and_tls(tmp_path: Path) -> None:
    """connect gives bounded timeouts, the credentials and db, and TLS with the CA bundle."""
    bundle = tmp_path / "ca.pem"
    client = connect(parse_store_url("rediss://u:pw@h:7000/4"), bundle, timeout=1.5)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h", 7000, 4)
    assert (kwargs["username"], kwargs["password"]) == ("u", "pw")
    assert kwargs["socket_timeout"] == 1.5 and kwargs["socket_connect_timeout"] == 1.5
    assert kwargs["ssl_ca_certs"] == str(bundle)
    assert client.connection_pool.connection_class is redis.SSLConnection
    plain = connect(parse_store_url("redis://h:7000/0"), None)
    assert plain.connection_pool.connection_class is redis.Connection


def test_connect_sentinel() -> None:
    """A Sentinel URL gives a client of the service's master (nothing is contacted yet)."""
    client = connect(parse_store_url("redis+sentinel://u:pw@s1:1,s2:2/mymaster/1"), None)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("pw", 1)


def test_url_value_is_frozen() -> None:
    """StoreURL is an immutable value."""
    url = parse_store_url("redis://h:1/0")
    assert isinstance(url, StoreURL)
    with pytest.raises(AttributeError):
        url.db = 3  # type: ignore[misc]


# -- probe -----------------------------------------------------------------------------------
def _probe_message(text: str) -> str:
    url = parse_store_url(text)
    client = connect(url, None, timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            probe(client, url.masked)
    finally:
        client.close()
    message = str(caught.value)
    assert "\n" not in message and url.masked in message
    return message


def test_probe_unreachable() -> None:
    """Nothing listening: 'unreachable (connection refused / timed out)'."""
    message = _probe_message(f"redis://u:{ENCODED}@127.0.0.1:{free_port()}/0")
    assert "unreachable (connection refused / timed out)" in message
    assert SECRET not in message


def test_probe_wrong_password(redis_server_session: RedisServer) -> None:
    """A password the server refuses, or none where one is required: 'AUTH failed'."""
    server = RedisServer(redis_server_session.binary, password="right-one")
    server.start()
    try:
        wrong = _probe_message(f"redis://:{ENCODED}@127.0.0.1:{server.port}/0")
        missing = _probe_message(f"redis://127.0.0.1:{server.port}/0")
        probe(server.client(), "ok")  # the right password passes
    finally:
        server.close()
    for message in (wrong, missing):
        assert "wrong password or user (AUTH failed" in message
        assert SECRET not in message and "right-one" not in message


@pytest.fixture
def http_server() -> Iterator[int]:
    """A loopback TCP server answering every connection with an HTTP 400."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=2)
    listener.close()


def test_probe_not_redis(http_server: int) -> None:
    """An HTTP server on that port: 'not a Redis server'."""
    message = _probe_message(f"redis://u:{ENCODED}@127.0.0.1:{http_server}/0")
    assert "not a Redis server" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (redis.ConnectionError("Error 111 connecting to h:1. Connection refused."), True),
        (redis.TimeoutError("Timeout reading from socket"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (redis.AuthenticationError("invalid username-password pair"), True),
        (redis.ResponseError("MISCONF Redis is configured to save RDB snapshots"), True),
        (redis.ResponseError("NOAUTH Authentication required."), True),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (redis.ResponseError("ERR Error running script"), False),
    ],
)
def test_unavailable_cause(error: Exception, outage: bool) -> None:
    """Errors meaning the store cannot serve give one line; other errors (bugs) give None."""
    cause = unavailable_cause(error)
    assert (cause is not None) is outage
    if cause is not None:
        assert "\n" not in cause and cause


def test_unavailable_cause_hides_password() -> None:
    """A password echoed in an error (it never should be) is masked all the same."""
    cause = unavailable_cause(redis.ConnectionError(f"cannot use {SECRET}\nat all"), SECRET)
    assert cause == "cannot use *** at all"
