"""`trackingproxy check` (console script) and `twistd trackingproxy --check`: verify each
tracking domain's setup (DNS, ports 80/443, the served certificate, the upstream, SparkPost's
`/f/a/b/c/d` probe asked of the upstream directly and through the proxy) and exit 0 when all is
well, 1 otherwise. One line per finding, each with its fix; it never
changes state (no ACME, no files written).

Same options and `TRACKINGPROXY_*` variables as the proxy, plus check-only ones:
`--expect-address IP` (repeatable; default: this host's non-loopback interface addresses),
`--connect-to IP`, `--resolver IP:PORT`, `--ca-bundle PEM` and `--timeout SECONDS`.
Real defaults (global reactor, system resolver, /proc interface addresses) are chosen only here.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.python import usage

from trackingproxy.checks import Collaborators, Finding, exit_status, run_checks
from trackingproxy.checks.settings import interface_addresses, settings_from_options
from trackingproxy.errors import ConfigError
from trackingproxy.options import ENV_PREFIX, Options, env_name

__all__ = ["CHECK_PARAMETERS", "CheckOptions", "execute", "main", "run_from_twistd"]

CHECK_PARAMETERS: list[tuple[str, str]] = [
    ("connect-to", "Connect to this IP instead of the domain's address (test before moving DNS)."),
    ("resolver", "DNS server to ask, as IP:PORT [default: /etc/resolv.conf]."),
    ("ca-bundle", "Extra PEM CA bundle trusted for the served certificate [default: system]."),
    ("timeout", "Seconds each network step may take [default: 5]."),
]


class CheckOptions(Options):
    """`trackingproxy check` options: the proxy's, plus the check-only ones."""

    synopsis = "check --domain NAME [options]"
    longdesc = (
        "Check each tracking domain: DNS points here, ports 80/443 answer, the certificate is "
        "valid, the upstream is reachable with a valid certificate and answers SparkPost's "
        "/f/a/b/c/d probe for the domain (asked directly, with the domain as Host) with a "
        "redirect, and the proxy gives the same answer. Exit 0 when all is well, 1 otherwise. "
        "Changes nothing."
    )
    optParameters = [[name, None, None, help_] for name, help_ in CHECK_PARAMETERS]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(environ)
        self["expect-address"] = []

    def opt_expect_address(self, value: str) -> None:
        """An address the domains should resolve to (repeatable) [default: this host's]."""
        self["expect-address"].append(value)

    def apply_environment(self) -> None:
        super().apply_environment()
        check_environment(self, self.environ)


def check_environment(opts: Any, environ: Mapping[str, str]) -> None:
    """Fill the check-only options the command line left unset from `TRACKINGPROXY_*`."""
    if not opts.get("expect-address"):
        raw = environ.get(ENV_PREFIX + "EXPECT_ADDRESSES") or environ.get(
            env_name("expect-address"), ""
        )
        opts["expect-address"] = [v.strip() for v in raw.split(",") if v.strip()]
    for name, _ in CHECK_PARAMETERS:
        if opts.get(name) is None:
            opts[name] = environ.get(env_name(name))


def make_resolver(opts: Mapping[str, Any], reactor: Any) -> IResolver:
    """The DNS client: the `--resolver` server only, or the system's (/etc/resolv.conf)."""
    from twisted.names import client

    from trackingproxy.checks.settings import parse_resolver

    server = parse_resolver(opts.get("resolver"))
    if server is not None:
        resolver: IResolver = client.Resolver(servers=[server], reactor=reactor)
        return resolver
    system: IResolver = client.createResolver()
    return system


def execute(
    opts: Mapping[str, Any],
    reactor: Any,
    write: Callable[[str], None],
    resolver: IResolver | None = None,
    addresses: frozenset[str] | None = None,
) -> Deferred[int]:
    """Run the checks for parsed options, writing one line per finding; fires with the status.

    Never fails: a problem with the options is one `trackingproxy check: error:` line, status 1.
    """

    async def go() -> int:
        now = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
        try:
            local = interface_addresses() if addresses is None else addresses
            settings, early = settings_from_options(opts, now, local)
            names = resolver if resolver is not None else make_resolver(opts, reactor)
        except ConfigError as e:
            write(f"trackingproxy check: error: {e.message}")
            return 1
        for finding in early:
            write(finding.line())

        def report(finding: Finding) -> None:
            write(finding.line())

        found = await run_checks(settings, Collaborators(reactor, names), report)
        return exit_status([*early, *found])

    def crashed(failure: Any) -> int:
        write(f"trackingproxy check: error: the check crashed ({failure.value!r})")
        return 1

    return Deferred.fromCoroutine(go()).addErrback(crashed)


def _printer(stream: TextIO) -> Callable[[str], None]:
    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return write


def _run_reactor(opts: Mapping[str, Any]) -> int:
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    status = [1]

    def finished(code: int) -> None:
        status[0] = code
        reactor.stop()

    def start() -> None:
        execute(opts, reactor, _printer(sys.stdout)).addCallback(finished)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=True)
    return status[0]


def run_from_twistd(options: Mapping[str, Any]) -> None:
    """`twistd trackingproxy --check ...`: run the checks, then exit with their status.

    The check-only options come from the environment there (TRACKINGPROXY_EXPECT_ADDRESSES,
    TRACKINGPROXY_CONNECT_TO, ...); `trackingproxy check` also takes them on the command line.
    """
    import os

    opts = dict(options)
    check_environment(opts, getattr(options, "environ", os.environ))
    raise SystemExit(_run_reactor(opts))


def main(argv: list[str] | None = None) -> None:
    """Console script: `trackingproxy check --domain click.example.com [...]`, and the
    cluster's `trackingproxy domains ...` and `trackingproxy store import ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        args = args[1:]
    elif args[:1] in (["domains"], ["store"]):
        from trackingproxy.ops.storecli import main as store_main

        raise SystemExit(store_main(args[0], args[1:]))
    elif args and not args[0].startswith("-"):
        sys.stderr.write(
            f"trackingproxy: error: unknown command {args[0]!r}; the commands are "
            "`trackingproxy check --domain NAME`, `trackingproxy domains list|add|remove` and "
            "`trackingproxy store import` (serve with `twistd trackingproxy`)\n"
        )
        raise SystemExit(1)
    opts = CheckOptions()
    try:
        opts.parseOptions(args)
    except usage.UsageError as e:
        sys.stderr.write(f"trackingproxy check: error: {e}; see trackingproxy check --help\n")
        raise SystemExit(1) from None
    raise SystemExit(_run_reactor(opts))


if __name__ == "__main__":
    main()
