"""Many tracking domains on one instance: `make bench-domains` (`python -m bench.domains`).

For N domains (100; 1,000; 10,000 by default), each with its own ECDSA P-256 certificate from
one throw-away CA, and for three ways of bringing them (`certs-dir`: `--certs-dir` with
`--no-acme`; `state-dir`: certificates already in the ACME state directory,
`--acme-directory local`; `redis`: certificates already in a shared Redis store, as a new
replica of a cluster finds them, `--store redis://... --acme-directory local` with a fresh empty
`--state-dir`), it starts `twistd trackingproxy` on loopback and measures:

- time to the first accepted TCP connection on the HTTPS port and time to `/readyz` 200,
  both from the process start;
- RSS at readiness, and per domain: (RSS(N) - RSS(1 domain)) / N;
- full TLS handshakes to a random domain per proxy CPU-second (client processes on the other
  CPU, no session resumption), against the same figure with one domain;
- the SIGHUP reload time with one domain added (domains file + certificate written, SIGHUP,
  until the new name is served; in `redis` mode the certificate is put into the store with
  `trackingproxy store import` first);
- the size of `/metrics`;
- in `redis` mode, the time `trackingproxy store import` takes to seed the empty store with the
  N certificates before the proxy starts (not part of the start figures).

The `redis` mode runs one throw-away `redis-server` (`--save '' --appendonly no`, on loopback,
pinned to CPU 1) for the whole run, emptied (FLUSHALL) before every start.

Writes the table to bench/results/domains.md and into bench/RESULTS.md between the
`<!-- domains -->` markers. Certificates are generated once per N and kept in
bench/results/tmp/domains-N (gitignored).
"""

# ruff: noqa: S603, S607  (a benchmark harness: it runs the tools it measures)

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.procstat import cpu_seconds, memory_kib
from bench.servers import Server, free_port
from bench.storecompare import redis_command, redis_server, start_redis, wait_redis

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
TABLE = REPO / "bench" / "results" / "domains.md"
WORK = REPO / "bench" / "results" / "tmp"
MARK_START, MARK_END = "<!-- domains -->", "<!-- /domains -->"
HANDSHAKE_SECONDS = 5.0
HANDSHAKE_ROUNDS = 5  # the median of five: one 5 s round varies by 15 % on this machine, and
# the median of three still gave 0.88x and 1.04x in two runs of the same configuration
MODES = ("certs-dir", "state-dir", "redis")


def _name(i: int) -> str:
    return f"click{i}.brand{i % 97}.bench.test"


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate(n: int) -> Path:
    """N certificates (one key each) from one CA, as --certs-dir files and as a state dir."""
    base = WORK / f"domains-{n}"
    done = base / ".complete"
    if done.exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    (base / "certs").mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench domains CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (base / "ca.pem").write_bytes(ca_pem)
    state = base / "state" / "certificates"
    for i in range(n):
        name = _name(i)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=80))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca_pem
        key_pem = _pem(key)
        (base / "certs" / f"{name}.pem").write_bytes(key_pem + chain)
        d = state / name
        d.mkdir(parents=True)
        (d / "privkey.pem").write_bytes(key_pem)
        (d / "fullchain.pem").write_bytes(chain)
    (base / "domains.txt").write_text("".join(_name(i) + "\n" for i in range(n)))
    for path in base.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    done.touch()
    return base


@frozen
class Run:
    mode: str
    domains: int
    first_connection: float
    ready: float
    rss_kib: int
    handshakes_per_cpu_s: float
    reload_s: float
    metrics_bytes: int
    seed_s: float | None = None  # redis mode: `trackingproxy store import`, before the start
    busy_s: float = 0.0  # after /readyz 200, until the proxy's CPU went idle


IDLE_CPU_SHARE = 0.05  # "idle": under 5 % of a CPU over half a second


