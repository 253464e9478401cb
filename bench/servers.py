"""The processes of a benchmark run: certificates, configuration files, start, readiness, stop.

Everything listens on 127.0.0.1. The upstream stand-in for SparkPost is nginx (one worker,
HTTPS, `/q/*` -> 200 with a 44-byte GIF, `/f/*` -> 302). The proxies under test are
trackingproxy, nginx as SparkPost's support article configures it ("seed"), nginx tuned with an
upstream keep-alive pool, and Caddy. Processes are started in their own session and stopped by
their PID (then their process group), never by name.
"""

# ruff: noqa: S603, S607  (a benchmark harness: it runs the tools it measures, from PATH)

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from attrs import define, frozen

DOMAIN = "bench.test"
# A valid 1x1 transparent GIF padded to 44 bytes (the LZW sub-block carries one spare byte).
PIXEL = bytes.fromhex(
    "47494638396101000100800000ffffff00000021f90401000000002c"
    "0000000001000100000203440100003b"
)
assert len(PIXEL) == 44
REDIRECT = "https://example.com/landing"
PROXY_CPU = "0"
CLIENT_CPU = "1"
PROXIES = ("trackingproxy", "nginx-seed", "nginx-tuned", "caddy")


@frozen
class Certs:
    ca: Path
    proxy_cert: Path
    proxy_key: Path
    upstream_cert: Path
    upstream_key: Path


def make_certs(directory: Path) -> Certs:
    """ECDSA P-256 certificates from a throw-away CA: bench.test (proxies), 127.0.0.1 (upstream)."""
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    paths = Certs(
        ca=directory / "ca.pem",
        proxy_cert=directory / "proxy.pem",
        proxy_key=directory / "proxy.key",
        upstream_cert=directory / "upstream.pem",
        upstream_key=directory / "upstream.key",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    for name, cert_path, key_path in (
        (DOMAIN, paths.proxy_cert, paths.proxy_key),
        ("127.0.0.1", paths.upstream_cert, paths.upstream_key),
    ):
        issued = ca.issue_cert(name, key_type=trustme.KeyType.ECDSA)
        cert_path.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key_path))
        key_path.chmod(0o600)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- configuration files ----------------------------------------------------------------------
_NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {dir}/{name}-tmp/body;
    proxy_temp_path {dir}/{name}-tmp/proxy;
    fastcgi_temp_path {dir}/{name}-tmp/fastcgi;
    uwsgi_temp_path {dir}/{name}-tmp/uwsgi;
    scgi_temp_path {dir}/{name}-tmp/scgi;
    # Clients (wrk) keep their connections for the whole run, as with the other proxies.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_session_cache shared:{name}:10m;
    ssl_session_tickets on;
{body}
}}
"""

_UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /q/ {{
            root {dir}/www;
            try_files /pixel.gif =500;
            default_type image/gif;
            add_header Cache-Control "no-cache, no-store, must-revalidate";
        }}
        location /f/ {{ return 302 {redirect}; }}
        location / {{ return 404; }}
    }}
"""

_PROXY_SERVER = """\
    server {{
        listen 127.0.0.1:{https} ssl http2;
        listen 127.0.0.1:{http};
        server_name {domain};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
{location}
        }}
    }}
"""

# SparkPost's article: the upstream name in a variable (so nginx resolves it at run time with
# `resolver`), `proxy_pass https://$backend`, HTTP/1.0 upstream and no keep-alive: a new TCP +
# TLS connection to the upstream for every request. Here $backend is an IP literal, which nginx
# parses without asking the resolver (the directive is kept as in the article, never consulted).
_SEED_LOCATION = """\
            resolver 127.0.0.1 valid=300s ipv6=off;
            set $backend "127.0.0.1:{upstream}";
            proxy_pass https://$backend;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;"""

_TUNED_UPSTREAM = """\
    upstream sparkpost {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
"""

_TUNED_LOCATION = """\
            proxy_pass https://sparkpost;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_ssl_session_reuse on;"""

_CADDY_SITE = """\
{scheme}://{domain}:{port} {{
    bind 127.0.0.1
{tls}    reverse_proxy https://127.0.0.1:{upstream} {{
        transport http {{
            tls_trusted_ca_certs {ca}
            keepalive_idle_conns_per_host 64
        }}
    }}
}}
"""


def nginx_upstream_conf(directory: Path, certs: Certs, port: int) -> str:
    (directory / "www").mkdir(exist_ok=True)
    (directory / "www" / "pixel.gif").write_bytes(PIXEL)
    body = _UPSTREAM_SERVER.format(
        port=port,
        cert=certs.upstream_cert,
        key=certs.upstream_key,
        dir=directory,
        redirect=REDIRECT,
    )
    return _NGINX_MAIN.format(dir=directory, name="upstream", body=body)


def nginx_proxy_conf(
    directory: Path, certs: Certs, name: str, https: int, http: int, upstream: int
) -> str:
    tuned = name == "nginx-tuned"
    location = (_TUNED_LOCATION if tuned else _SEED_LOCATION).format(upstream=upstream)
    body = (_TUNED_UPSTREAM.format(upstream=upstream) if tuned else "") + _PROXY_SERVER.format(
        https=https,
        http=http,
        domain=DOMAIN,
        cert=certs.proxy_cert,
        key=certs.proxy_key,
        location=location,
    )
    return _NGINX_MAIN.format(dir=directory, name=name, body=body)


