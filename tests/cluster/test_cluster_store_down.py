"""Redis stopped for 60 s under load: every request still answered, no order placed, the
store's state in metrics and logged once; Redis restarted empty: the replicas write their
local copies (certificates and the domain list) back instead of ordering again."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from functools import partial

import pytest

from tests.acme.conftest import pebble_binaries  # noqa: F401
from tests.cluster.conftest import Cluster, start_cluster
from tests.cluster.harness import Replica, tracebacks, wait_until

OUTAGE = 60.0  # seconds, as the issue asks
DOMAINS = ("a.down.test", "b.down.test")


@pytest.fixture(scope="module")
def cluster(
    pebble_binaries: tuple[str, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    yield from start_cluster(
        tmp_path_factory.mktemp("down"), pebble_binaries, size=3, domains=[DOMAINS[0]]
    )


def _requests(cluster: Cluster, seconds: float) -> tuple[int, list[str]]:
    """Opens and clicks through HAProxy's HTTPS front for ``seconds``: (answered, failures)."""
    context = ssl.create_default_context(cafile=str(cluster.root))
    answered, failures = 0, []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        domain = DOMAINS[i % 2]
        path, expect = ("/q/open-token", 200) if i % 3 else ("/f/click-token", 302)
        i += 1
        try:
            status = _get(context, cluster.front_https, domain, path)
            if status == expect:
                answered += 1
            else:
                failures.append(f"{domain}{path}: {status}")
        except (OSError, http.client.HTTPException) as e:
            failures.append(f"{domain}{path}: {e!r}")
    return answered, failures


def _get(context: ssl.SSLContext, port: int, domain: str, path: str) -> int:
    """One HTTPS request (SNI and Host ``domain``) on a new connection: the status."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=domain) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n"
                    .encode())
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        response.read()
        return response.status


def _store_up(replica: Replica) -> bool:
    return replica.status()["cluster"]["store_up"] is True


def test_store_down_for_a_minute_then_back_empty(cluster: Cluster) -> None:
    """60 s without Redis under load: 0 failed requests, 0 orders, store_up 0 and one log
    line per replica; Redis back empty: re-seeded from the local copies, 0 new orders."""
    cluster.domains_cli("add", DOMAINS[1])
    serials = {d: cluster.wait_served_everywhere(d, timeout=60) for d in DOMAINS}
    issued = cluster.issued()
    cluster.redis.stop()  # no persistence in the tests' redis-server: it comes back empty
    answered, failures = _requests(cluster, OUTAGE)
    assert failures == [] and answered > 100, (answered, failures[:10])
    for r in cluster.replicas:
        assert "trackingproxy_store_up 0.0" in r.metrics()
        assert r.status()["cluster"]["store_up"] is False
        assert r.status()["ready"] is True
        assert r.log_text().count("is unreachable") == 1, r.node_id
    assert cluster.issued() == issued
    cluster.redis.start()
    client = cluster.client()

    def reseeded() -> bool:
        stored = {d: client.hget(f"trackingproxy:{{{d}}}:cert", "serial") for d in DOMAINS}
        return all(s is not None and int(s, 16) == serials[d] for d, s in stored.items())

    wait_until("the certificates written back to the emptied store", reseeded, 15)
    wait_until("the domain list written back",
               lambda: client.sismember("trackingproxy:domains", DOMAINS[1]), 15)
    for r in cluster.replicas:
        wait_until(f"{r.node_id} seeing the store again",
                   partial(_store_up, r), 15)
        assert "reachable again" in r.log_text()
    answered, failures = _requests(cluster, 2)
    assert failures == [] and answered > 0
    for d in DOMAINS:
        assert cluster.serials(d) == [serials[d]] * 3
    assert cluster.issued() == issued
    for r in cluster.replicas:
        assert tracebacks(r.log_text()) == [], r.log_text()[-5000:]
