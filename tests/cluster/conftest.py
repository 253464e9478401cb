"""Fixtures for the cluster tests: a real cluster on loopback (see harness.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.acme.conftest import Pebble, pebble_binaries  # noqa: F401
from tests.cluster.harness import (
    REPO,
    HAProxy,
    Replica,
    StandIn,
    find_haproxy,
    issued_count,
    served_serial,
    wait_until,
)
from tests.ports import free_port
from tests.redis_server import RedisServer, _binary_or_skip

LOCK_TTL = 6  # seconds: a killed replica's order lock expires quickly in these tests


class Cluster:
    """redis + pebble + HAProxy + stand-in + ``size`` replicas, all on loopback."""

    def __init__(self, workdir: Path, binaries: tuple[str, str], size: int,
                 domains: list[str], validity: int | None = None) -> None:
        self.workdir = workdir
        self.redis = RedisServer(_binary_or_skip())
        self.pebble = Pebble(binaries, _mkdir(workdir / "pebble"), http_port=free_port(),
                             validity=validity)
        self.standin: StandIn | None = None
        self.front_https = free_port()
        self.domains = domains
        self.size = size
        self.replicas: list[Replica] = []
        self.haproxy: HAProxy | None = None
        self.root = workdir / "pebble-root.pem"

    @property
    def store_url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        self.redis.start()
        self.pebble.start()
        self.root.write_bytes(self.pebble.root_pem())
        self.standin = StandIn(_mkdir(self.workdir / "standin"))
        common = [
            "--acme-directory", self.pebble.directory_url,
            "--acme-ca-bundle", str(self.pebble.ca_bundle),
            "--acme-max-orders-per-hour", "3600",  # short certificates and many test names
            "--email", "ops@example.com",
            "--store", self.store_url, "--order-lock-ttl", str(LOCK_TTL),
            "--upstream", self.standin.url, "--upstream-ca-bundle", str(self.standin.ca_file),
        ]
        for domain in self.domains:
            common += ["--domain", domain]
        for i in range(self.size):
            node = f"replica-{i + 1}"
            self.replicas.append(Replica(node, _mkdir(self.workdir / node), common))
        self.haproxy = HAProxy(find_haproxy(), self.workdir, {
            self.pebble.http_port: ([(r.http_port, r.admin_port) for r in self.replicas], True),
            self.front_https: ([(r.https_port, r.admin_port) for r in self.replicas], False),
        })
        # The balancer first, as in production: a replica orders at once, and the CA's
        # validation request must find HAProxy listening (else it fails and backs off 60 s).
        self.haproxy.start()
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_listening()

    def stop(self) -> None:
        for part in (*self.replicas, self.haproxy, self.standin):
            if part is not None:
                part.stop()
        self.pebble.stop()
        self.redis.close()

    def client(self) -> redis.Redis:
        return self.redis.client()

    def issued(self) -> int:
        return issued_count(self.pebble.log)

    def serials(self, domain: str) -> list[int | None]:
        return [r.serial(domain, self.root) for r in self.replicas]

    def wait_served_everywhere(self, domain: str, timeout: float = 60,
                               replicas: list[Replica] | None = None) -> int:
        """Wait until every (given) replica serves one and the same certificate for
        ``domain``; its serial."""
        group = self.replicas if replicas is None else replicas

        def same() -> int | None:
            found = {r.serial(domain, self.root) for r in group}
            if len(found) == 1 and None not in found:
                return found.pop()
            return None

        return wait_until(f"{domain} served by {[r.node_id for r in group]}", same, timeout,
                          interval=0.1)

    def front_serial(self, domain: str) -> int | None:
        return served_serial(self.front_https, domain, self.root)

    def domains_cli(self, *args: str) -> str:
        tool = Path(sys.executable).with_name("trackingproxy")
        done = subprocess.run(
            [str(tool), "domains", *args, "--store", self.store_url], cwd=REPO,
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_cluster(tmp: Path, binaries: tuple[str, str], **options: object) -> Iterator[Cluster]:
    cluster = Cluster(tmp, binaries, **options)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(
    pebble_binaries: tuple[str, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Three replicas with pebble's default (long) certificates and one configured domain."""
    yield from start_cluster(
        tmp_path_factory.mktemp("cluster"), pebble_binaries, size=3,
        domains=["one.cluster.test"],
    )
