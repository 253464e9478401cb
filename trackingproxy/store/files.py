# -*- test-case-name: tests.store.test_store_contract,tests.store.test_file_fences -*-
"""The certificate store in the state directory (files; safe for processes sharing it).

Layout (directories 0700, files 0600, every write atomic: temp file, fsync, rename)::

    STATE/.guard                       flock'ed around every read and write of the store
    STATE/accounts/<sha256(url)[:16]>.json   {"directory": url, "key": JWK, "registration": ...}
    STATE/certificates/<domain>/privkey.pem
    STATE/certificates/<domain>/fullchain.pem
    STATE/certificates/<domain>/meta.json    issuer, serial, not-before/after, ARI, last error,
                                             the fence of the holder that wrote it
    STATE/certificates/<domain>/order.json   a resumable order: URL, directory, new key, fence
    STATE/locks/<domain>.lock                {"token", "expires", "fence", "pid", "host"}
    STATE/fences/<domain>                    the last fence handed out for the name (kept
                                             after the lock is released)

Every acquisition of a name gets a fence above every earlier one (and above any fence stored
with the data); a write commits only while its lock is held and its fence is not older than
the one stored with what it replaces. Files written before fences existed count as fence 0.

Reads and writes are short local-disk operations done synchronously (the Deferreds returned
have already fired). A corrupt or half-written file is reported once and treated as missing.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from trackingproxy.errors import ConfigError
from trackingproxy.store.contract import (
    AccountRecord,
    AriWindow,
    Lock,
    PendingOrder,
    StoredCertificate,
)
from trackingproxy.store.scripts import EXPIRED, OLDER, TAKEN, refusal
from trackingproxy.tls.certificates import parse_pem

__all__ = ["FileStore", "atomic_write", "ensure_private_dir"]

log = Logger()
_T = TypeVar("_T")
_NAME = re.compile(r"^[a-z0-9_][a-z0-9._-]{0,252}$")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700 directories; tighten an existing one."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def usable_private_dir(path: Path) -> bool:
    """Whether ``path`` is (or could be made) a 0700 directory this process can write in."""
    try:
        ensure_private_dir(path)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` as a 0600 file: temp file, fsync, rename, fsync the directory.

    ``durable=False`` leaves out both fsyncs (a copy that can be made again, written 10,000 at
    a time: 60,000 fsyncs would take half a minute); readers still see the old file or the new
    one, never a part."""
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.astimezone(datetime.UTC).isoformat()


def _parse_iso(value: object) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    when = datetime.datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"timestamp without time zone: {value!r}")
    return when.astimezone(datetime.UTC)


