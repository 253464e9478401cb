"""`make container-test`: build deploy/Dockerfile with podman and run the image for real.

On a plain Debian 12 host with no container registry: podman + runc + debootstrap come from
Debian (installed when missing), the base image `debian:bookworm-slim` is made locally with
`debootstrap --variant=minbase` + `podman import` (kept between runs), and podman reads a
containers.conf of this script's own (CONTAINERS_CONF; the host's is not touched).

The scenario, all on the host network (loopback): pebble + pebble-challtestsrv (the fixtures of
tests/acme/conftest.py) and an HTTPS stand-in for spgo.io (tests/standin.py); the container gets
a certificate from pebble, proxies an open (/q/ -> 200 GIF) and a click (/f/ -> 302) over HTTPS
(checked with curl), is stopped (SIGTERM) and started again, and serves the same certificate from
its volume without a second order. Then the security context of deploy/kubernetes is tried
(no-new-privileges so no capability at all, read-only root, the ip_unprivileged_port_start
sysctl binding port 80). Every wait is bounded; everything made is removed at the end
except the cached base image and the built image.

Exit status 0 when every check passed, 1 otherwise. Run from the repository root:
    python tests/deploy/container_run.py
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402
from cryptography import x509  # noqa: E402

from tests.acme.conftest import Pebble, _find_pebble  # noqa: E402
from tests.ports import free_port  # noqa: E402

BASE_IMAGE = "debian:bookworm-slim"
IMAGE = "localhost/trackingproxy:container-test"
DOMAIN = "click.example.test"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STARTED = time.monotonic()


class Failed(Exception):
    """A check failed; the message says which and what was seen."""


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def run(
    args: list[str], timeout: float, check: bool = True, env: dict[str, str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kw
        )
    except subprocess.TimeoutExpired as e:
        raise Failed(f"`{' '.join(args[:4])} ...` took more than {timeout:.0f}s") from e
    if check and done.returncode != 0:
        raise Failed(
            f"`{' '.join(args)}` exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return done


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy without raising; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
            last = result
        except Failed:
            raise
        except Exception as e:
            last = e
        time.sleep(interval)
    raise Failed(f"{what}: not within {timeout:.0f}s (last: {last!r})")



# -- host preparation ------------------------------------------------------------------------
def ensure_debs(packages: list[str]) -> None:
    missing = [
        p for p in packages
        if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0
    ]
    if not missing:
        return
    say(f"installing Debian packages: {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*sudo, "apt-get", "update", "-qq"], timeout=300, env=env)
    run([*sudo, "apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", *missing],
        timeout=900, env=env)


def apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 .sources or one-line sources.list)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or f.suffix not in {".list", ".sources", ""}:
            continue
        text = f.read_text(errors="replace")
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def write_containers_conf(workdir: Path) -> Path:
    """runc + cgroupfs (crun fails on hybrid cgroups) and ulimits the host can actually grant.

    Root here may lack CAP_SYS_RESOURCE, so a container limit above the hard limit podman runs
    under is refused ("error setting rlimit type 6/7"). podman caps its own RLIMIT_NPROC at
    kernel.pid_max, hence the min() for nproc.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    conf = workdir / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    return conf


