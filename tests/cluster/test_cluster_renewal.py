"""A renewal made by one replica reaches every replica's TLS listener within 2 s (pebble
issues 60-second certificates here, so the first renewal comes within about a minute)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.acme.conftest import pebble_binaries  # noqa: F401
from tests.cluster.conftest import Cluster, start_cluster
from tests.cluster.harness import tracebacks

DOMAIN = "renew.cluster.test"


@pytest.fixture(scope="module")
def cluster(
    pebble_binaries: tuple[str, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    yield from start_cluster(
        tmp_path_factory.mktemp("renewal"), pebble_binaries, size=3, domains=[DOMAIN],
        validity=60,
    )


def test_renewal_reaches_every_replica_within_two_seconds(cluster: Cluster) -> None:
    """Every replica serves the renewed serial within 2 s of the first one that does."""
    first = cluster.wait_served_everywhere(DOMAIN, timeout=60)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 90
    while len(seen) < len(cluster.replicas) and time.monotonic() < deadline:
        for r in cluster.replicas:
            if r.node_id not in seen:
                serial = r.serial(DOMAIN, cluster.root)
                if serial is not None and serial != first:
                    seen[r.node_id] = time.monotonic()
        time.sleep(0.02)
    assert len(seen) == len(cluster.replicas), f"renewed on {sorted(seen)} only"
    spread = max(seen.values()) - min(seen.values())
    assert spread <= 2.0, f"the renewal took {spread:.2f} s to reach every replica"
    renewed = {r.serial(DOMAIN, cluster.root) for r in cluster.replicas}
    assert len(renewed) == 1
    for r in cluster.replicas:
        assert tracebacks(r.log_text()) == [], r.log_text()[-5000:]
