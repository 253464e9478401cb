"""The cluster options: --store (and TRACKINGPROXY_STORE_FILE), --store-prefix,
--store-ca-bundle, --node-id, --order-lock-ttl; each bad value is one line naming the fix,
and the store's password appears in no error and no repr."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.test_config import error_of, parse

URL = "redis://ops:p%40ss-word@redis.internal:6380/2"


def test_store_settings() -> None:
    """--store, --store-prefix and --node-id land in the ACME settings; the masked URL hides
    the password everywhere it is shown."""
    config = parse(["--domain", "a.example.com", "--store", URL, "--store-prefix", "prod:",
                    "--node-id", "replica-7", "--order-lock-ttl", "30"])
    store = config.acme.store
    assert store is not None and store.prefix == "prod:"
    assert store.masked == "redis://ops:***@redis.internal:6380/2"
    assert "p@ss-word" not in repr(config) and "p%40ss-word" not in repr(config)
    assert (config.acme.node_id, config.acme.order_lock_ttl) == ("replica-7", 30.0)


def test_defaults_without_a_store() -> None:
    """Without --store: the state directory only, the host name as node id, a 120 s lock."""
    config = parse(["--domain", "a.example.com"])
    assert config.acme.store is None
    assert config.acme.node_id == socket.gethostname()
    assert config.acme.order_lock_ttl == 120.0


def test_store_url_from_a_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """TRACKINGPROXY_STORE_FILE names a file holding the URL (a mounted secret)."""
    secret = tmp_path / "store-url"
    secret.write_text(URL + "\n")
    config = parse(["--domain", "a.example.com"], {"TRACKINGPROXY_STORE_FILE": str(secret)})
    assert config.acme.store is not None
    assert config.acme.store.url.password == "p@ss-word"
    with pytest.raises(SystemExit) as exited:
        parse(["--domain", "a.example.com"], {"TRACKINGPROXY_STORE_FILE": str(tmp_path / "no")})
    assert exited.value.code == 1
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and "TRACKINGPROXY_STORE_FILE" in lines[0] and "cannot read" in lines[0]


def test_domains_may_come_from_the_store_alone() -> None:
    """With --store no --domain is needed at parse time (the store's list is read at start)."""
    assert parse(["--store", URL]).domains == ()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--store", "http://redis:6379/0"], "redis://"),
        (["--store", URL, "--store-prefix", "has space"], "--store-prefix"),
        (["--store", URL, "--store-ca-bundle", "/nonexistent"], "--store-ca-bundle"),
        (["--node-id", "no spaces please"], "--node-id"),
        (["--order-lock-ttl", "0"], "--order-lock-ttl"),
    ],
)
def test_bad_cluster_options_give_one_line(args: list[str], needle: str) -> None:
    """Each bad cluster option ends in one line naming the fix, never the password."""
    message = error_of(["--domain", "a.example.com", *args])
    assert needle in message
    assert "p@ss-word" not in message and "p%40ss-word" not in message


def test_environment_names() -> None:
    """TRACKINGPROXY_STORE and TRACKINGPROXY_NODE_ID work like every other option."""
    config = parse([], {"TRACKINGPROXY_STORE": URL, "TRACKINGPROXY_NODE_ID": "pod-1",
                        "TRACKINGPROXY_DOMAINS": "a.example.com"})
    assert config.acme.store is not None and config.acme.node_id == "pod-1"
    assert os.environ.get("TRACKINGPROXY_STORE") is None