def caddyfile(certs: Certs, https: int, http: int, upstream: int) -> str:
    head = "{\n    admin off\n    auto_https off\n"
    head += "    servers {\n        protocols h1 h2\n    }\n}\n"
    sites = [
        _CADDY_SITE.format(
            scheme=scheme,
            domain=DOMAIN,
            port=port,
            tls=tls,
            upstream=upstream,
            ca=certs.ca,
        )
        for scheme, port, tls in (
            ("https", https, f"    tls {certs.proxy_cert} {certs.proxy_key}\n"),
            ("http", http, ""),
        )
    ]
    return head + "".join(sites)


# -- processes --------------------------------------------------------------------------------
@define
class Server:
    """One started process (tree) listening on ``https`` (and ``http``)."""

    name: str
    proc: subprocess.Popen[bytes]
    https: int
    http: int | None
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM the process we started, then SIGKILL its process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: leftover workers only
        self.proc.wait(timeout=10)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    https: int,
    http: int | None,
    cpu: str,
    env: dict[str, str] | None = None,
) -> Server:
    out = log.open("ab")
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *argv],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    out.close()
    return Server(name, proc, https, http, log)


def trackingproxy_supports(flag: str, repo: Path) -> bool:
    """Whether this checkout's `trackingproxy` subcommand has option ``flag`` (e.g. --no-acme)."""
    help_text = subprocess.run(
        [*_twistd(repo), "trackingproxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_tp_env(repo),
        check=False,
    ).stdout
    return flag in help_text


def _twistd(repo: Path) -> list[str]:
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _tp_env(repo: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{path}" if path else str(repo)}


def start_upstream(directory: Path, certs: Certs) -> Server:
    port = free_port()
    conf = directory / "upstream.conf"
    conf.write_text(nginx_upstream_conf(directory, certs, port))
    (directory / "upstream-tmp").mkdir(exist_ok=True)
    log = directory / "upstream.log"
    argv = ["nginx", "-p", str(directory), "-e", str(directory / "upstream-error.log")]
    return start("upstream", [*argv, "-c", str(conf)], log, port, None, CLIENT_CPU)


def start_trackingproxy(
    directory: Path, certs: Certs, upstream: int, repo: Path, extra: Sequence[str],
    *, label: str = "trackingproxy", own_cert: bool = True,
) -> Server:
    """trackingproxy on CPU 0; ``own_cert=False`` leaves out --cert/--key (``extra`` then says
    where its certificate comes from). ``label`` names the server and its log file."""
    https, http = free_port(), free_port()
    log = directory / f"{label}.log"
    cert = [f"--cert={certs.proxy_cert}", f"--key={certs.proxy_key}"] if own_cert else []
    argv = [
        *_twistd(repo),
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log}",
        "trackingproxy",
        f"--domain={DOMAIN}",
        f"--https-port=tcp:{https}:interface=127.0.0.1",
        f"--http-port=tcp:{http}:interface=127.0.0.1",
        *cert,
        f"--upstream=https://127.0.0.1:{upstream}",
        f"--upstream-ca-bundle={certs.ca}",
        *extra,
    ]
    return start(label, argv, log, https, http, PROXY_CPU, _tp_env(repo))


def start_proxy(
    name: str, directory: Path, certs: Certs, upstream: int, repo: Path, extra: Sequence[str]
) -> Server:
    if name == "trackingproxy":
        return start_trackingproxy(directory, certs, upstream, repo, extra)
    https, http = free_port(), free_port()
    log = directory / f"{name}.log"
    if name == "caddy":
        conf = directory / "Caddyfile"
        conf.write_text(caddyfile(certs, https, http, upstream))
        home = directory / "caddy-home"
        home.mkdir(exist_ok=True)
        env = {"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
        argv = ["caddy", "run", "--adapter", "caddyfile", "--config", str(conf)]
        return start(name, argv, log, https, http, PROXY_CPU, env)
    conf = directory / f"{name}.conf"
    conf.write_text(nginx_proxy_conf(directory, certs, name, https, http, upstream))
    (directory / f"{name}-tmp").mkdir(exist_ok=True)
    argv = ["nginx", "-p", str(directory), "-e", str(directory / f"{name}-error.log")]
    return start(name, [*argv, "-c", str(conf)], log, https, http, PROXY_CPU)


# -- readiness and the functional check -------------------------------------------------------
def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the load generators do not verify either
    return ctx


def fetch(port: int, path: str, tls: bool, timeout: float = 5.0) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port for bench.test: (status, raw headers, body)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock: socket.socket = (
        _client_context().wrap_socket(raw, server_hostname=DOMAIN) if tls else raw
    )
    with sock:
        req = f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
        sock.sendall(req.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head, body


def wait_ready(server: Server, tls: bool = True, timeout: float = 30.0) -> None:
    """Wait until the server answers `/q/` with the pixel; raise with its log tail if not."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            status, _, body = fetch(server.https, "/q/ready", tls)
            if status == 200 and body == PIXEL:
                return
            last = f"status {status}, {len(body)} bytes"
        except (OSError, ValueError, IndexError) as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready ({last}); log tail:\n{server.tail()}")


def check_proxy(server: Server) -> list[str]:
    """The functional check run before measuring: pixel, redirect, over HTTPS and HTTP."""
    problems = []
    ports = [(server.https, True)] + ([(server.http, False)] if server.http else [])
    for port, tls in ports:
        scheme = "https" if tls else "http"
        status, head, body = fetch(port, "/q/check", tls)
        if status != 200 or body != PIXEL or b"image/gif" not in head.lower():
            problems.append(f"{server.name} {scheme} /q/: {status}, {len(body)} bytes")
        status, head, _ = fetch(port, "/f/check", tls)
        if status != 302 or REDIRECT.encode() not in head:
            problems.append(f"{server.name} {scheme} /f/: {status}")
    return problems