def _wait_idle(pid: int, timeout: float = 180.0) -> float:
    """Seconds until the proxy uses under IDLE_CPU_SHARE of a CPU over half a second (the work
    left after readiness: local copies, first ARI checks), so the handshake figure is the
    steady one, not the start's."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < 0.5 * IDLE_CPU_SHARE:
            return time.monotonic() - start - 0.5
    raise RuntimeError(f"the proxy was still busy {timeout:.0f} s after /readyz 200")


def _wait(predicate: object, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _readyz(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _handshaker(port: int, names: list[str], ca: str, seconds: float, out: object) -> None:
    os.sched_setaffinity(0, {1})
    context = ssl.create_default_context(cafile=ca)
    context.options |= ssl.OP_NO_TICKET
    rng = random.Random()  # noqa: S311
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        name = rng.choice(names)
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                context.wrap_socket(raw, server_hostname=name):
            count += 1
    out.put(count)  # type: ignore[attr-defined]


def handshakes(pid: int, port: int, names: list[str], ca: Path, clients: int = 4) -> float:
    """Full handshakes per proxy CPU-second, to random names."""
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_handshaker,
                                     args=(port, names, str(ca), HANDSHAKE_SECONDS, queue))
             for _ in range(clients)]
    cpu = cpu_seconds(pid)
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    used = cpu_seconds(pid) - cpu
    return total / used if used > 0 else 0.0


def _store_url(redis: Server) -> str:
    return f"redis://127.0.0.1:{redis.https}/0"  # Server.https: the port redis listens on


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def store_import(base: Path, names: list[str], directory: Path, redis: Server) -> float:
    """Seed the store with the certificates of ``names`` (a state directory holding just
    those, hard links into ``base``) by `trackingproxy store import`; its wall time."""
    state = directory / "certificates"
    state.mkdir(parents=True)
    directory.chmod(0o700)
    for name in names:
        (state / name).mkdir(mode=0o700)
        for file in ("privkey.pem", "fullchain.pem"):
            os.link(base / "state" / "certificates" / name / file, state / name / file)
    log = directory.with_suffix(".log")
    with log.open("wb") as out:
        start = time.monotonic()
        done = subprocess.run(
            [_bin("trackingproxy"), "store", "import", "--state-dir", str(directory),
             "--store", _store_url(redis)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), check=False,
        )
        took = time.monotonic() - start
    text = log.read_text(errors="replace")
    if done.returncode != 0 or f"\n{len(names)} certificate(s) imported" not in "\n" + text:
        raise RuntimeError(f"store import of {len(names)} certificate(s) failed "
                           f"(exit {done.returncode}):\n{text[-2000:]}")
    return took


def measure(mode: str, base: Path, n: int, workdir: Path, redis: Server | None = None) -> Run:
    """One start of the proxy with the first n certificates of ``base`` (``redis``: the
    running redis-server, for the redis mode)."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    names = [_name(i) for i in range(n)]
    https, http, admin = free_port(), free_port(), free_port()
    domains_file = workdir / "domains.txt"
    domains_file.write_text("".join(x + "\n" for x in names))
    seed: float | None = None
    args = ["--domains-file", str(domains_file), "--upstream", "https://127.0.0.1:9",
            "--https-port", f"tcp:{https}:interface=127.0.0.1",
            "--http-port", f"tcp:{http}:interface=127.0.0.1",
            "--admin-port", f"tcp:{admin}:interface=127.0.0.1", "--access-log", "off"]
    if mode == "certs-dir":
        certs = workdir / "certs"
        certs.mkdir()
        for name in names:
            os.link(base / "certs" / f"{name}.pem", certs / f"{name}.pem")
        args += ["--no-acme", "--certs-dir", str(certs)]
    elif mode == "redis":
        if redis is None:
            raise ValueError("the redis mode needs a running redis-server")
        redis_command(redis.https, "FLUSHALL")
        seed = store_import(base, names, workdir / "import", redis)
        state = workdir / "state"
        state.mkdir(mode=0o700)  # a new replica's: empty
        args += ["--store", _store_url(redis), "--acme-directory", "local",
                 "--state-dir", str(state)]
    elif mode == "state-dir":
        state = workdir / "state"
        (state / "certificates").mkdir(parents=True)
        for name in names:
            shutil.copytree(base / "state" / "certificates" / name,
                            state / "certificates" / name)
        state.chmod(0o700)
        args += ["--acme-directory", "local", "--state-dir", str(state)]
    else:
        raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    twistd = _bin("twistd")
    env = _env()
    log = (workdir / "twistd.log").open("wb")
    start = time.monotonic()
    proc = subprocess.Popen(
        ["taskset", "-c", "0", twistd, "--nodaemon", "--pidfile=", "trackingproxy", *args],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        first = _wait(lambda: _connects(https), 120, "the HTTPS port") - start
        ready = _wait(lambda: _readyz(admin), 300, "/readyz 200") - start
        rss = memory_kib(proc.pid)
        busy = _wait_idle(proc.pid)
        rate = statistics.median(handshakes(proc.pid, https, names, base / "ca.pem")
                                 for _ in range(HANDSHAKE_ROUNDS))
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=30) as r:
            metrics = len(r.read())
        reload_s = _reload(mode, base, workdir, domains_file, names, proc.pid, https, redis)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    return Run(mode, n, first, ready, rss, rate, reload_s, metrics, seed, busy)


def _reload(mode: str, base: Path, workdir: Path, domains_file: Path, names: list[str],
            pid: int, https: int, redis: Server | None) -> float:
    """SIGHUP with one more domain (its certificate in place first): seconds until served."""
    extra = _name(len(names))  # ``base`` has one certificate more than the largest run
    extra_base = base
    if mode == "certs-dir":
        shutil.copy(extra_base / "certs" / f"{extra}.pem", workdir / "certs" / f"{extra}.pem")
    elif mode == "redis":
        assert redis is not None
        store_import(extra_base, [extra], workdir / "import-extra", redis)
    else:
        shutil.copytree(extra_base / "state" / "certificates" / extra,
                        workdir / "state" / "certificates" / extra)
    with domains_file.open("a") as f:
        f.write(extra + "\n")
    context = ssl.create_default_context(cafile=str(extra_base / "ca.pem"))

    def served() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", https), timeout=2) as raw, \
                    context.wrap_socket(raw, server_hostname=extra):
                return True
        except (OSError, ssl.SSLError):
            return False

    start = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    return _wait(served, 120, f"{extra} served after SIGHUP") - start


