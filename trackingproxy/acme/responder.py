"""The HTTP-01 challenge responder: pending tokens in memory, shared through the state dir.

``key_authorization`` (called by the port-80 site for every challenge request) is a dict
lookup. Tokens published by this process are answered at once; tokens published by other
processes sharing the state directory (``STATE/challenges/<domain>/<token>``) are picked up
by a periodic refresh, never per request. Only configured domains, only base64url tokens,
only while the order is pending (published until withdrawn, at most ``ttl`` seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from trackingproxy.store.files import atomic_write, ensure_private_dir

__all__ = ["HTTP01Responder", "valid_token"]

log = Logger()
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_Entry = tuple[bytes, float]  # key authorization, expiry (clock seconds)


def valid_token(token: str) -> bool:
    """True for a plausible ACME token: base64url without padding, 16 to 128 characters."""
    return bool(_TOKEN.match(token))


class HTTP01Responder:
    """A ``ChallengeResponder`` that the ACME obtainer publishes tokens to."""

    def __init__(
        self,
        domains: Iterable[str],
        clock: IReactorTime,
        shared_dir: Path | None = None,
        refresh_interval: float = 1.0,
        ttl: float = 600.0,
    ) -> None:
        self._domains = frozenset(domains)
        self._clock = clock
        self._dir = shared_dir
        self._interval = refresh_interval
        self._ttl = ttl
        self._local: dict[tuple[str, str], _Entry] = {}
        self._shared: dict[tuple[str, str], _Entry] = {}
        self._loop: LoopingCall | None = None

    @property
    def propagation_delay(self) -> float:
        """Seconds to wait after publishing before asking the CA to validate.

        Other processes see a new token after at most one refresh interval.
        """
        return 0.0 if self._dir is None else self._interval * 1.5

    # -- the ChallengeResponder seam (hot path, never blocks) -----------------------------
    def set_domains(self, domains: Iterable[str]) -> None:
        """Answer for exactly these domains from now on (SIGHUP reload)."""
        self._domains = frozenset(domains)

    def key_authorization(self, host: str, token: str) -> bytes | None:
        host = host.lower().rstrip(".")
        if host not in self._domains or not valid_token(token):
            return None
        entry = self._local.get((host, token)) or self._shared.get((host, token))
        if entry is None or entry[1] <= self._clock.seconds():
            return None
        return entry[0]

    # -- publishing (called by the obtainer on the reactor thread) ------------------------
    def add(self, host: str, token: str, key_authorization: bytes) -> None:
        """Answer ``token`` for ``host`` until ``remove`` (or ``ttl`` seconds)."""
        if host not in self._domains:
            raise ValueError(f"{host} is not a configured domain")
        if not valid_token(token):
            raise ValueError(f"not a base64url ACME token: {token!r}")
        expires = self._clock.seconds() + self._ttl
        self._local[(host, token)] = (key_authorization, expires)
        if self._dir is not None:
            data = {"key_authorization": key_authorization.decode("ascii"), "expires": expires}
            atomic_write(self._dir / host / token, json.dumps(data).encode())

    def remove(self, host: str, token: str) -> None:
        """Stop answering ``token`` (the order is no longer pending)."""
        self._local.pop((host, token), None)
        self._shared.pop((host, token), None)
        if self._dir is not None and valid_token(token) and host in self._domains:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / host / token).unlink()

    # -- sharing --------------------------------------------------------------------------
    def start(self) -> None:
        if self._dir is None or self._loop is not None:
            return
        ensure_private_dir(self._dir)
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("Challenge token refresh stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def refresh(self) -> None:
        """Reload the tokens other processes published; delete expired token files."""
        if self._dir is None:
            return
        now = self._clock.seconds()
        found: dict[tuple[str, str], _Entry] = {}
        for host in self._domains:
            try:
                names = os.listdir(self._dir / host)
            except FileNotFoundError:
                continue
            for token in names:
                if not valid_token(token):
                    continue
                path = self._dir / host / token
                try:
                    data = json.loads(path.read_bytes())
                    entry = (str(data["key_authorization"]).encode("ascii"), float(data["expires"]))
                except FileNotFoundError:
                    continue
                except (ValueError, KeyError, TypeError, UnicodeEncodeError):
                    continue  # being written or corrupt; the expiry sweep below ignores it
                if entry[1] <= now:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                found[(host, token)] = entry
        self._shared = found