class FileStore:
    """A ``CertificateStore`` in a state directory; ``clock`` gives lock expiry times."""

    def __init__(self, state_dir: Path, clock: IReactorTime) -> None:
        self._dir = state_dir
        self._clock = clock
        self._reported: set[tuple[str, str]] = set()

    # -- helpers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, exclusive: bool) -> Iterator[None]:
        """Hold the store's flock; reads still work in a read-only state directory."""
        try:
            ensure_private_dir(self._dir)
        except OSError:
            if exclusive or not self._dir.is_dir():
                raise
        fd = self._open_guard(exclusive)
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            if fd is not None:
                os.close(fd)

    def _open_guard(self, exclusive: bool) -> int | None:
        path = self._dir / ".guard"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            if exclusive or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # a read-only directory without a guard file: nobody writes it either

    def _run(self, exclusive: bool, f: Callable[[], _T]) -> Deferred[_T]:
        try:
            with self._guard(exclusive):
                return succeed(f())
        except Exception:
            return fail()

    def _domain_dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"not a storable name: {name!r}")
        return self._dir / "certificates" / name

    def _lock_path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"not a lockable name: {name!r}")
        return self._dir / "locks" / f"{name}.lock"

    def _account_path(self, directory_url: str) -> Path:
        digest = hashlib.sha256(directory_url.encode("utf-8")).hexdigest()[:16]
        return self._dir / "accounts" / f"{digest}.json"

    def _report(self, path: Path, problem: str) -> None:
        """Log a corrupt file once per distinct content (not on every periodic check)."""
        try:
            stamp = str(path.stat().st_mtime_ns)
        except OSError:
            stamp = "gone"
        if (str(path), stamp) in self._reported:
            return
        self._reported.add((str(path), stamp))
        log.warn(
            "State file {path} is unusable ({problem}); treating it as missing, it will be "
            "obtained again",
            path=str(path),
            problem=problem,
        )

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            self._report(path, f"bad JSON: {e}")
            return None
        return data

    def _check_lock(self, lock: Lock, fenced: bool = True) -> None:
        data = self._read_json(self._lock_path(lock.name))
        if data is None:
            raise refusal(EXPIRED, lock)
        if data.get("token") != lock.token:
            raise refusal(TAKEN, lock)
        if float(data.get("expires", 0)) <= self._clock.seconds():
            raise refusal(EXPIRED, lock)
        if fenced and lock.fence < self._floor(lock.name):
            raise refusal(OLDER, lock)

    def _meta(self, name: str) -> dict[str, Any]:
        return self._read_json(self._domain_dir(name) / "meta.json") or {}

    @staticmethod
    def _fence_of(data: dict[str, Any] | None) -> int:
        value = (data or {}).get("fence", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def _floor(self, name: str) -> int:
        """The largest fence stored with the data of ``name`` (certificate or order)."""
        d = self._domain_dir(name)
        return max(
            self._fence_of(self._read_json(d / "meta.json")),
            self._fence_of(self._read_json(d / "order.json")),
        )

    def _fence_path(self, name: str) -> Path:
        return self._dir / "fences" / self._lock_path(name).stem

    def _next_fence(self, name: str) -> int:
        """Hand out the next fence of ``name`` (under the exclusive guard)."""
        path = self._fence_path(name)
        try:
            last = int(path.read_text().strip() or "0")
        except FileNotFoundError:
            last = 0
        except ValueError:
            self._report(path, "not a number")
            last = 0
        fence = max(last, self._floor(name)) + 1
        atomic_write(path, f"{fence}\n".encode())
        return fence

    # -- certificates ---------------------------------------------------------------------
    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        return self._run(False, lambda: self._load(name))

    def load_many(self, names: Sequence[str]) -> Deferred[dict[str, StoredCertificate]]:
        def read() -> dict[str, StoredCertificate]:
            found = {}
            for name in names:
                stored = self._load(name)
                if stored is not None:
                    found[name] = stored
            return found

        return self._run(False, read)

    def copy_facts(self, name: str) -> tuple[str, AriWindow | None] | None:
        """The serial and ARI window last written for ``name`` (meta.json, no PEM parsed):
        what a local copy holds, for ``LocalCopyStore`` to tell whether to write it again."""
        d = self._domain_dir(name)
        meta = self._meta(name)
        serial = meta.get("serial")
        if not isinstance(serial, str) or not (d / "fullchain.pem").exists():
            return None
        return serial, self._ari_of(meta, d)

    def _ari_of(self, meta: dict[str, Any], d: Path) -> AriWindow | None:
        raw_ari = meta.get("ari")
        if not isinstance(raw_ari, dict):
            return None
        try:
            start, end = _parse_iso(raw_ari["start"]), _parse_iso(raw_ari["end"])
            if start is None or end is None:
                raise ValueError("window without start or end")
            return AriWindow(start, end, _parse_iso(raw_ari.get("next_check")))
        except (KeyError, ValueError) as e:
            self._report(d / "meta.json", f"bad ARI window: {e}")
            return None

    def _load(self, name: str) -> StoredCertificate | None:
        d = self._domain_dir(name)
        try:
            key_pem = (d / "privkey.pem").read_bytes()
            chain_pem = (d / "fullchain.pem").read_bytes()
        except FileNotFoundError:
            if (d / "privkey.pem").exists() != (d / "fullchain.pem").exists():
                self._report(d, "only one of privkey.pem and fullchain.pem exists")
            return None
        try:
            cert = parse_pem(chain_pem, key_pem, f"state {d}")
        except ConfigError as e:
            self._report(d / "fullchain.pem", str(e))
            return None
        meta = self._meta(name)
        ari = self._ari_of(meta, d) if meta.get("serial") == cert.serial_hex else None
        return StoredCertificate(cert=cert, ari=ari)

    def save(self, lock: Lock, cert: StoredCertificate) -> Deferred[None]:
        def write() -> None:
            self._check_lock(lock)
            self._write_cert(lock.name, cert, lock.fence)

        return self._run(True, write)

    def seed(self, name: str, cert: StoredCertificate) -> Deferred[bool]:
        def write() -> bool:
            d = self._domain_dir(name)
            if (d / "privkey.pem").exists() or (d / "fullchain.pem").exists():
                return False
            self._write_cert(name, cert, 0)
            return True

        return self._run(True, write)

    def write_copy(self, name: str, cert: StoredCertificate) -> None:
        """Write ``cert`` for ``name`` like ``save`` does, without a lock (a local copy of what
        a shared store holds: its lock and fence decided); raises OSError when it cannot."""
        with self._guard(True):
            self._write_cert(name, cert, self._fence_of(self._meta(name)), durable=False)

    def _write_cert(
        self, name: str, stored: StoredCertificate, fence: int, durable: bool = True
    ) -> None:
        d = self._domain_dir(name)
        cert = stored.cert
        atomic_write(d / "privkey.pem", cert.key_pem(), durable)
        atomic_write(d / "fullchain.pem", cert.fullchain_pem(), durable)
        meta: dict[str, Any] = {
            "issuer": cert.issuer,
            "serial": cert.serial_hex,
            "not_before": _iso(cert.not_before),
            "not_after": _iso(cert.not_after),
            "ari": self._ari_json(stored.ari),
            "last_error": None,
            "last_error_at": None,
            "fence": fence,
        }
        atomic_write(d / "meta.json", json.dumps(meta, indent=2).encode(), durable)
        with contextlib.suppress(FileNotFoundError):
            (d / "order.json").unlink()

    def serials(self, names: Sequence[str]) -> Deferred[dict[str, str]]:
        return self.load_many(names).addCallback(
            lambda found: {n: stored.cert.serial_hex for n, stored in found.items()}
        )

    @staticmethod
    def _ari_json(ari: AriWindow | None) -> dict[str, str | None] | None:
        if ari is None:
            return None
        return {"start": _iso(ari.start), "end": _iso(ari.end), "next_check": _iso(ari.next_check)}

    def save_ari(self, name: str, serial_hex: str, ari: AriWindow) -> Deferred[None]:
        def write() -> None:
            meta = self._meta(name)
            if meta.get("serial") != serial_hex:
                return
            meta["ari"] = self._ari_json(ari)
            atomic_write(self._domain_dir(name) / "meta.json", json.dumps(meta, indent=2).encode())

        return self._run(True, write)

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        def write() -> None:
            meta = self._meta(name)
            meta["last_error"] = message
            meta["last_error_at"] = _iso(when)
            atomic_write(self._domain_dir(name) / "meta.json", json.dumps(meta, indent=2).encode())

        return self._run(True, write)

    # -- resumable orders -----------------------------------------------------------------
    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        def read() -> PendingOrder | None:
            path = self._domain_dir(name) / "order.json"
            data = self._read_json(path)
            if data is None:
                return None
            try:
                return PendingOrder(
                    order_url=str(data["order_url"]),
                    key_pem=str(data["key"]).encode("ascii"),
                    directory_url=str(data["directory"]),
                )
            except (KeyError, UnicodeEncodeError) as e:
                self._report(path, f"missing field {e}")
                return None

        return self._run(False, read)

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        def write() -> None:
            self._check_lock(lock)
            data = {
                "order_url": order.order_url,
                "directory": order.directory_url,
                "key": order.key_pem.decode("ascii"),
                "fence": lock.fence,
            }
            atomic_write(self._domain_dir(lock.name) / "order.json", json.dumps(data).encode())

        return self._run(True, write)

    # -- locks ----------------------------------------------------------------------------
    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        def take() -> Lock | None:
            path = self._lock_path(name)
            now = self._clock.seconds()
            data = self._read_json(path)
            if data is not None and float(data.get("expires", 0)) > now:
                return None
            lock = Lock(
                name=name, token=secrets.token_hex(16), expires=now + ttl,
                fence=self._next_fence(name),
            )
            self._write_lock(lock)
            return lock

        return self._run(True, take)

    def _write_lock(self, lock: Lock) -> None:
        data = {
            "token": lock.token,
            "expires": lock.expires,
            "fence": lock.fence,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        atomic_write(self._lock_path(lock.name), json.dumps(data).encode())

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        def extend() -> Lock:
            self._check_lock(lock, fenced=False)
            data = self._read_json(self._lock_path(lock.name)) or {}
            new = Lock(
                name=lock.name, token=lock.token, expires=self._clock.seconds() + ttl,
                fence=self._fence_of(data) or lock.fence,
            )
            self._write_lock(new)
            return new

        return self._run(True, extend)

    def release(self, lock: Lock) -> Deferred[None]:
        def drop() -> None:
            path = self._lock_path(lock.name)
            data = self._read_json(path)
            if data is not None and data.get("token") == lock.token:
                path.unlink()

        return self._run(True, drop)

    # -- listing (synchronous: for the command-line tools) --------------------------------
    def names(self) -> list[str]:
        """The names that have a certificate directory, sorted."""
        with self._guard(False):
            root = self._dir / "certificates"
            if not root.is_dir():
                return []
            return sorted(
                p.name for p in root.iterdir()
                if p.is_dir() and _NAME.match(p.name) and (p / "fullchain.pem").exists()
            )

    def account_directories(self) -> list[str]:
        """The ACME directory URLs that have an account stored, sorted."""
        found = []
        with self._guard(False):
            root = self._dir / "accounts"
            if not root.is_dir():
                return []
            for path in sorted(root.glob("*.json")):
                data = self._read_json(path)
                directory = None if data is None else data.get("directory")
                if isinstance(directory, str) and self._account_path(directory) == path:
                    found.append(directory)
        return sorted(found)

    # -- accounts -------------------------------------------------------------------------
    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        def read() -> AccountRecord | None:
            path = self._account_path(directory_url)
            data = self._read_json(path)
            if data is None:
                return None
            key, regr = data.get("key"), data.get("registration")
            if not isinstance(key, dict) or not (regr is None or isinstance(regr, dict)):
                self._report(path, "no account key in it")
                return None
            return AccountRecord(
                key_json=json.dumps(key),
                registration_json=None if regr is None else json.dumps(regr),
            )

        return self._run(False, read)

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        def write() -> None:
            data = {
                "directory": directory_url,
                "key": json.loads(account.key_json),
                "registration": (
                    None if account.registration_json is None
                    else json.loads(account.registration_json)
                ),
            }
            atomic_write(self._account_path(directory_url), json.dumps(data, indent=2).encode())

        return self._run(True, write)
