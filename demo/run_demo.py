"""``make demo``: the whole flow on one machine, offline, in about a minute.

Starts pebble (a test ACME CA) with pebble-challtestsrv (its DNS, resolving every name to
127.0.0.1), a stand-in for spgo.io (``demo/standin.py``) and the real proxy (``twistd
trackingproxy``) on free loopback ports; waits until the proxy has obtained certificates for two
demo domains; prints and runs the curl commands for an open and a click over HTTPS; shows the
served certificate and waits for its renewal (pebble issues 60-second certificates here). Every
child is stopped by its PID at the end, on failure and on Ctrl-C.

Exit status: 0 when every step worked, 1 when a step failed (the message says which, with the
tail of the relevant log), 2 when a tool is missing, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import trustme
from cryptography import x509

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ("click.demo.test", "click2.demo.test")
VALIDITY = 60  # seconds: pebble's certificate lifetime here, so a renewal happens in the demo
STEPS = 8
T = TypeVar("T")


class DemoError(Exception):
    """A step failed; the message says what and where to look."""


class MissingTool(DemoError):
    """A program the demo needs is not installed."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(number: int, text: str) -> None:
    say()
    say(f"[{number}/{STEPS}] {text}")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (bound to port 0 together, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM if the demo dies, even by SIGKILL."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Children:
    """The subprocesses the demo started, each with its log file; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(
        self, name: str, args: Sequence[str], env: dict[str, str] | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(  # noqa: S603 (fixed argument lists, no shell)
                list(args), stdout=out if stdout is None else stdout, stderr=out,
                stdin=subprocess.DEVNULL, env=env, cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        self.procs.append((name, proc, log))
        return proc

    def check(self) -> None:
        """Raise DemoError if any child has exited."""
        for name, proc, log in self.procs:
            code = proc.poll()
            if code is not None:
                raise DemoError(f"{name} exited with status {code}\n{tail(log)}")

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {log})"
    return f"--- last lines of {log} ---\n" + "\n".join(text)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, children: Children) -> T:
    """Call ``probe`` until it returns a value; fail after ``timeout`` s or if a child died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        children.check()
        try:
            value = probe()
            if value is not None:
                return value
        except (OSError, ssl.SSLError) as e:
            last = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last})" if last else ""
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(0.25)


# -- the parts ------------------------------------------------------------------------------
class Pebble:
    """pebble + pebble-challtestsrv on free loopback ports, validating on ``http_port``."""

    def __init__(self, workdir: Path, http_port: int) -> None:
        binaries = [shutil.which("pebble"), shutil.which("pebble-challtestsrv")]
        if None in binaries:
            raise MissingTool(
                "pebble is not installed; install it with `sudo apt-get install pebble` "
                "(or run `make demo`, which does)"
            )
        self.pebble, self.challtestsrv = (str(b) for b in binaries)
        self.workdir = workdir
        self.port, self.management_port, self.dns_port, dns_mgmt, tls_port = free_ports(5)
        self.dns_management_port = dns_mgmt
        ca = trustme.CA()  # pebble 2.4 ships no certificate for its own API: make one
        self.api_ca = workdir / "pebble-api-ca.pem"
        ca.cert_pem.write_to_path(str(self.api_ca))
        server = ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(str(workdir / "pebble-api-cert.pem"))
        server.private_key_pem.write_to_path(str(workdir / "pebble-api-key.pem"))
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(workdir / "pebble-api-cert.pem"),
            "privateKey": str(workdir / "pebble-api-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": VALIDITY,
        }}
        (workdir / "pebble-config.json").write_text(json.dumps(config, indent=2))
        self.api_context = ssl.create_default_context(cafile=str(self.api_ca))

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, children: Children) -> None:
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0",
               "PEBBLE_WFE_NONCEREJECT": "0"}
        children.start("pebble-challtestsrv", [
            self.challtestsrv, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
            "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-dns01", f"127.0.0.1:{self.dns_port}",
            "-management", f"127.0.0.1:{self.dns_management_port}",
        ], env=env)
        children.start("pebble", [
            self.pebble, "-config", "pebble-config.json",
            "-dnsserver", f"127.0.0.1:{self.dns_port}",
        ], env=env)
        wait_for("pebble's ACME directory", lambda: self._get(self.directory_url), 20, children)
        wait_for("pebble-challtestsrv", lambda: _http_ok(self.dns_management_port), 20, children)

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, context=self.api_context, timeout=5) as r:  # noqa: S310
            return bytes(r.read())

    def root_pem(self) -> bytes:
        """The root that signs this run's certificates (pebble makes a new one per start)."""
        return self._get(f"https://127.0.0.1:{self.management_port}/roots/0")


