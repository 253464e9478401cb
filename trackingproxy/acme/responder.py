# -*- test-case-name: tests.acme.test_responder_shared_dir,tests.acme.test_responder_board -*-
"""The HTTP-01 challenge responder: pending tokens in memory, shared through the state dir
or, in a cluster, through the shared store.

``key_authorization`` (called by the port-80 site for every challenge request) is a dict
lookup. Tokens published by this process are answered at once; tokens published by other
processes sharing the state directory are picked up by a periodic refresh, never per
request. The directory is flat, one 0600 JSON file per pending token,
``STATE/challenges/<token>@<sha256(domain)[:32]>`` (at most 161 characters whatever the
domain's length; the domain itself is in the file), so a refresh is one ``os.scandir`` and
one read per pending token: its cost follows the tokens pending, not the domains configured.
Per-domain subdirectories left by earlier versions (``<domain>/<token>``) are passed over,
never read nor removed: tokens live minutes, so at worst a validation pending across the
upgrade fails and the order is retried. With a shared store (``board``) the answer is
written there before the CA is told the challenge is ready (``add`` fires once it is), and a
token this replica does not hold is looked up in the store: the one store access on the
request path, bounded (``MAX_LOOKUPS`` at once; beyond, 503 and the CA retries). Only
configured domains, only base64url tokens, only while the order is pending (published until
withdrawn, at most ``ttl`` seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.proxy.challenges import Busy
from trackingproxy.store.contract import ChallengeBoard
from trackingproxy.store.files import atomic_write, ensure_private_dir

__all__ = ["MAX_LOOKUPS", "HTTP01Responder", "valid_token"]

MAX_LOOKUPS = 32  # store lookups in flight at once (challenge requests for unknown tokens)

log = Logger()
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_DIGEST = re.compile(r"[0-9a-f]{32}")
_Entry = tuple[bytes, float]  # key authorization, expiry (clock seconds)


def valid_token(token: str) -> bool:
    """True for a plausible ACME token: base64url without padding, 16 to 128 characters."""
    return _TOKEN.fullmatch(token) is not None  # fullmatch: "$" would let a final "\n" in


def _file_name(host: str, token: str) -> str:
    """The shared directory's file for ``token`` of ``host``: ``<token>@<host digest>``.

    ``token`` must be valid (base64url: no ``/``, ``@`` or leading dot); the digest (32 hex
    characters) keeps the name under 162 characters for any host and free of anything the
    host could smuggle in. ``atomic_write``'s temporary names start with a dot."""
    return f"{token}@{hashlib.sha256(host.encode()).hexdigest()[:32]}"


