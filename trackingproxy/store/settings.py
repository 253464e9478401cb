"""The store options: which shared store (if any), its CA bundle and its key prefix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import frozen

from trackingproxy.errors import ConfigError
from trackingproxy.store.url import StoreURL, parse_store_url

__all__ = ["DEFAULT_PREFIX", "StoreSettings", "store_settings_from_options"]

DEFAULT_PREFIX = "trackingproxy:"
_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@frozen
class StoreSettings:
    """A shared store for a cluster of replicas (``--store``); its password never in a repr."""

    url: StoreURL
    ca_bundle: Path | None = None
    prefix: str = DEFAULT_PREFIX

    @property
    def masked(self) -> str:
        """The URL with the password masked: for logs, /status and the status page."""
        return self.url.masked


def store_settings_from_options(opts: Mapping[str, Any]) -> StoreSettings | None:
    """``--store``, ``--store-ca-bundle``, ``--store-prefix``; None without ``--store``."""
    raw = (opts.get("store") or "").strip()
    if not raw:
        return None
    url = parse_store_url(raw)
    bundle = opts.get("store-ca-bundle") or None
    if bundle is not None and not Path(bundle).is_file():
        raise ConfigError(
            f"--store-ca-bundle {bundle}: no such file; give the PEM file of your Redis CA"
        )
    prefix = opts.get("store-prefix") or DEFAULT_PREFIX
    if not _PREFIX.match(prefix):
        raise ConfigError(
            f"--store-prefix {prefix!r}: use 1 to 64 letters, digits or . _ : - "
            "(e.g. trackingproxy:prod:)"
        )
    return StoreSettings(url, Path(bundle) if bundle else None, prefix)
