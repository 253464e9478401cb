# -*- test-case-name: tests.store.test_redis_store,tests.store.test_store_contract -*-
"""The certificate store in Redis or Valkey, shared by a cluster of replicas.

Keys (``P`` the prefix; a name's keys share one Cluster hash slot through ``{name}``)::

    P{name}:cert       hash: key_pem, chain_pem, serial, ari (JSON), fence, updated
    P{name}:lock       the holder's token (SET NX PX: expiry on Redis's clock)
    P{name}:fence      the last fence handed out (INCR)
    P{name}:order      hash: order_url, key_pem, directory_url, fence
    P{name}:error      JSON: the last failure
    P{host}:challenge:<token>    an HTTP-01 answer (PX ttl)
    Paccount:<sha256(url)[:16]>  JSON: an ACME account
    Pdomains           set: the cluster-wide domain list
    Pevents            channel: ``cert <name>`` after every certificate write, ``domains``

redis-py is blocking: every call runs through the injected ``run`` (a small thread pool the
caller owns), never on the reactor thread. Fenced writes are Lua scripts (``scripts``). Every
error meaning the store cannot serve becomes ``StoreUnavailable`` with one line (password
masked) and marks ``health`` down; any answer marks it up again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis
from redis import exceptions as rx
from redis.typing import EncodableT
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.errors import ConfigError
from trackingproxy.store.contract import (
    AccountRecord,
    AriWindow,
    Lock,
    PendingOrder,
    StoredCertificate,
    StoreUnavailable,
)
from trackingproxy.store.events import Watch
from trackingproxy.store.health import StoreHealth
from trackingproxy.store.scripts import OK, Scripts, refusal
from trackingproxy.store.url import config_warnings, password_of, unavailable_cause
from trackingproxy.tls.certificates import parse_pem

__all__ = ["RedisStore", "Runner", "result_of", "synchronous"]

log = Logger(namespace="trackingproxy.store.redis")
_T = TypeVar("_T")
_LOAD_BATCH = 500  # certificates per pipelined round trip in load_many


class Runner(Protocol):
    """Runs a blocking function off the reactor thread (``deferToThreadPool``)."""

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]: ...


def synchronous(f: Callable[[], _T]) -> Deferred[_T]:
    """A ``Runner`` that calls at once (tests; the start-up checks)."""
    return maybeDeferred(f)


def result_of(d: Deferred[_T]) -> _T:
    """The result of a store call made with ``synchronous`` (its Deferred has fired); its
    failure is raised."""
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:  # pragma: no cover - a synchronous call always fires
        raise RuntimeError("a synchronous store call did not complete")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]  # type: ignore[no-any-return]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _data(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else when.astimezone(datetime.UTC).isoformat()


def _when(value: object) -> datetime.datetime | None:
    if value is None:
        return None
    when = datetime.datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        raise ValueError(f"timestamp without time zone: {value!r}")
    return when.astimezone(datetime.UTC)


def _ari_json(ari: AriWindow) -> str:
    return json.dumps(
        {"start": _iso(ari.start), "end": _iso(ari.end), "next_check": _iso(ari.next_check)}
    )


class RedisStore:
    """A ``CertificateStore``, ``ChallengeBoard`` and ``DomainList`` in Redis.

    @ivar description: the store URL, password masked (in every message).
    @ivar health: whether the store answered the last call.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        run: Runner,
        clock: IReactorTime,
        prefix: str = "trackingproxy:",
        node_id: str,
        description: str,
    ) -> None:
        self._client = client
        self._run = run
        self._clock = clock
        self._prefix = prefix
        self._node_id = node_id
        self.description = description
        self.health = StoreHealth(description, clock)
        self._scripts = Scripts.register(client)
        self._channel = f"{prefix}events"
        self._secret = password_of(client)
        self._reported: set[tuple[str, str]] = set()
        self._unusable: list[tuple[str, str]] = []  # found in the pool, logged by the reactor
        self._reported_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------
    def _key(self, name: str, part: str) -> str:
        return f"{self._prefix}{{{name}}}:{part}"

    def _call(self, f: Callable[[], _T]) -> Deferred[_T]:
        """Run ``f`` through ``run``; outages become StoreUnavailable and mark health."""

        def guarded() -> _T:
            try:
                return f()
            except (rx.RedisError, OSError) as e:
                cause = unavailable_cause(e, self._secret)
                if cause is None:
                    raise
                raise StoreUnavailable(f"store {self.description}: {cause}") from None

        def answered(result: _T) -> _T:
            self._log_unusable()
            self.health.mark_up()
            return result

        def failed(failure: Failure) -> Failure:
            self._log_unusable()
            if failure.check(StoreUnavailable):
                self.health.mark_down(str(failure.value))
            else:
                self.health.mark_up()  # the store answered (a refusal, a bug): it is up
            return failure

        d = self._run(guarded)
        d.addCallbacks(answered, failed)
        return d

    def _report(self, name: str, fields: dict[str, bytes], problem: str) -> None:
        """Note an unusable entry once per distinct content (not on every periodic check);
        it is logged when the call's result reaches the reactor thread."""
        digest = hashlib.sha256(b"".join(fields.get(k, b"") for k in sorted(fields))).hexdigest()
        with self._reported_lock:
            if (name, digest) not in self._reported:
                self._reported.add((name, digest))
                self._unusable.append((name, problem))

    def _log_unusable(self) -> None:
        with self._reported_lock:
            found, self._unusable = self._unusable, []
        for name, problem in found:
            log.warn(
                "store {store}: the entry of {name} is unusable ({problem}); treating it as "
                "missing, it will be obtained again",
                store=self.description, name=name, problem=problem,
            )

    # -- certificates ---------------------------------------------------------------------
    def _parse(self, name: str, raw: dict[Any, Any]) -> StoredCertificate | None:
        if not raw:
            return None
        fields = {_text(k): _data(v) for k, v in raw.items()}
        if "key_pem" not in fields or "chain_pem" not in fields:
            self._report(name, fields, "no key or no chain in it")
            return None
        try:
            cert = parse_pem(fields["chain_pem"], fields["key_pem"], f"store entry {name}")
        except ConfigError as e:
            self._report(name, fields, str(e))
            return None
        ari = None
        if "ari" in fields and _text(fields.get("serial", b"")) == cert.serial_hex:
            try:
                data = json.loads(fields["ari"])
                start, end = _when(data["start"]), _when(data["end"])
                if start is None or end is None:
                    raise ValueError("window without start or end")
                ari = AriWindow(start, end, _when(data.get("next_check")))
            except (KeyError, ValueError, TypeError) as e:
                self._report(name, fields, f"bad ARI window: {e}")
        return StoredCertificate(cert=cert, ari=ari)

    def load(self, name: str) -> Deferred[StoredCertificate | None]:
        key = self._key(name, "cert")
        return self._call(lambda: self._parse(name, self._client.hgetall(key)))

    def load_many(self, names: Sequence[str]) -> Deferred[dict[str, StoredCertificate]]:
        """The certificates of ``names`` that are stored and usable (pipelined, in batches)."""
        wanted = list(names)

        def read() -> dict[str, StoredCertificate]:
            found: dict[str, StoredCertificate] = {}
            for i in range(0, len(wanted), _LOAD_BATCH):
                batch = wanted[i : i + _LOAD_BATCH]
                pipe = self._client.pipeline(transaction=False)
                for name in batch:
                    pipe.hgetall(self._key(name, "cert"))
                for name, raw in zip(batch, pipe.execute(), strict=True):
                    stored = self._parse(name, raw)
                    if stored is not None:
                        found[name] = stored
            return found

        return self._call(read)

    def serials(self, names: Sequence[str]) -> Deferred[dict[str, str]]:
        wanted = list(names)

        def read() -> dict[str, str]:
            pipe = self._client.pipeline(transaction=False)
            for name in wanted:
                pipe.hget(self._key(name, "cert"), "serial")
            results = pipe.execute() if wanted else []
            return {n: _text(s) for n, s in zip(wanted, results, strict=True) if s is not None}

        return self._call(read)

    @staticmethod
    def _cert_fields(stored: StoredCertificate) -> list[bytes | str]:
        cert = stored.cert
        fields: list[bytes | str] = [
            "key_pem", cert.key_pem(), "chain_pem", cert.fullchain_pem(),
            "serial", cert.serial_hex,
        ]
        if stored.ari is not None:
            fields += ["ari", _ari_json(stored.ari)]
        return fields

    def save(self, lock: Lock, cert: StoredCertificate) -> Deferred[None]:
        name = lock.name
        keys = [self._key(name, p) for p in ("lock", "cert", "order", "error")]
        args: list[EncodableT] = [
            lock.token, lock.fence, self._channel, name, *self._cert_fields(cert)
        ]

        def write() -> None:
            status = _text(self._scripts.save_cert(keys=keys, args=args))
            if status != OK:
                raise refusal(status, lock)

        return self._call(write)

    def seed(self, name: str, cert: StoredCertificate) -> Deferred[bool]:
        keys = [self._key(name, "cert")]
        args: list[EncodableT] = [self._channel, name, *self._cert_fields(cert)]
        return self._call(lambda: bool(int(self._scripts.seed(keys=keys, args=args))))

    def save_ari(self, name: str, serial_hex: str, ari: AriWindow) -> Deferred[None]:
        keys, args = [self._key(name, "cert")], [serial_hex, _ari_json(ari)]
        return self._call(lambda: _none(self._scripts.save_ari(keys=keys, args=args)))

    def record_error(self, name: str, message: str, when: datetime.datetime) -> Deferred[None]:
        value = json.dumps({"message": message, "at": _iso(when), "node": self._node_id})
        key = self._key(name, "error")
        return self._call(lambda: _none(self._client.set(key, value)))

    # -- resumable orders -----------------------------------------------------------------
    def load_order(self, name: str) -> Deferred[PendingOrder | None]:
        key = self._key(name, "order")

        def read() -> PendingOrder | None:
            raw = self._client.hgetall(key)
            if not raw:
                return None
            fields = {_text(k): _data(v) for k, v in raw.items()}
            try:
                return PendingOrder(
                    order_url=_text(fields["order_url"]),
                    key_pem=fields["key_pem"],
                    directory_url=_text(fields["directory_url"]),
                )
            except (KeyError, UnicodeDecodeError) as e:
                self._report(f"{name} (order)", fields, f"missing field {e}")
                return None

        return self._call(read)

    def save_order(self, lock: Lock, order: PendingOrder) -> Deferred[None]:
        keys = [self._key(lock.name, p) for p in ("lock", "cert", "order")]
        args: list[EncodableT] = [
            lock.token, lock.fence, "order_url", order.order_url, "key_pem", order.key_pem,
            "directory_url", order.directory_url,
        ]

        def write() -> None:
            status = _text(self._scripts.save_order(keys=keys, args=args))
            if status != OK:
                raise refusal(status, lock)

        return self._call(write)

    # -- locks ----------------------------------------------------------------------------
    def acquire(self, name: str, ttl: float) -> Deferred[Lock | None]:
        token = f"{self._node_id}:{secrets.token_hex(16)}"
        keys = [self._key(name, p) for p in ("lock", "fence", "cert", "order")]
        expires = self._clock.seconds() + ttl

        def take() -> Lock | None:
            fence = self._scripts.acquire(keys=keys, args=[token, _ms(ttl)])
            if fence is None:
                return None
            return Lock(name=name, token=token, expires=expires, fence=int(fence))

        return self._call(take)

    def refresh(self, lock: Lock, ttl: float) -> Deferred[Lock]:
        expires = self._clock.seconds() + ttl
        keys = [self._key(lock.name, "lock")]

        def extend() -> Lock:
            status = _text(self._scripts.refresh(keys=keys, args=[lock.token, _ms(ttl)]))
            if status != OK:
                raise refusal(status, lock)
            return Lock(name=lock.name, token=lock.token, expires=expires, fence=lock.fence)

        return self._call(extend)

    def release(self, lock: Lock) -> Deferred[None]:
        keys = [self._key(lock.name, "lock")]
        return self._call(lambda: _none(self._scripts.release(keys=keys, args=[lock.token])))

    # -- accounts -------------------------------------------------------------------------
    def _account_key(self, directory_url: str) -> str:
        digest = hashlib.sha256(directory_url.encode("utf-8")).hexdigest()[:16]
        return f"{self._prefix}account:{digest}"

    def load_account(self, directory_url: str) -> Deferred[AccountRecord | None]:
        key = self._account_key(directory_url)

        def read() -> AccountRecord | None:
            raw = self._client.get(key)
            if raw is None:
                return None
            try:
                data = json.loads(raw)
                key_data, regr = data["key"], data.get("registration")
                if not isinstance(key_data, dict) or not (regr is None or isinstance(regr, dict)):
                    raise ValueError("no account key in it")
            except (ValueError, KeyError, TypeError) as e:
                self._report(f"account {directory_url}", {"v": _data(raw)}, str(e))
                return None
            return AccountRecord(
                key_json=json.dumps(key_data),
                registration_json=None if regr is None else json.dumps(regr),
            )

        return self._call(read)

    def save_account(self, directory_url: str, account: AccountRecord) -> Deferred[None]:
        regr = account.registration_json
        value = json.dumps({
            "directory": directory_url,
            "key": json.loads(account.key_json),
            "registration": None if regr is None else json.loads(regr),
        })
        key = self._account_key(directory_url)
        return self._call(lambda: _none(self._client.set(key, value)))

    # -- HTTP-01 answers ------------------------------------------------------------------
    def put_challenge(
        self, host: str, token: str, key_authorization: bytes, ttl: float
    ) -> Deferred[None]:
        key = self._key(host, f"challenge:{token}")
        return self._call(lambda: _none(self._client.set(key, key_authorization, px=_ms(ttl))))

    def get_challenge(self, host: str, token: str) -> Deferred[bytes | None]:
        key = self._key(host, f"challenge:{token}")

        def read() -> bytes | None:
            value = self._client.get(key)
            return None if value is None else _data(value)

        return self._call(read)

    def delete_challenge(self, host: str, token: str) -> Deferred[None]:
        key = self._key(host, f"challenge:{token}")
        return self._call(lambda: _none(self._client.delete(key)))

    # -- the domain list ------------------------------------------------------------------
    def list_domains(self) -> Deferred[list[str]]:
        key = f"{self._prefix}domains"
        return self._call(lambda: sorted(_text(n) for n in self._client.smembers(key)))

    def _change_domains(self, verb: str, name: str) -> Deferred[bool]:
        keys, args = [f"{self._prefix}domains"], [verb, name, self._channel]
        return self._call(lambda: bool(int(self._scripts.domains(keys=keys, args=args))))

    def add_domain(self, name: str) -> Deferred[bool]:
        return self._change_domains("add", name)

    def remove_domain(self, name: str) -> Deferred[bool]:
        return self._change_domains("remove", name)

    # -- operations -----------------------------------------------------------------------
    def ping(self) -> Deferred[None]:
        """Fires when the store answered PING (StoreUnavailable otherwise)."""
        return self._call(lambda: _none(self._client.ping()))

    def settings_warnings(self) -> Deferred[list[str]]:
        """One line per Redis setting that endangers the data, naming the fix ([] when
        CONFIG is not allowed, as on most managed services)."""
        return self._call(lambda: config_warnings(self._client, self.description))

    def watch(
        self,
        on_event: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        call_in_reactor: Callable[..., None],
    ) -> Watch:
        """Deliver the store's events (``("cert", name)``, ``("domains", "")``) through
        ``call_in_reactor`` until the returned handle's ``stop()``; ``on_subscribed`` after
        every (re)subscription, when events may have been missed."""
        watch = Watch(
            self._client, self._channel, self.description, on_event, on_subscribed,
            call_in_reactor,
        )
        watch.start()
        return watch


def _none(_: object) -> None:
    return None