class HTTP01Responder:
    """A ``ChallengeResponder`` that the ACME obtainer publishes tokens to."""

    def __init__(
        self,
        domains: Iterable[str],
        clock: IReactorTime,
        shared_dir: Path | None = None,
        refresh_interval: float = 1.0,
        ttl: float = 600.0,
        board: ChallengeBoard | None = None,
    ) -> None:
        self._domains = frozenset(domains)
        self._clock = clock
        self._dir = shared_dir
        self._interval = refresh_interval
        self._ttl = ttl
        self._local: dict[tuple[str, str], _Entry] = {}
        self._shared: dict[tuple[str, str], _Entry] = {}
        self._loop: LoopingCall | None = None
        self._board = board
        self._lookups = 0

    @property
    def propagation_delay(self) -> float:
        """Seconds to wait after publishing before asking the CA to validate.

        Other processes see a new token after at most one refresh interval; with a shared
        store every process looks it up there, so there is nothing to wait for.
        """
        if self._board is not None:
            return 0.0  # ``add`` fired once the answer was in the shared store
        return 0.0 if self._dir is None else self._interval * 1.5

    # -- the ChallengeResponder seam (hot path, never blocks) -----------------------------
    def set_domains(self, domains: Iterable[str]) -> None:
        """Answer for exactly these domains from now on (SIGHUP reload)."""
        self._domains = frozenset(domains)

    def key_authorization(self, host: str, token: str) -> bytes | Deferred[bytes | None] | None:
        host = host.lower().rstrip(".")
        if host not in self._domains or not valid_token(token):
            return None
        entry = self._local.get((host, token)) or self._shared.get((host, token))
        if entry is not None and entry[1] > self._clock.seconds():
            return entry[0]
        if self._board is None:
            return None
        if self._lookups >= MAX_LOOKUPS:
            raise Busy("too many challenge lookups in the store at once")
        self._lookups += 1
        d = self._board.get_challenge(host, token)

        def done(result: bytes | Failure | None) -> bytes | None:
            self._lookups -= 1
            if isinstance(result, Failure):
                log.info("Challenge lookup for {host} failed: {error}", host=host,
                         error=result.getErrorMessage())
                return None
            return result

        d.addBoth(done)
        return d

    # -- publishing (called by the obtainer on the reactor thread) ------------------------
    def add(self, host: str, token: str, key_authorization: bytes) -> Deferred[None]:
        """Answer ``token`` for ``host`` until ``remove`` (or ``ttl`` seconds); fires once
        every replica can answer it (with a shared store: once it is written there)."""
        if host not in self._domains:
            raise ValueError(f"{host} is not a configured domain")
        if not valid_token(token):
            raise ValueError(f"not a base64url ACME token: {token!r}")
        expires = self._clock.seconds() + self._ttl
        self._local[(host, token)] = (key_authorization, expires)
        if self._dir is not None:
            data = {
                "host": host,
                "key_authorization": key_authorization.decode("ascii"),
                "expires": expires,
            }
            atomic_write(self._dir / _file_name(host, token), json.dumps(data).encode())
        if self._board is not None:
            return self._board.put_challenge(host, token, key_authorization, self._ttl)
        return succeed(None)

    def remove(self, host: str, token: str) -> Deferred[None]:
        """Stop answering ``token`` (the order is no longer pending)."""
        self._local.pop((host, token), None)
        self._shared.pop((host, token), None)
        if self._dir is not None and valid_token(token):
            with contextlib.suppress(FileNotFoundError):
                (self._dir / _file_name(host, token)).unlink()
        if self._board is not None and valid_token(token):
            return self._board.delete_challenge(host, token)
        return succeed(None)

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
        """Reload the tokens other processes published; delete expired token files.

        One ``os.scandir`` of the shared directory and one read per token file: the work
        follows the tokens pending (plus whatever else lies in the directory), never the
        number of configured domains. Tokens of hosts not configured here are not answered
        (their files are left to their publisher until they expire); a file being written,
        corrupt, or not named after its own host and token is skipped; anything else in the
        directory (temporary files, old-layout ``<domain>/`` subdirectories) is passed over.
        """
        if self._dir is None:
            return
        now = self._clock.seconds()
        found: dict[tuple[str, str], _Entry] = {}
        try:
            with os.scandir(self._dir) as entries:
                names = [entry.name for entry in entries]
        except FileNotFoundError:
            names = []
        for name in names:
            token, at, digest = name.partition("@")
            if not at or not valid_token(token) or not _DIGEST.fullmatch(digest):
                continue  # a temporary file, an old-layout directory, something else
            path = self._dir / name
            try:
                data = json.loads(path.read_bytes())
                host = data["host"]
                entry = (str(data["key_authorization"]).encode("ascii"), float(data["expires"]))
            except OSError:
                continue  # withdrawn meanwhile, or not a file
            except (ValueError, KeyError, TypeError, UnicodeEncodeError):
                continue  # being written or corrupt; the expiry sweep below ignores it
            if not isinstance(host, str) or _file_name(host, token) != name:
                continue
            if entry[1] <= now:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if host in self._domains:
                found[(host, token)] = entry
        self._shared = found
