"""Option parsing, environment variables and every start-up error message."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest

from tests.certs import issue, make_ca, other_key_pem, write_combined, write_pair
from tests.harness import TWISTD
from trackingproxy.config import ProxyConfig, config_from_options
from trackingproxy.errors import ConfigError
from trackingproxy.options import Options

NOW = datetime.datetime.now(datetime.UTC)


def parse(args: list[str], env: dict[str, str] | None = None) -> ProxyConfig:
    opts = Options(environ=env or {})
    opts.parseOptions(args)
    return config_from_options(opts, NOW)


def error_of(args: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(args, env)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    """One --domain is enough; the defaults match the documented ones."""
    config = parse(["--domain", "Click.Example.com."])
    assert config.domains == ("click.example.com",)
    assert (config.upstream.scheme, config.upstream.host, config.upstream.port) == (
        "https",
        "spgo.io",
        443,
    )
    assert config.http_port == "tcp:80"
    assert config.https_port == "tcp:443"
    assert config.upstream_timeout == 10.0
    assert config.redirect_http is False
    assert config.log_format == "combined"
    assert config.log_paths == "full"


def test_repeatable_and_aliases():
    """--domain repeats (duplicates collapse), 'eu' names eu.spgo.io, 'none' disables a listener."""
    config = parse(
        [
            "--domain",
            "a.example.com",
            "--domain",
            "b.example.com",
            "--domain",
            "a.example.com",
            "--upstream",
            "eu",
            "--https-port",
            "none",
            "--trusted-proxy",
            "10.0.0.0/8",
        ]
    )
    assert config.domains == ("a.example.com", "b.example.com")
    assert config.upstream.host == "eu.spgo.io"
    assert config.https_port is None
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8"]


def test_environment_variables():
    """Every option can come from TRACKINGPROXY_*; repeatable ones as comma lists."""
    env = {
        "TRACKINGPROXY_DOMAINS": "click.a.com, click2.a.com",
        "TRACKINGPROXY_UPSTREAM": "us",
        "TRACKINGPROXY_HTTP_PORT": "tcp:8080",
        "TRACKINGPROXY_REDIRECT_HTTP": "yes",
        "TRACKINGPROXY_LOG_FORMAT": "json",
        "TRACKINGPROXY_TRUSTED_PROXIES": "192.0.2.0/24,2001:db8::/32",
        "TRACKINGPROXY_UPSTREAM_TIMEOUT": "2.5",
    }
    config = parse([], env)
    assert config.domains == ("click.a.com", "click2.a.com")
    assert config.http_port == "tcp:8080"
    assert config.redirect_http is True
    assert config.log_format == "json"
    assert len(config.trusted_proxies) == 2
    assert config.upstream_timeout == 2.5


def test_command_line_wins_over_environment():
    """A value on the command line overrides the environment."""
    config = parse(
        ["--domain", "x.example.com", "--http-port", "tcp:81"],
        {"TRACKINGPROXY_DOMAINS": "y.example.com", "TRACKINGPROXY_HTTP_PORT": "tcp:82"},
    )
    assert config.domains == ("x.example.com",)
    assert config.http_port == "tcp:81"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "no domain configured"),
        (["--domain", "not a domain"], "not a valid domain name"),
        (["--domain", "192.0.2.1"], "is an IP address"),
        (["--domain", "localhost"], "not a valid domain name"),
        (["--domain", "a.example.com", "--upstream", "ftp://x"], "--upstream"),
        (["--domain", "a.example.com", "--upstream-timeout", "soon"], "--upstream-timeout"),
        (["--domain", "a.example.com", "--log-format", "xml"], "combined, json"),
        (["--domain", "a.example.com", "--log-paths", "hide"], "full, redacted"),
        (["--domain", "a.example.com", "--trusted-proxy", "10.0.0.300/8"], "--trusted-proxy"),
        (["--domain", "a.example.com", "--http-port", ""], "--http-port"),
        (["--domain", "a.example.com", "--certs-dir", "/nonexistent"], "no such directory"),
        (["--domain", "a.example.com", "--well-known-dir", "/nonexistent"], "no such directory"),
        (["--domain", "a.example.com", "--upstream-ca-bundle", "/nonexistent"], "no such file"),
        (["--domain", "a.example.com", "--cert", "/nonexistent"], "in pairs"),
        (["--domain", "a.example.com", "--cert", "/nonexistent", "--key", "/x"], "cannot read"),
        (["--domain", "a.example.com", "--http2-engine", "go"], "auto, nghttp2, python"),
    ],
)
def test_bad_options_give_one_line(args, needle):
    """Each bad option ends in one line naming the problem and the fix."""
    assert needle in error_of(args)


def test_http2_engine(monkeypatch: pytest.MonkeyPatch):
    """--http2-engine: auto by default; nghttp2 asked for but not loadable is a one-line error
    naming the fix; python always works."""
    from trackingproxy.server import nghttp2
    assert parse(["--domain", "a.example.com"]).http2_engine == "auto"
    assert parse(["--domain", "a.example.com", "--http2-engine", "NGHTTP2"]).http2_engine == (
        "nghttp2"
    )
    monkeypatch.setattr(nghttp2, "_loaded", "libnghttp2 not found (apt-get install libnghttp2-14)")
    message = error_of(["--domain", "a.example.com", "--http2-engine", "nghttp2"])
    assert "apt-get install libnghttp2-14" in message
    assert "--http2-engine python" in message
    assert parse(["--domain", "a.example.com", "--http2-engine", "python"]).http2_engine == "python"
    # auto falls back to the pure-Python engine and says why
    from trackingproxy.server.engines import choose_engine
    from trackingproxy.server.http2_python import PythonH2Connection

    engine, note = choose_engine("auto")
    assert engine is PythonH2Connection
    assert "libnghttp2 not found" in note


def test_bad_boolean_environment():
    """A boolean variable with a value that is not yes/no is refused, naming the variable."""
    opts = Options(environ={"TRACKINGPROXY_REDIRECT_HTTP": "maybe"})
    with pytest.raises(ConfigError, match="TRACKINGPROXY_REDIRECT_HTTP"):
        opts.apply_environment()


def test_certificate_errors(tmp_path: Path):
    """Mismatched key, a certificate for other names, an expired one, garbage: all refused."""
    ca = make_ca()
    good = issue(ca, "click.example.com")
    cert, key = write_pair(good, tmp_path, "good")
    parse(["--domain", "click.example.com", "--cert", str(cert), "--key", str(key)])

    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_bytes(other_key_pem())
    assert "does not match" in error_of(
        ["--domain", "click.example.com", "--cert", str(cert), "--key", str(wrong_key)]
    )
    assert "covers none of the configured domains" in error_of(
        ["--domain", "other.example.com", "--cert", str(cert), "--key", str(key)]
    )
    old = issue(ca, "click.example.com", not_after=NOW - datetime.timedelta(days=1))
    old_cert, old_key = write_pair(old, tmp_path, "old")
    assert "expired" in error_of(
        ["--domain", "click.example.com", "--cert", str(old_cert), "--key", str(old_key)]
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    assert "no PEM certificate" in error_of(
        ["--domain", "click.example.com", "--cert", str(garbage), "--key", str(key)]
    )


def test_certs_dir_and_wildcards(tmp_path: Path):
    """--certs-dir loads NAME.pem files; a wildcard certificate covers every matching domain."""
    ca = make_ca()
    write_combined(issue(ca, "*.example.com"), tmp_path / "wild.pem")
    config = parse(
        ["--domain", "a.example.com", "--domain", "b.example.com", "--certs-dir", str(tmp_path)]
    )
    assert len(config.certificates) == 1
    assert config.certificates[0].covered(config.domains) == ("a.example.com", "b.example.com")
    assert not config.certificates[0].covers("x.y.example.com")


def test_twistd_prints_one_line_and_exits_1(tmp_path: Path):
    """Through the real twistd command, a bad option prints one line, no traceback, status 1."""
    result = _twistd(tmp_path, "--domain", "click.example.com", "--log-format", "xml")
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "trackingproxy: error: --log-format 'xml': choose one of combined, json"
    ]


NO_ACME = ("--domain", "click.example.com", "--no-acme")


def _twistd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def test_bad_endpoint_string_is_one_line(tmp_path: Path):
    """An endpoint string Twisted cannot parse stops start-up with one line naming the option."""
    result = _twistd(
        tmp_path,
        *NO_ACME,
        "--http-port",
        "bogus:80",
        "--https-port",
        "none",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("trackingproxy: error: --http-port 'bogus:80' is not a valid endpoint")


def test_port_in_use_is_one_line(tmp_path: Path):
    """A port that cannot be bound stops start-up with one line naming the fix, status 1."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _twistd(
            tmp_path,
            *NO_ACME,
            "--http-port",
            f"tcp:{port}:interface=127.0.0.1",
            "--https-port",
            "none",
        )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"--http-port tcp:{port}:interface=127.0.0.1: cannot listen" in line
    assert "free the port" in line
