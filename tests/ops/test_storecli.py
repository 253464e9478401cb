"""`trackingproxy store import` and `trackingproxy domains ...` against a real redis-server."""

from __future__ import annotations

import datetime
import io
from pathlib import Path

from twisted.internet.task import Clock

from tests.ports import free_port
from tests.redis_server import RedisServer, redis_server, redis_server_session  # noqa: F401
from trackingproxy.acme.testing import self_signed
from trackingproxy.ops.storecli import main
from trackingproxy.store.contract import AccountRecord, StoredCertificate
from trackingproxy.store.files import FileStore

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(args[0], list(args[1:]), environ={}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_import_copies_valid_certificates_and_accounts_once(
    tmp_path: Path, redis_server: RedisServer  # noqa: F811
) -> None:
    """Valid certificates and the ACME account are imported; an expired one is skipped; a
    second import leaves what the store already has alone."""
    local = FileStore(tmp_path, Clock())
    good = self_signed("good.example.com", NOW - DAY, NOW + 60 * DAY)
    local.write_copy("good.example.com", StoredCertificate(good))
    old = self_signed("old.example.com", NOW - 90 * DAY, NOW - DAY)
    local.write_copy("old.example.com", StoredCertificate(old))
    account = AccountRecord('{"kty": "EC"}', '{"uri": "https://ca/acct/1"}')
    local.save_account("https://ca/dir", account)
    code, out, err = _run("store", "import", "--state-dir", str(tmp_path),
                          "--store", redis_server.url)
    assert (code, err) == (0, "")
    assert f"good.example.com: imported (serial {good.serial_hex})" in out
    assert "old.example.com: skipped (expired" in out
    assert "ACME account for https://ca/dir: imported" in out
    client = redis_server.client()
    assert client.hget("trackingproxy:{good.example.com}:cert", "serial") == \
        good.serial_hex.encode()
    assert not client.exists("trackingproxy:{old.example.com}:cert")
    code, out, _ = _run("store", "import", "--state-dir", str(tmp_path),
                        "--store", redis_server.url)
    assert code == 0 and "already has a certificate; left alone" in out
    assert "the store already has one; left alone" in out


def test_domains_commands(redis_server: RedisServer) -> None:  # noqa: F811
    """add (normalised), list, remove; options may come after the names."""
    assert _run("domains", "add", "Click.Example.com.", "--store", redis_server.url)[1] == \
        "click.example.com: added\n"
    assert _run("domains", "add", "click.example.com", "--store", redis_server.url)[1] == \
        "click.example.com: already in the list\n"
    assert _run("domains", "list", "--store", redis_server.url)[1] == "click.example.com\n"
    assert _run("domains", "remove", "click.example.com", "--store", redis_server.url)[1] == \
        "click.example.com: removed\n"
    assert _run("domains", "list", "--store", redis_server.url)[1] == ""


def test_errors_are_one_line() -> None:
    """No store, a bad action, an unreachable store: exit 1 with one line on stderr."""
    for args, needle in (
        (("domains", "list"), "no store given"),
        (("domains", "frobnicate", "--store", "redis://127.0.0.1:1/0"), "unknown action"),
        (("domains", "list", "--store", f"redis://:pw@127.0.0.1:{free_port()}/0"), "unreachable"),
        (("store", "import", "--store", "redis://127.0.0.1:1/0"), "--state-dir"),
    ):
        code, out, err = _run(*args)
        assert code == 1 and out == "", args
        assert err.count("\n") == 1 and needle in err, err
        assert ":pw@" not in err