def _http_ok(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def start_standin(workdir: Path, children: Children) -> tuple[int, Path]:
    """The spgo.io stand-in with a trustme certificate for 127.0.0.1: (port, its CA file)."""
    ca = trustme.CA()
    ca_file = workdir / "standin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(workdir / "standin-cert.pem"))
    server.private_key_pem.write_to_path(str(workdir / "standin-key.pem"))
    proc = children.start("standin", [
        sys.executable, str(REPO / "demo" / "standin.py"),
        "--cert", "standin-cert.pem", "--key", "standin-key.pem",
    ], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # "listening on PORT", or "" if it died
    if not line.startswith("listening on "):
        children.check()
        raise DemoError(f"the stand-in did not start: {line!r}")
    proc.stdout.close()
    return int(line.split()[-1]), ca_file


def twistd_command() -> list[str]:
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def served_certificate(domain: str, port: int, root: Path) -> x509.Certificate:
    """The certificate the proxy serves for ``domain`` on a new connection, verified."""
    context = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=domain) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise DemoError(f"{domain}: the proxy sent no certificate")
    return x509.load_der_x509_certificate(der)


def describe(cert: x509.Certificate) -> str:
    issuer = cert.issuer.rfc4514_string()
    until = cert.not_valid_after_utc.strftime("%H:%M:%S UTC")
    return f"serial {cert.serial_number:x}, valid until {until}, issued by {issuer}"


def show_new_proxy_log(log: Path, seen: set[str]) -> None:
    """Print the proxy's certificate log lines not shown yet (what it did, in its words)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if ": serving certificate" in line and line not in seen:
            seen.add(line)
            say("    proxy log: " + line.split("] ", 1)[-1])


def run_curl(args: list[str], workdir: Path, expect: str) -> str:
    """Print the command, run it in ``workdir``, print its output; it must contain ``expect``."""
    say("    $ " + shlex.join(args))
    try:
        done = subprocess.run(  # noqa: S603 (fixed argument list, no shell)
            args, cwd=workdir, capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        raise DemoError("curl did not finish within 20 s") from None
    out = done.stdout.strip()
    say("    " + out)
    if done.returncode != 0 or expect not in out:
        raise DemoError(f"expected {expect!r}; curl said: {out} {done.stderr.strip()}")
    return out


# -- the demo -------------------------------------------------------------------------------
def demo(workdir: Path, children: Children) -> None:
    if shutil.which("curl") is None:
        raise MissingTool("curl is not installed; install it with `sudo apt-get install curl`")
    http_port, https_port, admin_port = free_ports(3)
    proxy_log = workdir / "trackingproxy.log"
    shown: set[str] = set()
    say(f"Working directory: {workdir}")

    step(1, "Start pebble, a test ACME CA (its DNS resolves every name to 127.0.0.1)")
    pebble = Pebble(workdir, http_port)
    pebble.start(children)
    root = workdir / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())
    say(f"    ACME directory {pebble.directory_url}; its root saved as pebble-root.pem")

    step(2, "Start a stand-in for spgo.io (SparkPost's tracking endpoint)")
    standin_port, standin_ca = start_standin(workdir, children)
    say(f"    https://127.0.0.1:{standin_port}: /q/... -> 200 + GIF, /f/... -> 302")

    step(3, "Start trackingproxy (HTTP-01 answered on its HTTP port, where pebble validates)")
    args = ["--nodaemon", "--pidfile=", "trackingproxy"]
    for domain in DOMAINS:
        args += ["--domain", domain]
    args += [
        "--acme-directory", pebble.directory_url, "--acme-ca-bundle", pebble.api_ca.name,
        "--acme-max-orders-per-hour", "3600",  # 60-second certificates: 60 renewals an hour
        "--state-dir", "state",
        "--upstream", f"https://127.0.0.1:{standin_port}", "--upstream-ca-bundle", standin_ca.name,
        "--http-port", f"tcp:{http_port}:interface=127.0.0.1",
        "--https-port", f"tcp:{https_port}:interface=127.0.0.1",
        "--admin-port", f"tcp:{admin_port}:interface=127.0.0.1",
    ]
    say("    $ " + shlex.join(["twistd", *args]))
    say(f"    (its status page: http://127.0.0.1:{admin_port}/, metrics at /metrics)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    children.start("trackingproxy", [*twistd_command(), *args], env=env)

    step(4, f"Wait until the proxy has certificates for {' and '.join(DOMAINS)}")
    waited = time.monotonic()
    first: dict[str, x509.Certificate] = {}
    for domain in DOMAINS:
        first[domain] = wait_for(
            f"a certificate for {domain} (see {proxy_log})",
            partial(served_certificate, domain, https_port, root),
            60, children,
        )
    show_new_proxy_log(proxy_log, shown)
    say(f"    HTTPS answers for both after {time.monotonic() - waited:.1f} s")

    curl = ["curl", "--silent", "--show-error", "--cacert", root.name]
    d1 = DOMAINS[0]
    step(5, "An open: the tracking pixel, over HTTPS through the proxy")
    run_curl([*curl, "--resolve", f"{d1}:{https_port}:127.0.0.1", "--output", "/dev/null",
              "--write-out", "HTTP %{http_code}, %{content_type}, %{size_download} bytes",
              f"https://{d1}:{https_port}/q/ZGVtby1vcGVuLXRva2Vu"], workdir, "HTTP 200")

    step(6, "A click: the redirect to the landing page, passed through unchanged")
    for domain in DOMAINS:
        run_curl([*curl, "--resolve", f"{domain}:{https_port}:127.0.0.1",
                  "--output", "/dev/null", "--write-out", "HTTP %{http_code}, Location: "
                  "%{redirect_url}", f"https://{domain}:{https_port}/f/ZGVtby1jbGljaw"],
                 workdir, "HTTP 302")

    step(7, "The certificates served (verified against pebble's root)")
    for domain in DOMAINS:
        say(f"    {domain}: {describe(first[domain])}")

    lifetime = first[d1].not_valid_after_utc - first[d1].not_valid_before_utc
    renew_at = first[d1].not_valid_after_utc - lifetime / 2
    step(8, f"Renewal: these live {lifetime.total_seconds():.0f} s; the proxy renews when half "
            f"is left (about {renew_at.strftime('%H:%M:%S')} UTC), in place, no restart")
    for domain in DOMAINS:
        renewed = wait_for(
            f"the renewal of {domain} (see {proxy_log})",
            partial(_renewed, domain, https_port, root, first[domain]),
            VALIDITY + 30, children,
        )
        say(f"    {domain}: new connection gets {describe(renewed)}")
    show_new_proxy_log(proxy_log, shown)
    run_curl([*curl, "--resolve", f"{d1}:{https_port}:127.0.0.1", "--output", "/dev/null",
              "--write-out", "HTTP %{http_code} (same listener, renewed certificate)",
              f"https://{d1}:{https_port}/q/ZGVtby1vcGVuLXRva2Vu"], workdir, "HTTP 200")


def _renewed(
    domain: str, port: int, root: Path, old: x509.Certificate
) -> x509.Certificate | None:
    cert = served_certificate(domain, port, root)
    return cert if cert.serial_number != old.serial_number else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-running", action="store_true",
                        help="after the demo, leave everything running until Ctrl-C")
    parser.add_argument("--keep-files", action="store_true",
                        help="keep the working directory (it is always kept on failure)")
    options = parser.parse_args(argv)

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with INT ignored
    workdir = Path(tempfile.mkdtemp(prefix="trackingproxy-demo-"))
    children = Children(workdir)
    started = time.monotonic()
    status = 0
    finished = False
    try:
        demo(workdir, children)
        finished = True
        if options.keep_running:
            say(f"\nEverything keeps running; try the commands above in {workdir}. Ctrl-C stops.")
            while True:
                children.check()
                time.sleep(1)
    except MissingTool as e:
        say(f"\ndemo: {e}")
        status = 2
    except DemoError as e:
        say(f"\ndemo FAILED: {e}\n(files and logs kept in {workdir})")
        status = 1
    except KeyboardInterrupt:
        say("\ndemo: stopping" if finished else "\ndemo: interrupted")
        status = 0 if finished else 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not skip the clean-up
        children.stop()
    took = datetime.timedelta(seconds=round(time.monotonic() - started))
    if status == 0:
        say(f"\nAll steps worked in {took}; everything stopped.")
    if options.keep_files:
        say(f"Files kept in {workdir}")
    elif status != 1:  # a failure keeps them for a look at the logs
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
