"""``make cluster-demo``: three replicas sharing one Redis store, offline, in about a minute.

Starts a real redis-server (append-only), pebble (a test ACME CA, 60-second certificates) with
pebble-challtestsrv, the spgo.io stand-in (``demo/standin.py``), HAProxy in TCP mode (round
robin; PROXY v2 to the replicas' HTTP listeners, where pebble validates) and three ``twistd
trackingproxy`` replicas, each with its own ports, node id and state directory, all on
loopback. Then it shows, step by step: one certificate for three replicas; a replica killed
(-9) in the middle of an order and another one finishing that order; a renewal reaching every
replica within moments; requests still answered while Redis is down. Every child is stopped by
its PID at the end, on failure and on Ctrl-C.

Exit status: 0 when every step worked, 1 when a step failed or a tool is missing (the message
says which, with the tail of the relevant log), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.cluster_parts import (  # noqa: E402
    LOCK_TTL,
    HAProxy,
    Issued,
    Redis,
    Replica,
    clean_env,
    describe_facts,
    find_tools,
    front_request,
    key,
    same_serial,
    stop_first,
    text,
)
from demo.run_demo import (  # noqa: E402
    Children,
    DemoError,
    MissingTool,
    Pebble,
    free_ports,
    say,
    start_standin,
    tail,
    wait_for,
)

DOMAIN = "click.demo.test"
# Step 3 adds the first of these; the next one only if the kill came too late (the holder had
# stored the certificate already).
ADDED = ("click2.demo.test", "click3.demo.test", "click4.demo.test")
NODES = ("replica-1", "replica-2", "replica-3")
REQUESTS = 50
STEPS = 5
RENEWAL_WAIT = 70.0  # seconds: a 60-second certificate is renewed when half of it is left
SPREAD_LIMIT = 2.0  # seconds: every replica serves a renewed certificate within this


def step(number: int, text: str) -> None:
    say()
    say(f"[{number}/{STEPS}] {text}")


class Cluster:
    """Everything step 1 started, for the later steps and the summary."""

    def __init__(self, workdir: Path, tools: dict[str, str], children: Children) -> None:
        self.workdir = workdir
        self.children = children
        redis_port, http01, front, *replica_ports = free_ports(3 + 3 * len(NODES))
        self.redis = Redis(tools["redis-server"], workdir, redis_port)
        self.pebble = Pebble(workdir, http01)
        self.issued = Issued(self.pebble, workdir / "pebble.log")
        self.haproxy = HAProxy(tools["haproxy"], workdir, http01, front)
        self.root = workdir / "pebble-root.pem"
        self.replicas: list[Replica] = []
        self._replica_ports = replica_ports
        self.notes: list[str] = []  # the summary, one line per step

    @property
    def front(self) -> int:
        return self.haproxy.https_port

    def start(self) -> None:
        children = self.children
        self.redis.start(children)
        say("    $ " + shlex.join(self.redis.command))
        self.pebble.start(children)
        self.root.write_bytes(self.pebble.root_pem())
        say(f"    pebble: ACME directory {self.pebble.directory_url}, 60-second certificates, "
            "validating HTTP-01 on port "
            f"{self.haproxy.http_port} (HAProxy); its root saved as pebble-root.pem")
        standin_port, standin_ca = start_standin(self.workdir, children)
        say(f"    stand-in for spgo.io: https://127.0.0.1:{standin_port} "
            "(/q/... -> 200 + GIF, /f/... -> 302)")
        common = [
            "--domain", DOMAIN, "--store", self.redis.url,
            "--order-lock-ttl", str(LOCK_TTL),
            "--acme-directory", self.pebble.directory_url,
            "--acme-ca-bundle", self.pebble.api_ca.name,
            "--acme-max-orders-per-hour", "3600",  # 60-second certificates renew often
            "--upstream", f"https://127.0.0.1:{standin_port}",
            "--upstream-ca-bundle", standin_ca.name,
        ]
        ports = self._replica_ports
        self.replicas = [
            Replica(node, self.workdir, ports[3 * i: 3 * i + 3], common)
            for i, node in enumerate(NODES)
        ]
        self.haproxy.start(children, self.replicas)
        say(f"    HAProxy (TCP, round robin): HTTP 127.0.0.1:{self.haproxy.http_port} -> "
            f"replicas with PROXY v2; HTTPS 127.0.0.1:{self.front} -> replicas (TLS passed "
            "through); config in haproxy.cfg")
        for r in self.replicas:
            r.start(children)
        say("    $ " + shlex.join(["twistd", *self.replicas[0].args]))
        say("    (replica-2 and replica-3 alike, each with its own ports, node id and state "
            "directory)")
        for r in self.replicas:
            r.wait_listening(children)
            say(f"    {r.node_id}: pid {r.pid}, HTTP (PROXY) :{r.http_port}, HTTPS "
                f":{r.https_port}, admin http://127.0.0.1:{r.admin_port}/status, "
                f"state in {r.node_id}-state/, log {r.log.name}")

    def client(self) -> redis.Redis:
        return self.redis.client()

    def served_everywhere(self, domain: str, replicas: list[Replica], timeout: float) -> int:
        return wait_for(
            f"{domain} served with one serial by {', '.join(r.node_id for r in replicas)}",
            partial(same_serial, replicas, domain, self.root), timeout, self.children,
        )


# -- the steps ------------------------------------------------------------------------------
def one_certificate(cluster: Cluster) -> None:
    step(2, f"One certificate for three replicas: wait until each serves {DOMAIN}")
    started = time.monotonic()
    serials: dict[str, int] = {}
    for r in cluster.replicas:
        serials[r.node_id] = wait_for(
            f"{r.node_id} serving {DOMAIN} (see {r.log})",
            partial(r.serial, DOMAIN, cluster.root), 60, cluster.children,
        )
    took = time.monotonic() - started
    serial = serials[NODES[0]]
    for node, each in serials.items():
        say(f"    {node}: TLS handshake with SNI {DOMAIN}, verified against pebble's root: "
            f"serial {each:x}")
    ordered = [r.node_id for r in cluster.replicas
               if r.log_lines(f"{DOMAIN}: serving certificate")
               and not r.log_lines("another process is ordering it")]
    if len(set(serials.values())) != 1:
        raise DemoError(f"the replicas serve different certificates: {serials}")
    count = cluster.issued.count()
    say(f"    pebble \"Issued certificate\" lines: {count}")
    if count != 1:
        raise DemoError(f"pebble issued {count} certificates, expected 1\n"
                        f"{tail(cluster.workdir / 'pebble.log')}")
    holders = f" ({ordered[0]} ordered it, the others waited for its lock)" if len(
        ordered) == 1 else ""
    say(f"    one certificate, served by all three after {took:.1f} s{holders}")
    cluster.notes.append(f"one certificate for three replicas: serial {serial:x}, pebble "
                         "issued 1")


def kill_mid_order(cluster: Cluster) -> str:
    """Step 3; the domain that was added."""
    step(3, "A replica killed (-9) in the middle of an order, and another one finishing it")
    client = cluster.client()
    try:
        for domain in ADDED:
            victim = _add_and_kill(cluster, client, domain)
            if victim is not None:
                _finished_by_another(cluster, client, domain, victim)
                return domain
            say("    (the holder had stored the certificate before the kill; once more)")
    finally:
        client.close()
    raise DemoError("three times the holder finished its order before it could be killed")


def _add_and_kill(cluster: Cluster, client: redis.Redis, domain: str) -> Replica | None:
    tool = Path(sys.executable).with_name("trackingproxy")
    command = [str(tool), "domains", "add", domain, "--store", cluster.redis.url]
    say("    $ " + shlex.join(["trackingproxy", *command[1:]]))
    done = subprocess.run(  # noqa: S603 (fixed argument list, no shell)
        command, capture_output=True, text=True, timeout=30, check=False, cwd=cluster.workdir,
        env=clean_env(),
    )
    say("    " + (done.stdout.strip() or done.stderr.strip()))
    if done.returncode != 0:
        raise DemoError(f"`trackingproxy domains add` failed: {done.stderr.strip()}")
    added = time.monotonic()
    order, lock = key(domain, "order"), key(domain, "lock")
    deadline = added + 30
    while not client.exists(order):
        cluster.children.check()
        if time.monotonic() > deadline:
            raise DemoError(f"no replica created an order for {domain} within 30 s "
                            f"(watching {order})")
        time.sleep(0.005)
    token = text(client.get(lock))
    if token is None or client.exists(key(domain, "cert")):
        return None
    node = token.split(":", 1)[0]
    victim = next((r for r in cluster.replicas if r.node_id == node), None)
    if victim is None:
        raise DemoError(f"{lock} names an unknown node: {token!r}")
    pid = victim.pid
    victim.kill9(cluster.children)
    if client.exists(key(domain, "cert")):  # it stored the certificate just before dying
        victim.start(cluster.children)
        victim.wait_listening(cluster.children)
        return None
    say(f"    {order} appeared {time.monotonic() - added:.2f} s later (the order is created, "
        "no certificate yet)")
    say(f"    {lock} = {token}  -> {node} holds the order")
    say(f"    $ kill -9 {pid}   ({node}, in the middle of its order)")
    return victim


def _finished_by_another(
    cluster: Cluster, client: redis.Redis, domain: str, victim: Replica
) -> None:
    killed = time.monotonic()
    lock = key(domain, "lock")
    survivors = [r for r in cluster.replicas if r is not victim]

    def successor() -> str | None:
        token = text(client.get(lock))
        node = token.split(":", 1)[0] if token else None
        if node is not None and node != victim.node_id:
            return node
        for r in survivors:  # a successor that resumed and finished between two polls
            if r.log_lines(f"{domain}: resuming ACME order"):
                return r.node_id
        return None

    heir: str | None = wait_for(f"another replica taking {lock} over", successor,
                                LOCK_TTL * 4, cluster.children)
    say(f"    {lock} = {heir}:... after {time.monotonic() - killed:.1f} s (the dead replica's "
        f"lock expired: --order-lock-ttl {LOCK_TTL})")
    serial = cluster.served_everywhere(domain, survivors, LOCK_TTL * 6)
    say(f"    {domain} served by {' and '.join(r.node_id for r in survivors)} "
        f"{time.monotonic() - killed:.1f} s after the kill: serial {serial:x}")
    for r in survivors:
        for line in r.log_lines(f"{domain}: resuming ACME order"):
            say(f"    {r.node_id} log: " + line.split("] ", 1)[-1])
            heir = r.node_id
    stored = text(client.hget(key(domain, "cert"), "serial"))
    say(f"    {key(domain, 'cert')} serial = {stored}; "
        f"{key(domain, 'order')} exists: {bool(client.exists(key(domain, 'order')))}")
    count = cluster.issued.for_domain(domain)
    say(f"    pebble issued {count} certificate for {domain} "
        f"({cluster.issued.count()} in all so far): the order was finished, not repeated")
    if count != 1:
        raise DemoError(f"pebble issued {count} certificates for {domain}, expected 1")
    restarted = time.monotonic()
    victim.start(cluster.children)
    say(f"    {victim.node_id} restarted (pid {victim.pid}), same state directory")
    victim.wait_listening(cluster.children)
    again = wait_for(f"{victim.node_id} serving {domain}",
                     partial(victim.serial, domain, cluster.root), 30, cluster.children)
    say(f"    {victim.node_id} serves {domain} {time.monotonic() - restarted:.1f} s later: "
        f"serial {again:x} ({'the same' if again == serial else 'ANOTHER'} serial)")
    if again != serial:
        raise DemoError(f"{victim.node_id} serves serial {again:x}, the others {serial:x}")
    cluster.notes.append(
        f"{victim.node_id} killed -9 mid-order for {domain}; {heir} finished the order; "
        f"pebble issued 1 for it; {victim.node_id} restarted with serial {serial:x}"
    )


def renewal(cluster: Cluster) -> None:
    step(4, f"A renewal seen on every replica: wait (up to {RENEWAL_WAIT:.0f} s) for "
            f"{DOMAIN}'s next certificate")
    old = cluster.served_everywhere(DOMAIN, cluster.replicas, 30)
    say(f"    all three serve serial {old:x} now; a 60-second certificate is renewed when "
        "half of it is left")
    seen: dict[str, tuple[float, int]] = {}
    started = time.monotonic()
    while len(seen) < len(cluster.replicas):
        cluster.children.check()
        for r in cluster.replicas:
            if r.node_id in seen:
                continue
            try:
                serial = r.serial(DOMAIN, cluster.root)
            except (OSError, ssl.SSLError):
                continue
            if serial != old:
                seen[r.node_id] = (time.monotonic(), serial)
        if seen and time.monotonic() - min(t for t, _ in seen.values()) > 10:
            break
        if time.monotonic() - started > RENEWAL_WAIT:
            raise DemoError(f"no replica served a new certificate for {DOMAIN} within "
                            f"{RENEWAL_WAIT:.0f} s")
        time.sleep(0.02)
    first = min(t for t, _ in seen.values())
    say(f"    renewed {first - started:.1f} s into this step; each replica's first handshake "
        "with the new certificate:")
    for r in sorted(cluster.replicas, key=lambda r: seen.get(r.node_id, (1e18, 0))[0]):
        if r.node_id not in seen:
            say(f"    {r.node_id}: still the old serial after 10 s")
            continue
        at, serial = seen[r.node_id]
        say(f"    {r.node_id}: +{at - first:.2f} s  serial {serial:x}")
    spread = max(t for t, _ in seen.values()) - first
    if len(seen) < len(cluster.replicas) or spread > SPREAD_LIMIT:
        raise DemoError(f"the renewal did not reach every replica within {SPREAD_LIMIT:.0f} s")
    if len({s for _, s in seen.values()}) != 1:
        raise DemoError(f"the replicas serve different new certificates: {seen}")
    say(f"    every replica within {spread:.2f} s (Redis PUBLISHes each write; the others "
        "reload it)")
    cluster.notes.append(f"renewal of {DOMAIN} on all three replicas within {spread:.2f} s")


def redis_down(cluster: Cluster, added: str) -> None:
    step(5, f"Redis stopped while requests still answer ({REQUESTS} opens and clicks through "
            "HAProxy)")
    cluster.redis.wait_no_lock(15)  # an order cut short would be retried after a back-off
    pid = cluster.redis.proc.pid if cluster.redis.proc else 0
    cluster.redis.stop(cluster.children)
    say(f"    $ kill {pid}   (redis-server stopped)")
    context = ssl.create_default_context(cafile=str(cluster.root))
    outcomes: Counter[str] = Counter()
    sent = time.monotonic()
    for i in range(REQUESTS):
        domain = (DOMAIN, added)[i % 2]
        kind, path = ("open", "/q/") if i % 4 < 2 else ("click", "/f/")
        try:
            status = front_request(cluster.front, domain, f"{path}cluster-demo-{i:02d}", context)
            outcomes[f"{kind} -> {status}"] += 1
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            outcomes[f"{kind} -> {type(e).__name__}"] += 1
    shown = ", ".join(f"{n} x {what}" for what, n in sorted(outcomes.items(), reverse=True))
    say(f"    {REQUESTS} x GET https://{DOMAIN}|{added}:{cluster.front}/q/... or /f/... "
        f"(SNI, verified, via HAProxy) in {time.monotonic() - sent:.1f} s: {shown}")
    answered = outcomes["open -> 200"] + outcomes["click -> 302"]
    if answered != REQUESTS:
        raise DemoError(f"only {answered} of {REQUESTS} requests answered 200/302: {shown}")
    spread = _answered_by(cluster)
    say(f"    answered by (their access logs): {spread}")
    for r in cluster.replicas:
        facts = wait_for(f"{r.node_id} reporting the store down",
                         partial(r.cluster_facts, False), 20, cluster.children)
        say(f"    {r.node_id} /status: {describe_facts(facts)}; /metrics: "
            f"trackingproxy_store_up {r.store_up_metric()}")
    for line in cluster.replicas[0].log_lines("is unreachable")[-1:]:
        say(f"    {cluster.replicas[0].node_id} log: " + line.split("] ", 1)[-1])
    restarted = time.time()
    cluster.redis.start(cluster.children)
    say(f"    redis-server started again (pid {cluster.redis.proc.pid if cluster.redis.proc else 0}"
        ", same port, its append-only file reloaded)")
    for r in cluster.replicas:
        facts = wait_for(f"{r.node_id} reporting the store up and synced again",
                         partial(r.cluster_facts, True, restarted), 30, cluster.children)
        say(f"    {r.node_id} /status: {describe_facts(facts)}; /metrics: "
            f"trackingproxy_store_up {r.store_up_metric()}")
    client = cluster.client()
    try:
        stored = text(client.hget(key(DOMAIN, "cert"), "serial"))
    finally:
        client.close()
    say(f"    {key(DOMAIN, 'cert')} serial after the restart: {stored} (kept on disk)")
    cluster.notes.append(f"Redis down: {answered}/{REQUESTS} requests answered ({spread}); "
                         "store_up false on all three, true (and resynced) once Redis was back")


def _answered_by(cluster: Cluster) -> str:
    """How many of the requests each replica logged (HAProxy's round robin)."""
    deadline = time.monotonic() + 3
    while True:
        counts = {r.node_id: len(r.log_lines("/cluster-demo-")) for r in cluster.replicas}
        if sum(counts.values()) >= REQUESTS or time.monotonic() > deadline:
            return ", ".join(f"{node} {n}" for node, n in counts.items())
        time.sleep(0.1)


def demo(workdir: Path, children: Children, tools: dict[str, str]) -> Cluster:
    say(f"Working directory: {workdir}")
    step(1, "Start Redis, pebble, a stand-in for spgo.io, HAProxy and three replicas")
    cluster = Cluster(workdir, tools, children)
    cluster.start()
    one_certificate(cluster)
    added = kill_mid_order(cluster)
    renewal(cluster)
    redis_down(cluster, added)
    return cluster


def curl_commands(cluster: Cluster) -> None:
    front = cluster.front
    say(f"\nTry (in {cluster.workdir}):")
    for path in ("/q/ZGVtby1vcGVuLXRva2Vu", "/f/ZGVtby1jbGljaw"):
        say("    " + shlex.join([
            "curl", "--silent", "--show-error", "--cacert", cluster.root.name, "--resolve",
            f"{DOMAIN}:{front}:127.0.0.1", "--output", "/dev/null", "--write-out",
            "HTTP %{http_code}\\n", f"https://{DOMAIN}:{front}{path}"]))
    for r in cluster.replicas:
        say(f"    curl -s http://127.0.0.1:{r.admin_port}/status   # {r.node_id}")
    say(f"    redis-cli -p {cluster.redis.port} --scan --pattern '{key('*', '*')}'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-running", action="store_true",
                        help="after the demo, leave everything running until Ctrl-C")
    parser.add_argument("--keep-files", action="store_true",
                        help="keep the working directory (it is always kept on failure)")
    options = parser.parse_args(argv)
    try:
        tools = find_tools()
    except MissingTool as e:
        say(f"cluster demo: {e}")
        return 1

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="trackingproxy-cluster-demo-"))
    children = Children(workdir)
    started = time.monotonic()
    status = 0
    finished = False
    try:
        cluster = demo(workdir, children, tools)
        finished = True
        took = datetime.timedelta(seconds=round(time.monotonic() - started))
        say(f"\nSummary ({took}):")
        for number, note in enumerate(cluster.notes, start=2):
            say(f"    {number}. {note}")
        if options.keep_running:
            curl_commands(cluster)
            say(f"\nEverything keeps running (logs in {workdir}). Ctrl-C stops.")
            while True:
                children.check()
                time.sleep(1)
    except DemoError as e:
        say(f"\ncluster demo FAILED: {e}\n(files and logs kept in {workdir})")
        status = 1
    except redis.RedisError as e:
        say(f"\ncluster demo FAILED: Redis: {e}\n(files and logs kept in {workdir})")
        status = 1
    except KeyboardInterrupt:
        say("\ncluster demo: stopping" if finished else "\ncluster demo: interrupted")
        status = 0 if finished else 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not skip clean-up
        stop_first(children, "replica-")
        children.stop()
    took = datetime.timedelta(seconds=round(time.monotonic() - started))
    if status == 0:
        say(f"\nAll steps worked in {took}; everything stopped.")
    if options.keep_files:
        say(f"Files kept in {workdir}")
    elif status != 1:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