class Podman:
    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], timeout=timeout, check=check, env=self.env)

    def ensure_base_image(self, workdir: Path) -> None:
        if self("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            say(f"base image {BASE_IMAGE} is cached")
            return
        mirror = apt_mirror()
        say(f"making {BASE_IMAGE} with debootstrap --variant=minbase bookworm {mirror}")
        rootfs = workdir / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=900)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "-", BASE_IMAGE], timeout=300, env=self.env, stdin=tar.stdout)
        tar.wait(60)
        shutil.rmtree(rootfs, ignore_errors=True)

    def build(self, workdir: Path, source: str) -> None:
        """Build from the working tree, or (``source == "head"``) from ``git archive HEAD``.

        Where HTTPS egress is intercepted the host's CA bundle is mounted into the build.
        """
        context = ROOT
        if source == "head":
            context = workdir / "src"
            context.mkdir()
            archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"],
                                       stdout=subprocess.PIPE)
            run(["tar", "-x", "-C", str(context)], timeout=120, stdin=archive.stdout)
            archive.wait(60)
        extra: list[str] = []
        if HOST_CA_BUNDLE.exists():
            pip_conf = workdir / "pip.conf"
            pip_conf.write_text("[global]\ncert = /run/host-ca.crt\n")
            extra = ["-v", f"{HOST_CA_BUNDLE}:/run/host-ca.crt:ro",
                     "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        say(f"building {IMAGE} from deploy/Dockerfile ({source}: {context})")
        previous = self("image", "inspect", IMAGE, "--format", "{{.Id}}", check=False)
        t0 = time.monotonic()
        done = self("build", "--pull=never", "--format", "docker", *extra,
                     "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", IMAGE, str(context),
                     timeout=900)
        built = done.stdout.strip().splitlines()[-1]
        say(f"built in {time.monotonic() - t0:.0f}s: {built}")
        old = previous.stdout.strip()
        if previous.returncode == 0 and old and old != built:
            self("rmi", old, check=False)  # the previous build of this test, now untagged


# -- the upstream stand-in, on a reactor thread -------------------------------------------
@contextlib.contextmanager
def standin(ca: trustme.CA) -> Iterator[Any]:
    from twisted.internet import reactor

    from tests.standin import start_standin

    state = start_standin(ca, reactor)
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        reactor.callFromThread(reactor.stop)
        thread.join(10)


# -- TLS and HTTP probes ---------------------------------------------------------------------
def served_certificate(port: int, root_pem: Path) -> x509.Certificate:
    """The leaf served for DOMAIN on 127.0.0.1:port, verified against pebble's root."""
    context = ssl.create_default_context(cafile=str(root_pem))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def curl(url: str, port: int, root_pem: Path) -> tuple[str, str]:
    """(status line facts, headers) of a GET with curl, resolving DOMAIN to 127.0.0.1."""
    done = run(["curl", "-sS", "--max-time", "15", "--resolve", f"{DOMAIN}:{port}:127.0.0.1",
                "--cacert", str(root_pem), "-D", "-", "-o", "/dev/null", "-w",
                "%{http_code} %{content_type} %{size_download} %{http_version}", url],
               timeout=30)
    lines = done.stdout.strip().splitlines()
    return lines[-1], "\n".join(lines[:-1])


def pebble_issued(pebble: Pebble) -> list[str]:
    return re.findall(r"Issued certificate serial (\S+)", pebble.log.read_text(errors="replace"))


def scenario(
    name: str, logs: Callable[[], str], certificate_while_running: Callable[[], Any],
    pebble: Pebble, root_pem: Path, upstream: Any, https_port: int, admin_port: int | None,
    volume: str, podman: Podman,
) -> None:
    """Certificate, open, click, admin endpoints, restart with the certificate kept."""
    leaf = wait_for("a pebble certificate served on :443", certificate_while_running,
                    timeout=120)
    serial = format(leaf.serial_number, "x")
    say(f"certificate from pebble: serial {serial}, issuer {leaf.issuer.rfc4514_string()}, "
        f"not after {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    issued = pebble_issued(pebble)
    if len(issued) != 1:
        raise Failed(f"pebble issued {len(issued)} certificates, expected 1: {issued}")

    facts, headers = curl(f"https://{DOMAIN}/q/open-token", https_port, root_pem)
    say(f"curl https://{DOMAIN}/q/open-token -> {facts}")
    if not facts.startswith("200 image/gif 44"):
        raise Failed(f"open pixel: {facts}\n{headers}")
    facts, headers = curl(f"https://{DOMAIN}/f/click-token", https_port, root_pem)
    location = next((h for h in headers.splitlines() if h.lower().startswith("location:")),
                    "")
    say(f"curl https://{DOMAIN}/f/click-token -> {facts}; {location.strip()}")
    if not facts.startswith("302") or "www.example.com/landing" not in location:
        raise Failed(f"click: {facts}\n{headers}")
    uris = [s.uri.decode() for s in upstream.seen]
    say(f"upstream stand-in saw: {uris}")
    if "/q/open-token" not in uris or "/f/click-token" not in uris:
        raise Failed(f"the upstream did not see both requests: {uris}")

    if admin_port is not None:
        code = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                    "5", f"http://127.0.0.1:{admin_port}/healthz"], timeout=15).stdout
        say(f"GET http://127.0.0.1:{admin_port}/healthz -> {code}")
        if code != "200":
            raise Failed(f"/healthz answered {code}")
        ready = run(["curl", "-sS", "-w", " %{http_code}", "--max-time", "5",
                     f"http://127.0.0.1:{admin_port}/readyz"], timeout=15).stdout.strip()
        say(f"GET http://127.0.0.1:{admin_port}/readyz -> {ready[-3:]} {ready[:-4].strip()[:80]}")
        if not ready.endswith("200"):
            raise Failed(f"/readyz with a certificate served: {ready}")
        health = podman("healthcheck", "run", name, check=False, timeout=30)
        say(f"podman healthcheck run (the image's HEALTHCHECK) -> exit "
            f"{health.returncode} {health.stdout.strip()}")
        if health.returncode != 0:
            raise Failed(f"HEALTHCHECK failed: {health.stdout}{health.stderr}")

    stored = podman("run", "--rm", "--network", "none", "-v",
                    f"{volume}:/var/lib/trackingproxy", "--entrypoint", "ls", IMAGE,
                    "-ln", f"/var/lib/trackingproxy/certificates/{DOMAIN}", timeout=60)
    say("in the volume:\n    " + "\n    ".join(stored.stdout.strip().splitlines()))

    t0 = time.monotonic()
    podman("stop", "--time", "20", name, timeout=60)
    stopped = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    say(f"podman stop (SIGTERM): stopped in {time.monotonic() - t0:.1f}s, exit code "
        f"{stopped}")
    if stopped != "0":
        print(logs()[-3000:], file=sys.stderr)
        raise Failed(f"the proxy exited {stopped} on SIGTERM, expected 0")
    before = len(logs().splitlines())
    podman("start", name, timeout=60)
    again = wait_for("HTTPS again after the restart",
                     lambda: served_certificate(https_port, root_pem), timeout=60)
    serial2 = format(again.serial_number, "x")
    say(f"after restart: serial {serial2} ({'same' if serial2 == serial else 'DIFFERENT'})")
    facts, _ = curl(f"https://{DOMAIN}/q/after-restart", https_port, root_pem)
    say(f"curl https://{DOMAIN}/q/after-restart -> {facts}")
    time.sleep(3)  # let an (unwanted) order show up in pebble's log if there were one
    issued = pebble_issued(pebble)
    new_lines = logs().splitlines()[before:]
    ordering = [ln for ln in new_lines if re.search(r"order", ln, re.I)]
    say(f"pebble issued {len(issued)} certificate(s) in total; proxy log lines after the "
        f"restart mentioning an order: {len(ordering)}")
    if serial2 != serial or len(issued) != 1 or not facts.startswith("200"):
        raise Failed(f"the certificate did not survive the restart: {serial} -> "
                     f"{serial2}, pebble issued {issued}, {facts}")
    say("proxy log after the restart:\n    " + "\n    ".join(new_lines[-12:]))


