"""`trackingproxy domains list|add|remove` and `trackingproxy store import`: the cluster's
shared store by hand.

- ``domains add NAME...`` / ``remove NAME...`` change the domain list kept in the store; every
  replica serves (or stops serving) the name within moments, without a SIGHUP. ``list`` prints
  it. Names given to the replicas with ``--domain`` / ``--domains-file`` are not in this list.
- ``store import --state-dir DIR`` copies a single instance's certificates (and its ACME
  accounts) into the store, so moving to a cluster costs no new certificate. A name that
  already has a certificate in the store, and an expired certificate, are left alone.

Options ``--store``, ``--store-prefix``, ``--store-ca-bundle`` (and ``TRACKINGPROXY_STORE``,
``TRACKINGPROXY_STORE_FILE``) as for the proxy. Blocking calls: this is a command, not the
reactor.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO, TypeVar

from twisted.internet.task import Clock
from twisted.python import usage

from trackingproxy.domains import normalise_domain
from trackingproxy.errors import ConfigError
from trackingproxy.options import env_name, read_secret_file
from trackingproxy.store.contract import StoredCertificate, StoreUnavailable
from trackingproxy.store.files import FileStore
from trackingproxy.store.redis import RedisStore, result_of, synchronous
from trackingproxy.store.settings import DEFAULT_PREFIX, StoreSettings, store_settings_from_options
from trackingproxy.store.url import connect, probe

__all__ = ["main"]

_T = TypeVar("_T")


class _StoreOptions(usage.Options):
    optParameters = [
        ["store", None, None, "The shared store URL (or TRACKINGPROXY_STORE[_FILE])."],
        ["store-prefix", None, None, f"Key prefix [default: {DEFAULT_PREFIX}]."],
        ["store-ca-bundle", None, None, "PEM CA bundle for a rediss:// store."],
    ]

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__()
        self.environ = environ

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Options may follow the action and names (``domains add NAME --store URL``)."""
        super().parseOptions(_options_first(list(options or []), self))

    def settings(self) -> StoreSettings:
        env = self.environ
        values = {
            "store": self["store"] or env.get(env_name("store")) or read_secret_file(env, "store"),
            "store-prefix": self["store-prefix"] or env.get(env_name("store-prefix")),
            "store-ca-bundle": self["store-ca-bundle"] or env.get(env_name("store-ca-bundle")),
        }
        settings = store_settings_from_options(values)
        if settings is None:
            raise ConfigError("no store given; pass --store redis://host:6379/0")
        return settings


class DomainsOptions(_StoreOptions):
    synopsis = "domains list|add NAME...|remove NAME... --store URL"

    def parseArgs(self, action: str, *names: str) -> None:  # type: ignore[override]
        if action not in ("list", "add", "remove"):
            raise usage.UsageError(f"unknown action {action!r}; use list, add or remove")
        if action != "list" and not names:
            raise usage.UsageError(f"domains {action} needs at least one domain name")
        self["action"], self["names"] = action, names


class ImportOptions(_StoreOptions):
    synopsis = "store import --state-dir DIR --store URL"
    optParameters = [
        *_StoreOptions.optParameters,
        ["state-dir", None, None, "The single instance's state directory."],
    ]

    def parseArgs(self, action: str) -> None:  # type: ignore[override]
        if action != "import":
            raise usage.UsageError(f"unknown action {action!r}; the command is `store import`")


def _options_first(args: list[str], opts: _StoreOptions) -> list[str]:
    """``args`` with every ``--name value`` / ``--name=value`` moved before the others
    (Twisted's parser stops at the first positional argument)."""
    takes_value = {f"--{p[0]}" for p in opts.optParameters}
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in takes_value and i + 1 < len(args):
            front += [arg, args[i + 1]]
            i += 2
            continue
        (front if arg.startswith("--") else rest).append(arg)
        i += 1
    return front + rest


def _open(settings: StoreSettings) -> RedisStore:
    client = connect(settings.url, settings.ca_bundle)
    probe(client, settings.masked)

    return RedisStore(
        client, run=synchronous, clock=Clock(), prefix=settings.prefix,
        node_id=f"cli-{os.getpid()}", description=settings.masked,
    )


def run_domains(opts: DomainsOptions, out: TextIO) -> int:
    store = _open(opts.settings())
    action, names = opts["action"], [normalise_domain(n) for n in opts["names"]]
    if action == "list":
        for name in result_of(store.list_domains()):
            out.write(name + "\n")
        return 0
    for name in names:
        if action == "add":
            changed = result_of(store.add_domain(name))
            out.write(f"{name}: {'added' if changed else 'already in the list'}\n")
        else:
            changed = result_of(store.remove_domain(name))
            out.write(f"{name}: {'removed' if changed else 'was not in the list'}\n")
    return 0


def run_import(opts: ImportOptions, out: TextIO) -> int:
    if not opts["state-dir"]:
        raise ConfigError("pass --state-dir with the single instance's state directory")
    state = Path(opts["state-dir"])
    if not (state / "certificates").is_dir():
        raise ConfigError(f"--state-dir {state}: no certificates/ directory there; check the path")
    store = _open(opts.settings())
    local = FileStore(state, Clock())
    now = datetime.datetime.now(datetime.UTC)
    imported = 0
    for name in local.names():
        stored: StoredCertificate | None = result_of(local.load(name))
        if stored is None:
            out.write(f"{name}: skipped (unreadable; see the message above)\n")
        elif stored.cert.expired_at(now):
            out.write(f"{name}: skipped (expired at {stored.cert.not_after.isoformat()})\n")
        elif result_of(store.seed(name, stored)):
            imported += 1
            out.write(f"{name}: imported (serial {stored.cert.serial_hex})\n")
        else:
            out.write(f"{name}: the store already has a certificate; left alone\n")
    for directory in local.account_directories():
        if result_of(store.load_account(directory)) is not None:
            out.write(f"ACME account for {directory}: the store already has one; left alone\n")
            continue
        record = result_of(local.load_account(directory))
        if record is not None:
            result_of(store.save_account(directory, record))
            out.write(f"ACME account for {directory}: imported\n")
    out.write(f"{imported} certificate(s) imported into {store.description}\n")
    return 0


def main(command: str, args: list[str], environ: Mapping[str, str] | None = None,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run ``trackingproxy <command> <args>``; the exit status (one line on stderr on error)."""
    env = os.environ if environ is None else environ
    opts: DomainsOptions | ImportOptions = (
        DomainsOptions(env) if command == "domains" else ImportOptions(env)
    )
    try:
        opts.parseOptions(args)
        if isinstance(opts, DomainsOptions):
            return run_domains(opts, out)
        return run_import(opts, out)
    except usage.UsageError as e:
        err.write(f"trackingproxy {command}: error: {e}; usage: trackingproxy {opts.synopsis}\n")
    except ConfigError as e:
        err.write(f"trackingproxy {command}: {e.message}\n")
    except StoreUnavailable as e:
        err.write(f"trackingproxy {command}: {e}\n")
    return 1
