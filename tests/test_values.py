"""Pure value logic: domains and Host parsing, X-Forwarded-For, access log lines, well-known files."""

from __future__ import annotations

from pathlib import Path

import pytest

from trackingproxy.domains import covers, host_from_header
from trackingproxy.errors import ConfigError
from trackingproxy.logs.access import AccessEntry, AccessLog, redact_target
from trackingproxy.proxy.forwarded import ForwardedFor, parse_networks
from trackingproxy.proxy.wellknown import load_well_known


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        (b"click.example.com", "click.example.com"),
        (b"Click.Example.COM:443", "click.example.com"),
        (b"click.example.com.", "click.example.com"),
        (b"user@click.example.com", None),
        (b"click.example.com:http", None),
        (b"click.example.com/evil", None),
        (b"[::1]:80", "[::1]"),
        (b"", None),
        (None, None),
        (b"\xff", None),
    ],
)
def test_host_header_parsing(raw, host):
    """Host headers are normalised; userinfo, bad ports and odd characters are refused."""
    assert host_from_header(raw) == host


def test_wildcard_coverage():
    """*.example.com covers exactly one label below example.com."""
    assert covers("*.example.com", "a.example.com")
    assert not covers("*.example.com", "example.com")
    assert not covers("*.example.com", "a.b.example.com")
    assert covers("A.example.com", "a.example.com")


def test_forwarded_for_untrusted_peer_ignores_header():
    """A client-sent X-Forwarded-For from an untrusted peer is dropped."""
    ff = ForwardedFor(parse_networks(["10.0.0.0/8"]))
    addr = ff.resolve("203.0.113.5", [b"1.2.3.4"])
    assert addr.client == "203.0.113.5"
    assert addr.forwarded_for == b"203.0.113.5"


def test_forwarded_for_trusted_chain():
    """Behind trusted proxies the client is the right-most untrusted address; chain passed on."""
    ff = ForwardedFor(parse_networks(["10.0.0.0/8", "192.0.2.1"]))
    addr = ff.resolve("10.1.1.1", [b"6.6.6.6, 198.51.100.7", b"192.0.2.1"])
    assert addr.client == "198.51.100.7"
    assert addr.forwarded_for == b"6.6.6.6, 198.51.100.7, 192.0.2.1, 10.1.1.1"


def test_forwarded_for_garbage_stops_walk():
    """Garbage in the chain is not believed: the client is the last valid trusted hop."""
    ff = ForwardedFor(parse_networks(["10.0.0.0/8"]))
    assert ff.resolve("10.1.1.1", [b"evil, 10.2.2.2"]).client == "10.2.2.2"


def test_forwarded_for_ipv4_mapped_peer():
    """A dual-stack listener's ::ffff:a.b.c.d peer is shown as a.b.c.d."""
    assert ForwardedFor(()).resolve("::ffff:198.51.100.9", None).client == "198.51.100.9"


def test_redaction():
    """Redacted paths keep /f/ or /q/ and a stable short hash, never the token."""
    token = b"/f/eyJyIjoiam9obkBleGFtcGxlLmNvbSJ9?target=x"
    shown = redact_target(token)
    assert shown.startswith("/f/") and "eyJ" not in shown and len(shown) == 15
    assert shown == redact_target(token)
    assert redact_target(b"/other/path?secret=1").startswith("/other/path?")
    assert "secret" not in redact_target(b"/other/path?secret=1")


def _entry() -> AccessEntry:
    return AccessEntry(
        when=0.0,
        client="198.51.100.1",
        host="click.example.com",
        method="GET",
        target=b"/q/abc",
        protocol="HTTP/1.1",
        status=200,
        sent=44,
        referer="",
        user_agent='Mail "client"',
        duration=0.0021,
        scheme="https",
    )


def test_combined_and_json_lines():
    """Combined lines look like nginx's; JSON lines are one object with the same facts."""
    import json

    lines: list[str] = []
    AccessLog("combined", "full", lines.append).log(_entry())
    assert lines[0].startswith(
        '198.51.100.1 - - [01/Jan/1970:00:00:00 +0000] "GET /q/abc HTTP/1.1" 200 44 "-" '
        '"Mail \\"client\\""'
    )
    AccessLog("json", "redacted", lines.append).log(_entry())
    data = json.loads(lines[1])
    assert data["status"] == 200 and data["target"].startswith("/q/") and data["target"] != "/q/abc"


def test_control_characters_never_reach_a_log_line_raw():
    """CR, LF, NUL, DEL and bytes over 0x7e in client-sent fields are written as \\xHH in
    combined lines (one request is always one line); JSON lines escape them as JSON does."""
    import json

    import attrs

    hostile = attrs.evolve(
        _entry(), target=b"/q/a\r\nforged", user_agent="UA\x00\x1b[31m", referer="r\x7f\xe9"
    )
    lines: list[str] = []
    AccessLog("combined", "full", lines.append).log(hostile)
    assert "\n" not in lines[0] and "\r" not in lines[0] and "\x00" not in lines[0]
    assert '"GET /q/a\\x0D\\x0Aforged HTTP/1.1"' in lines[0]
    assert '"r\\x7F\\xE9" "UA\\x00\\x1B[31m"' in lines[0]
    AccessLog("json", "full", lines.append).log(hostile)
    assert "\n" not in lines[1] and json.loads(lines[1])["user_agent"] == "UA\x00\x1b[31m"


def test_well_known_loading(tmp_path: Path):
    """Files are preloaded with content types; hidden files are skipped; big ones refused."""
    (tmp_path / "apple-app-site-association").write_text("{}")
    (tmp_path / "assetlinks.json").write_text("[]")
    (tmp_path / ".secret").write_text("x")
    (tmp_path / "pki-validation").mkdir()
    (tmp_path / "pki-validation" / "token.txt").write_text("t")
    files = load_well_known(tmp_path)
    assert set(files) == {
        b"/.well-known/apple-app-site-association",
        b"/.well-known/assetlinks.json",
        b"/.well-known/pki-validation/token.txt",
    }
    assert files[b"/.well-known/apple-app-site-association"].content_type == b"application/json"
    assert files[b"/.well-known/pki-validation/token.txt"].content_type.startswith(b"text/plain")
    (tmp_path / "big").write_bytes(b"x" * (1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_well_known(tmp_path)


def test_buffered_access_log_lines(tmp_path: Path):
    """Access lines are written together on the clock's flush, or at once when 64 KiB pile up."""
    from twisted.internet.task import Clock

    from trackingproxy.logs.writer import open_access_log

    clock = Clock()
    path = tmp_path / "access.log"
    writer = open_access_log(str(path), clock)
    writer("one")
    writer("two")
    assert path.read_bytes() == b""
    clock.advance(0.1)
    assert path.read_bytes() == b"one\ntwo\n"
    writer("x" * 70000)
    assert path.stat().st_size == 8 + 70001
    writer("last")
    writer.close()
    assert path.read_bytes().endswith(b"\nlast\n")
    assert clock.getDelayedCalls() == []


def test_access_log_off():
    """--access-log off: nothing is formatted or written."""
    log = AccessLog("combined", "full", None)
    assert not log.enabled
    log.log(_entry())