def main(argv: list[str]) -> int:
    source = "worktree"
    if argv[1:2] == ["--source"] and argv[2:3] in (["head"], ["worktree"]):
        source = argv[2]
    elif argv[1:]:
        print("usage: container_run.py [--source worktree|head]", file=sys.stderr)
        return 2
    if os.geteuid() != 0 and not shutil.which("sudo"):
        print("container-test needs root (rootful podman) or passwordless sudo", file=sys.stderr)
        return 1
    ensure_debs(["podman", "runc", "debootstrap", "curl", "pebble"])
    binaries = _find_pebble()
    if binaries is None:
        raise Failed("pebble and pebble-challtestsrv are not on PATH after installing pebble")
    workdir = Path(tempfile.mkdtemp(prefix="trackingproxy-container-test-"))
    share = workdir / "share"  # mounted read-only into the container; readable by uid 10001
    share.mkdir()
    for d in (workdir, share):
        d.chmod(0o755)
    podman = Podman(write_containers_conf(workdir))
    tag = f"tp-ct-{os.getpid()}"
    containers: list[str] = []
    volumes: list[str] = []
    pebble: Pebble | None = None
    try:
        podman.ensure_base_image(workdir)
        podman.build(workdir, source)
        has_admin = "--admin-port" in podman(
            "run", "--rm", "--network", "none", IMAGE, "--help", timeout=60).stdout
        say("admin listener (--admin-port) in the image: " + ("yes" if has_admin else
            "no, so the HTTPS listener is probed instead of /healthz"))

        http_port, https_port = 80, 443
        for p in (http_port, https_port):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    raise Failed(f"port {p} on this host is in use; the test binds 80 and 443")
        admin_port = free_port()

        pebble = Pebble(binaries, workdir, http_port=http_port)
        pebble.start()
        root_pem = workdir / "pebble-root.pem"
        root_pem.write_bytes(pebble.root_pem())
        shutil.copy(pebble.ca_bundle, share / "acme-ca.pem")
        say(f"pebble at {pebble.directory_url}, validating HTTP-01 on port {http_port}")

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(share / "upstream-ca.pem"))
        for f in share.iterdir():
            f.chmod(0o644)
        with standin(ca) as upstream:
            upstream_port = upstream.port.getHost().port
            say(f"upstream stand-in at https://127.0.0.1:{upstream_port}")
            volume = f"{tag}-state"
            podman("volume", "create", volume)
            volumes.append(volume)
            name = f"{tag}-proxy"
            env = {
                "TRACKINGPROXY_ACME_DIRECTORY": pebble.directory_url,
                "TRACKINGPROXY_ACME_CA_BUNDLE": "/test/acme-ca.pem",
                "TRACKINGPROXY_UPSTREAM": f"https://127.0.0.1:{upstream_port}",
                "TRACKINGPROXY_UPSTREAM_CA_BUNDLE": "/test/upstream-ca.pem",
                "TRACKINGPROXY_HTTP_PORT": f"tcp:{http_port}",
                "TRACKINGPROXY_HTTPS_PORT": f"tcp:{https_port}",
                # on the host network: keep the admin listener on loopback
                "TRACKINGPROXY_ADMIN_PORT": f"tcp:{admin_port}:interface=127.0.0.1",
            }
            env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
            podman("run", "-d", "--name", name, "--network", "host",
                   "--health-interval", "disable",  # no systemd timers here; run it by hand
                   "-v", f"{volume}:/var/lib/trackingproxy", "-v", f"{share}:/test:ro",
                   *env_args, IMAGE, "--domain", DOMAIN, "--email", "ops@example.test",
                   timeout=60)
            containers.append(name)
            say(f"container {name} started (user {podman('inspect', name, '--format', '{{.Config.User}}').stdout.strip()})")

            def logs() -> str:
                done = podman("logs", name, check=False, timeout=30)
                return done.stdout + done.stderr

            def certificate_while_running() -> x509.Certificate | None:
                state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
                if state != "running":
                    raise Failed(f"the container is {state}")
                return served_certificate(https_port, root_pem)

            try:
                scenario(name, logs, certificate_while_running, pebble, root_pem, upstream,
                         https_port, admin_port if has_admin else None, volume, podman)
            except Failed:
                print("container log (tail):\n" + logs()[-4000:], file=sys.stderr)
                raise

        # The worst case of deploy/kubernetes/deployment.yaml's security context: no new
        # privileges, so the kernel ignores the interpreter's file capability, and no ambient
        # capability either (podman would make an added capability ambient for a non-root
        # user, which Kubernetes runtimes do not, so none is added here); a read-only root; the
        # pod's ip_unprivileged_port_start sysctl is what lets uid 10001 bind 80.
        volume2 = f"{tag}-k8s"
        podman("volume", "create", volume2)
        volumes.append(volume2)
        k8s = f"{tag}-k8s"
        podman("run", "-d", "--name", k8s, "--network", "none", "--read-only",
               "--tmpfs", "/tmp", "--security-opt", "no-new-privileges",
               "--sysctl", "net.ipv4.ip_unprivileged_port_start=80",
               "--health-interval", "disable", "-v", f"{volume2}:/var/lib/trackingproxy",
               IMAGE, "--domain", DOMAIN, "--no-acme", "--https-port", "none", timeout=60)
        containers.append(k8s)
        probe = ("import urllib.request, urllib.error\n"
                 "try:\n"
                 "    r = urllib.request.urlopen('http://127.0.0.1:80/other', timeout=5)\n"
                 "    print(r.status)\n"
                 "except urllib.error.HTTPError as e:\n"
                 "    print(e.code)\n")
        def k8s_answer() -> str:
            state = podman("inspect", k8s, "--format", "{{.State.Status}}").stdout.strip()
            if state != "running":
                tail = podman("logs", k8s, check=False, timeout=30)
                raise Failed(f"the container is {state}:\n{(tail.stdout + tail.stderr)[-3000:]}")
            done = podman("exec", k8s, "/usr/bin/python3", "-c", probe, check=False, timeout=30)
            return done.stdout.strip() if done.returncode == 0 else ""

        status = wait_for("the proxy on port 80 under the Kubernetes security context",
                          k8s_answer, timeout=60, interval=1)
        caps = podman("exec", k8s, "grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/1/status",
                      timeout=30).stdout.split()
        say(f"Kubernetes-like security context (uid 10001, no-new-privileges, read-only root, "
            f"sysctl net.ipv4.ip_unprivileged_port_start=80): port 80 answers HTTP {status}; "
            f"pid 1 {' '.join(caps)}")
        if caps[1:2] != ["0000000000000000"]:
            raise Failed(f"expected no effective capability under no-new-privileges: {caps}")
        say("container test passed")
        return 0
    except Failed as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        for c in containers:
            podman("rm", "-f", "-t", "5", c, check=False, timeout=60)
        for v in volumes:
            podman("volume", "rm", "-f", v, check=False, timeout=60)
        if pebble is not None:
            pebble.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        say("cleaned up (containers, volumes, pebble); kept the images "
            f"{BASE_IMAGE} and {IMAGE}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
