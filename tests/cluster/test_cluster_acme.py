"""Three replicas behind HAProxy share one Redis store and one pebble account: one
certificate per name, orders resumed after kill -9, fenced writes after SIGSTOP, domains
added and removed cluster-wide. (Module-scoped cluster: the tests run in this order.)"""

from __future__ import annotations

import signal
import time
from functools import partial

from tests.cluster.conftest import LOCK_TTL, Cluster
from tests.cluster.harness import Replica, tracebacks, wait_until

PREFIX = "trackingproxy:"


def _key(domain: str, part: str) -> str:
    return f"{PREFIX}{{{domain}}}:{part}"


def _holder(cluster: Cluster, domain: str) -> Replica:
    """The replica whose node id is in the domain's order lock."""
    client = cluster.client()
    token = wait_until(f"the order lock of {domain}",
                       lambda: client.get(_key(domain, "lock")), 30, interval=0.005)
    node = token.decode().split(":", 1)[0]
    return next(r for r in cluster.replicas if r.node_id == node)


def _http_status(replica: Replica, host: str, path: str = "/q/probe") -> int:
    """The status of a plain-HTTP request to the replica (sent through HAProxy's PROXY v2
    would need HAProxy; the replica's port speaks PROXY, so send a v1 header ourselves)."""
    import socket

    with socket.create_connection(("127.0.0.1", replica.http_port), timeout=5) as s:
        s.sendall(b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 80\r\n"
                  + f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(200)
    return int(head.split()[1])


def _serves(replica: Replica, host: str) -> bool:
    return _http_status(replica, host) != 421


def _refuses(replica: Replica, host: str) -> bool:
    return _http_status(replica, host) == 421


def test_one_certificate_for_three_replicas(cluster: Cluster) -> None:
    """pebble issues exactly one certificate for the configured name, validated through
    HAProxy round-robin, and every replica serves that serial."""
    serial = cluster.wait_served_everywhere("one.cluster.test", timeout=60)
    assert cluster.issued() == 1
    assert cluster.front_serial("one.cluster.test") == serial
    stored = cluster.client().hget(_key("one.cluster.test", "cert"), "serial")
    assert stored is not None and int(stored, 16) == serial
    for r in cluster.replicas:
        status = r.status()["cluster"]
        assert status["node_id"] == r.node_id and status["store_up"] is True
        assert "trackingproxy_store_up 1.0" in r.metrics()


def test_domain_added_reaches_every_replica_and_gets_one_certificate(cluster: Cluster) -> None:
    """`trackingproxy domains add` reaches every replica within 2 s (no SIGHUP); one
    certificate is ordered for it; `remove` makes every replica answer 421 within 2 s."""
    before = cluster.issued()
    assert _http_status(cluster.replicas[0], "two.cluster.test") == 421
    assert "added" in cluster.domains_cli("add", "two.cluster.test")
    start = time.monotonic()
    for r in cluster.replicas:
        wait_until(f"{r.node_id} serving two.cluster.test",
                   partial(_serves, r, "two.cluster.test"), 2, interval=0.02)
    assert time.monotonic() - start < 2
    cluster.wait_served_everywhere("two.cluster.test", timeout=60)
    assert cluster.issued() == before + 1
    assert "two.cluster.test" in cluster.domains_cli("list").split()
    cluster.domains_cli("remove", "two.cluster.test")
    start = time.monotonic()
    for r in cluster.replicas:
        wait_until(f"{r.node_id} refusing two.cluster.test",
                   partial(_refuses, r, "two.cluster.test"), 2, interval=0.02)
    assert time.monotonic() - start < 2


def _kill_in_window(cluster: Cluster, domain: str, after_finalize: bool) -> Replica | None:
    """Add ``domain``, kill -9 the replica holding its order lock once the order exists
    (and, with ``after_finalize``, once pebble issued the certificate, before the holder
    stored it); the victim, or None when the window was missed."""
    client = cluster.client()
    issued_before = cluster.issued()
    cluster.domains_cli("add", domain)
    wait_until(f"the stored order of {domain}",
               lambda: client.exists(_key(domain, "order")), 30, interval=0.002)
    victim = _holder(cluster, domain)
    if after_finalize:
        wait_until(f"pebble issuing {domain}", lambda: cluster.issued() > issued_before, 30,
                   interval=0.002)
    if client.exists(_key(domain, "cert")):
        return None  # too late: the holder finished first
    victim.kill9()
    return victim


def _resumed_by_another(cluster: Cluster, domain: str, after_finalize: bool) -> None:
    for attempt in range(3):
        issued_before = cluster.issued()
        name = f"{attempt}.{domain}"
        victim = _kill_in_window(cluster, name, after_finalize)
        if victim is None:
            continue
        survivors = [r for r in cluster.replicas if r is not victim]
        serial = cluster.wait_served_everywhere(name, timeout=LOCK_TTL * 6, replicas=survivors)
        assert cluster.issued() == issued_before + 1, "a second certificate was issued"
        assert any("resuming ACME order" in r.log_text() for r in survivors)
        victim.start()
        victim.wait_listening()
        cluster.wait_served_everywhere(name, timeout=20)
        assert victim.serial(name, cluster.root) == serial
        return
    raise AssertionError("the holder finished before it could be killed, three times")


def test_kill9_after_the_order_was_created(cluster: Cluster) -> None:
    """kill -9 of the lock holder after its order was created: another replica resumes the
    stored order and completes it; no second issuance."""
    _resumed_by_another(cluster, "created.cluster.test", after_finalize=False)


def test_kill9_after_finalize(cluster: Cluster) -> None:
    """kill -9 of the lock holder after pebble issued the certificate but before it was
    stored: another replica downloads it from the resumed order; no second issuance."""
    _resumed_by_another(cluster, "final.cluster.test", after_finalize=True)


def test_paused_holder_cannot_overwrite(cluster: Cluster) -> None:
    """A holder stopped (SIGSTOP) past its lock's expiry and then continued cannot overwrite
    what its successor stored: the stored certificate keeps the successor's fence."""
    domain = "paused.cluster.test"
    client = cluster.client()
    cluster.domains_cli("add", domain)
    wait_until(f"the stored order of {domain}",
               lambda: client.exists(_key(domain, "order")), 30, interval=0.002)
    paused = _holder(cluster, domain)
    paused.signal(signal.SIGSTOP)
    try:
        others = [r for r in cluster.replicas if r is not paused]
        cluster.wait_served_everywhere(domain, timeout=LOCK_TTL * 6, replicas=others)
        fence, updated = client.hmget(_key(domain, "cert"), ["fence", "updated"])
    finally:
        paused.signal(signal.SIGCONT)
    wait_until(f"{paused.node_id} told its lock is gone",
               lambda: f"{domain}: the lock on {domain}" in paused.log_text(), 20)
    time.sleep(1)  # whatever the continued holder still does, it does now
    assert client.hmget(_key(domain, "cert"), ["fence", "updated"]) == [fence, updated]
    serial = cluster.wait_served_everywhere(domain, timeout=20)
    assert int(client.hget(_key(domain, "cert"), "serial"), 16) == serial


def test_no_traceback_in_any_replica_log(cluster: Cluster) -> None:
    """Nothing above logged a traceback in any replica."""
    for r in cluster.replicas:
        assert tracebacks(r.log_text()) == [], r.log_text()[-5000:]