def table(runs: list[Run], one: dict[str, Run]) -> str:
    lines = [
        "| mode | domains | first connection | /readyz 200 | busy after | RSS | RSS per domain | "
        "handshakes per CPU-s (vs 1 domain) | SIGHUP +1 domain | /metrics | store import |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        base = one[r.mode]
        per = (r.rss_kib - base.rss_kib) / r.domains
        ratio = r.handshakes_per_cpu_s / base.handshakes_per_cpu_s if base.handshakes_per_cpu_s \
            else 0.0
        lines.append(
            f"| {r.mode} | {r.domains:,} | {r.first_connection:.2f} s | {r.ready:.2f} s | "
            f"{r.busy_s:.1f} s | "
            f"{r.rss_kib / 1024:.0f} MiB | {per:.1f} KiB | {r.handshakes_per_cpu_s:,.0f} "
            f"({ratio:.2f}x) | {r.reload_s:.2f} s | {r.metrics_bytes / 1024:,.0f} KiB | "
            + ("n/a" if r.seed_s is None else f"{r.seed_s:.2f} s") + " |"
        )
    return "\n".join(lines)


def write(text: str) -> None:
    TABLE.write_text(text)
    current = RESULTS.read_text() if RESULTS.exists() else ""
    section = f"{MARK_START}\n{text}{MARK_END}"
    if MARK_START in current and MARK_END in current:
        head, _, rest = current.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        current = head + section + tail
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(current)


def _start_redis() -> Server:
    """The run's redis-server (bench.storecompare's: loopback, a free port, no persistence)."""
    if redis_server() is None:
        raise SystemExit("the redis mode needs redis-server: apt-get install redis-server "
                         "(or leave it out with --modes certs-dir,state-dir)")
    directory = WORK / "domains-redis"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    server = start_redis(directory)
    try:
        wait_redis(server)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; the modes are {', '.join(MODES)}")
    biggest = generate(max(sizes) + 1)
    redis = _start_redis() if "redis" in modes else None
    runs, one = [], {}
    try:
        for mode in modes:
            one[mode] = measure(mode, biggest, 1, WORK / "domains-run", redis)
            print(f"{mode}, 1 domain: ready {one[mode].ready:.2f} s, "
                  f"{one[mode].handshakes_per_cpu_s:,.0f} handshakes per CPU-s", flush=True)
            for n in sizes:
                run = measure(mode, biggest, n, WORK / "domains-run", redis)
                runs.append(run)
                seeded = "" if run.seed_s is None else f"store import {run.seed_s:.2f} s, "
                print(f"{mode}, {n} domains: {seeded}first connection "
                      f"{run.first_connection:.2f} s, ready {run.ready:.2f} s, "
                      f"RSS {run.rss_kib / 1024:.0f} MiB, "
                      f"{run.handshakes_per_cpu_s:,.0f} handshakes per CPU-s, "
                      f"reload {run.reload_s:.2f} s, /metrics {run.metrics_bytes:,} B", flush=True)
    finally:
        if redis is not None:
            redis.stop()
    text = (f"## Many domains ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
            "`make bench-domains`; the proxy pinned to CPU 0, the handshake clients to CPU 1)\n\n"
            + table(runs, one) + "\n\nRSS per domain: (RSS with N domains - RSS with 1) / N. "
            "Busy after: from /readyz 200 until the proxy uses under 5 % of a CPU (what the "
            "start left to do in the background: local copies of the store, first ARI checks); "
            "RSS is taken at /readyz 200, the handshakes once idle. "
            "Handshakes: full TLS 1.3 handshakes (no resumption) to a random domain, per "
            f"second of the proxy's CPU time, the median of {HANDSHAKE_ROUNDS} rounds of "
            f"{HANDSHAKE_SECONDS:g} s.\n")
    if "redis" in modes:
        text += ("\nredis: the N certificates already in a shared store (a throw-away "
                 "`redis-server`, `--save '' --appendonly no`, pinned to CPU 1, emptied before "
                 "each start), the proxy started as a new replica: `--store redis://127.0.0.1:"
                 "PORT/0 --acme-directory local` with an empty `--state-dir` and the names in "
                 "`--domains-file`. Store import: `trackingproxy store import` of a state "
                 "directory with the N certificates into the empty store, the command's wall "
                 "time, run before the proxy starts (not part of the start figures). SIGHUP +1 "
                 "domain (redis): the new certificate put into the store first with `trackingproxy "
                 "store import` of a state directory holding just that domain (not timed), then "
                 "the domains file written and SIGHUP.\n")
    print(text)
    if not args.no_write:
        write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
