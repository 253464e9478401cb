# -*- test-case-name: tests.acme.test_acme_issuer,tests.acme.test_acme_queue -*-
"""The issuing service: keeps one certificate per configured domain obtained, renewed and served.

At start it serves what the store holds, then queues what is missing or due. A full check
(reload everything from the store) runs on a jittered timer; between checks each domain is
looked at again exactly at its own renewal, retry or ARI time (``Wakeups``), so nothing done
per order walks all the domains. Due domains wait in an ``OrderQueue``: renewals within 7 days
of expiry first, then domains without a certificate (longest waiting first), then renewals by
renewal time. Orders start at most ``max_orders_per_hour`` per hour and
``max_concurrent_orders`` at once; a CA ``rateLimited`` answer pauses every start until its
Retry-After. Orders hold the store's per-name lock (so processes sharing the state directory
never order the same name at once; it is refreshed while the order runs), are de-duplicated
per name, and failures keep the served certificate, back off and are logged once each; near
expiry they are logged at CRITICAL and passed to ``panic``. Stopping waits at most
``stop_timeout`` for running orders: after that they are abandoned (their lock released,
their late result ignored) and resume from the stored order at the next start.
The store is the single source of truth: every check reloads it and serves what changed.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Generator, Iterable
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.acme.domainstate import PANIC_WINDOW, DomainState, RenewalState
from trackingproxy.acme.locks import LockKeeper
from trackingproxy.acme.obtainer import Obtainer, ObtainFailed, ObtainRequest
from trackingproxy.acme.queue import OrderQueue, QueueSummary, Wakeups
from trackingproxy.acme.schedule import draw_point, jittered, next_attempt, renewal_time
from trackingproxy.errors import ConfigError
from trackingproxy.store.contract import (
    AriWindow,
    CertificateStore,
    Lock,
    LockLost,
    PendingOrder,
    StoredCertificate,
    StoreUnavailable,
)
from trackingproxy.tls.certificates import LoadedCertificate, PrivateKey, parse_pem
from trackingproxy.tls.sni import SNIContextMap

__all__ = ["IssuingService", "PanicCallback", "QueueSummary", "RenewalState"]

log = Logger()
PanicCallback = Callable[[str, str], object]
"""Called with (domain, message) when a certificate nears expiry and renewal keeps failing."""

PANIC_REPEAT = datetime.timedelta(hours=24)
ARI_DEFAULT_RECHECK = datetime.timedelta(hours=6)
ARI_MIN_RECHECK = datetime.timedelta(minutes=1)  # a Retry-After of 0 must not loop
ARI_START_PACE = 0.5  # seconds per domain: first ARI checks of stored certificates, spread
LOAD_BATCH = 100  # certificates loaded per reactor turn in a check (tens of ms of parsing)
PROGRESS_EVERY = 5.0  # seconds between the progress lines of a long first load
SAY_EACH_UP_TO = 20  # a first load of more certificates logs a summary, not a line each


class IssuingService(Service):
    """Obtains, renews and serves (through ``sni``) one certificate per managed domain."""

    name = "acme-issuer"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        store: CertificateStore,
        obtainer: Obtainer,
        sni: SNIContextMap,
        domains: Iterable[str],
        key_generator: Callable[[], PrivateKey],
        skip_domains: Iterable[str] = (),
        panic: PanicCallback | None = None,
        rng: random.Random | None = None,
        check_interval: float = 600.0,
        lock_ttl: float = 1800.0,
        busy_retry: float = 60.0,
        backoff_base: float = 60.0,
        stop_timeout: float = 5.0,
        max_orders_per_hour: int = 90,
        max_concurrent_orders: int = 4,
        order_burst: int = 10,
    ) -> None:
        skip = set(skip_domains)
        self._clock = clock
        self._store = store
        self._obtainer = obtainer
        self._sni = sni
        self._key_generator = key_generator
        self._panic = panic
        self._rng = rng or random.Random()  # noqa: S311 (scheduling jitter, not secrets)
        self._interval = check_interval
        self._lock_ttl = lock_ttl
        self._busy_retry = datetime.timedelta(seconds=busy_retry)
        self._backoff_base = datetime.timedelta(seconds=backoff_base)
        self._stop_timeout = stop_timeout
        self._held: dict[str, LockKeeper] = {}
        self.domains: tuple[str, ...] = tuple(d for d in domains if d not in skip)
        self._state = {d: DomainState() for d in self.domains}
        self._inflight: dict[str, Deferred[bool]] = {}  # -> whether a CA order was placed
        self._timer: IDelayedCall | None = None
        self._checking: Deferred[None] | None = None
        self._busy: set[Deferred[None]] = set()  # wake-ups and ARI refreshes under way
        self._queue = OrderQueue(
            clock, self._start_queued, per_hour=max_orders_per_hour,
            concurrency=max_concurrent_orders, burst=order_burst,
        )
        self._wakeups = Wakeups(clock, self._woken)
        self._loaded = False  # the first check (the start-up load) has finished
        self._quiet_adopt = False  # during a long first load: one summary, not a line each

    @property
    def loaded(self) -> bool:
        """Whether the start-up load of the stored certificates has finished."""
        return self._loaded

    def set_domains(self, domains: Iterable[str]) -> None:
        """Manage exactly ``domains`` from now on (SIGHUP reload): removed ones leave the
        queue and the timers; new ones are loaded from the store and settled at the next
        reactor turn (work in the names added, not in all of them)."""
        self.domains = tuple(domains)
        kept = set(self.domains)
        for gone in [n for n in self._state if n not in kept]:
            self._queue.discard(gone)
            self._wakeups.plan(gone, None)
        added = [d for d in self.domains if d not in self._state]
        self._state = {d: self._state.get(d) or DomainState() for d in self.domains}
        if self.running and added:  # only the new names: the others are as they were
            self._clock.callLater(0, self._woken, added)

    def served_serials(self) -> dict[str, str]:
        """The serial of the certificate served per managed domain (for the store's safety
        check)."""
        return {n: st.current.serial_hex for n, st in self._state.items() if st.current}

    def reload(self, name: str) -> Deferred[None]:
        """Serve what the store now holds for ``name`` (another replica wrote it)."""
        if name not in self._state:
            return succeed(None)
        return self._reload(name).addCallback(lambda _: self._settle_now(name))

    def renewal_states(self) -> dict[str, RenewalState]:
        """Per managed domain: next attempt, failures, last error, orders by outcome, and
        its place and estimated start in the order queue while it waits there."""
        places = self._queue.places()
        states = {}
        for name, st in self._state.items():
            place = places.get(name)
            states[name] = RenewalState(
                next_attempt=st.due_at(),
                ordering=name in self._inflight,
                failures=st.failures,
                last_error=st.last_error,
                last_error_at=st.last_error_at,
                orders=dict(st.orders),
                queue_position=place.position if place is not None else None,
                queue_eta=place.eta if place is not None else None,
            )
        return states

    def queue_summary(self) -> QueueSummary:
        """The order queue: length, running orders, pause, orders in the last hour, pace."""
        return self._queue.summary()

    # -- lifecycle ------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._obtainer.start()
        shown = ", ".join(self.domains[:20]) or "no domain"
        if len(self.domains) > 20:
            shown += f" and {len(self.domains) - 20} more"
        log.info("Certificates for {domains} come from {ca}", domains=shown,
                 ca=self._obtainer.description)
        self._queue.begin()
        self._wakeups.start()
        self._run_check()

    def stopService(self) -> Deferred[None]:
        """Wait for running orders and the obtainer, but never longer than ``stop_timeout``."""
        super().stopService()
        self._cancel_timer()
        self._queue.halt()
        self._wakeups.stop()
        pending: list[Deferred[Any]] = [
            d for d in (self._checking, *self._inflight.values(), *self._busy) if d is not None
        ]
        stopped: Deferred[None] = Deferred()
        asked: list[bool] = []

        def fire(_: object = None) -> None:
            if not stopped.called:
                stopped.callback(None)

        def stop_obtainer(_: object = None) -> None:
            if not asked:
                asked.append(True)
                d = self._obtainer.stop()
                d.addErrback(_log_failure, "Stopping the certificate obtainer failed", "")
                d.addBoth(fire)

        def too_slow() -> None:
            self._abandon()
            stop_obtainer()
            fire()

        timer = self._clock.callLater(self._stop_timeout, too_slow)
        DeferredList([_quiet(d) for d in pending]).addCallback(stop_obtainer)

        def cancel_timer(_: None) -> None:
            if timer.active():
                timer.cancel()

        return stopped.addCallback(cancel_timer)

    def _abandon(self) -> None:
        """Give up the running orders: release their locks, ignore what they produce later."""
        if not self._held:
            log.warn("Stopping without waiting any longer for the certificate obtainer")
        for name, keeper in sorted(self._held.items()):
            log.warn(
                "{name}: stopping without waiting for the running order; it is resumed from "
                "the stored order at the next start", name=name,
            )
            keeper.abandoned = True
            keeper.stop()
            self._store.release(keeper.lock).addErrback(
                _log_failure, "{name}: cannot release the lock", name
            )
        self._held.clear()

    # -- timer ----------------------------------------------------------------------------
    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule_next(self) -> None:
        """The next full check, after the jittered interval (each domain's own renewal, retry
        and ARI times are ``Wakeups``)."""
        self._cancel_timer()
        if self.running:
            self._timer = self._clock.callLater(jittered(self._interval, self._rng),
                                                self._run_check)

    def _run_check(self) -> None:
        self._timer = None
        if self._checking is not None:
            return
        d = self.check()
        self._checking = d

        def done(result: object) -> None:
            self._checking = None
            if isinstance(result, Failure):
                log.failure("Certificate check failed", result)
            self._schedule_next()

        d.addBoth(done)

    # -- checking -------------------------------------------------------------------------
    def _settle(self, name: str) -> Deferred[None] | None:
        """Queue ``name`` if it is due, refresh its renewal information if that is due, else
        plan a wake-up for when either will be. Returns the ARI refresh, if one started."""
        st = self._state.get(name)
        if st is None or not self.running or name in self._inflight:
            return None
        now = self._now()
        if st.is_due(now):
            self._wakeups.plan(name, None)
            self._queue.add(name, st.queue_key(now))
            return None
        self._queue.discard(name)
        if st.current is not None and st.ari_check_at is not None and st.ari_check_at <= now:
            self._wakeups.plan(name, None)

            def again(result: object) -> object:  # the CA's window may say "now"
                self._settle_now(name)
                return result

            return self._refresh_ari(name).addBoth(again)
        self._wakeups.plan(name, st.wake_time())
        return None

    def _settle_now(self, name: str) -> None:
        """``_settle`` outside a check: start what may start, keep track of an ARI refresh."""
        refresh = self._settle(name)
        if refresh is not None:
            self._track(refresh, f"{name}: checking renewal information failed")
        self._queue.pump()

    def _track(self, d: Deferred[None], message: str) -> None:
        """Keep ``d`` for stopService until it fires; log its failure."""
        self._busy.add(d)

        def done(result: object) -> None:
            self._busy.discard(d)
            if isinstance(result, Failure):
                log.failure(message, result)

        d.addBoth(done)

    @inlineCallbacks
    def check(self) -> Generator[Deferred[Any], Any, None]:
        """Reload the store, serve what changed, queue what is missing or due (orders start at
        the queue's pace; this does not wait for them) and refresh due ARI windows.

        The store is read ``LOAD_BATCH`` names at a time (``load_many``: one round trip each
        for a remote store), and the reactor runs between batches, so listeners accept and
        answer while 10,000 certificates load at start (about a second of parsing); the first
        load logs its progress every ``PROGRESS_EVERY`` seconds."""
        work: list[Deferred[None]] = []
        waiting = len(self._queue)
        names = list(self.domains)
        first = not self._loaded
        self._quiet_adopt = first and len(names) > SAY_EACH_UP_TO
        started = said = self._clock.seconds()
        try:
            for i in range(0, len(names), LOAD_BATCH):
                if i:
                    yield deferLater(self._clock, 0, lambda: None)  # let the listeners work
                batch = [n for n in names[i : i + LOAD_BATCH] if n in self._state]
                found: dict[str, StoredCertificate] = yield self._store.load_many(batch)
                for name in batch:
                    if name in self._state:
                        self._apply(name, found.get(name))
                        refresh = self._settle(name)
                        if refresh is not None:
                            work.append(refresh)
                now = self._clock.seconds()
                if first and now - said >= PROGRESS_EVERY and i + LOAD_BATCH < len(names):
                    said = now
                    log.info("Loading stored certificates: {done:,} of {total:,} domains so far",
                             done=i + len(batch), total=len(names))
        finally:
            self._quiet_adopt = False
        if first:
            self._loaded = True
            self._say_loaded(len(names), self._clock.seconds() - started)
        self._queue.pump()
        if len(self._queue) > waiting:
            self._say_queue()
        yield DeferredList(work)

    def _say_loaded(self, total: int, seconds: float) -> None:
        if total <= SAY_EACH_UP_TO:
            return
        served = sum(1 for st in self._state.values() if st.current is not None)
        log.info(
            "Serving {served:,} stored certificates for {total:,} domains (loaded in "
            "{seconds:.1f} s); the others wait for an order",
            served=served, total=total, seconds=seconds,
        )

    def _say_queue(self) -> None:
        summary = self._queue.summary()
        if summary.drained_at is None:
            return
        log.info(
            "{n} domain(s) wait for a certificate order; at most {rate} orders start per hour, "
            "so the last should start around {when}",
            n=summary.length, rate=summary.max_orders_per_hour,
            when=summary.drained_at.isoformat(timespec="minutes"),
        )

    def _woken(self, names: list[str]) -> None:
        self._track(self._revisit(names), "Looking at due certificates failed")

    @inlineCallbacks
    def _revisit(self, names: list[str]) -> Generator[Deferred[Any], Any, None]:
        """Reload and settle the domains whose renewal, retry or ARI time has come."""
        work: list[Deferred[None]] = []
        for name in names:
            if name not in self._state:
                continue
            try:
                yield self._reload(name)
            except Exception as e:  # settle on what is known; the next check reloads again
                log.warn("{name}: cannot reload it from the store: {error}", name=name, error=e)
            refresh = self._settle(name)
            if refresh is not None:
                work.append(refresh)
        self._queue.pump()
        yield DeferredList(work)

    @inlineCallbacks
    def _reload(self, name: str) -> Generator[Deferred[Any], Any, None]:
        stored: StoredCertificate | None = yield self._store.load(name)
        if name in self._state:
            self._apply(name, stored)

    def _apply(self, name: str, stored: StoredCertificate | None) -> None:
        """Serve and schedule what the store holds for ``name``, if it changed."""
        if stored is None:
            return
        st = self._state[name]
        same = st.current is not None and st.current.serial_hex == stored.cert.serial_hex
        if same and stored.ari == st.ari:
            return
        if stored.cert.expired_at(self._now()) and st.current is not None:
            return
        self._adopt(name, stored.cert, stored.ari, install=not same)

    def _adopt(
        self, name: str, cert: LoadedCertificate, ari: AriWindow | None, install: bool
    ) -> None:
        st = self._state[name]
        if install:
            served = self._sni.install(cert, [name])
            if not served:
                log.warn("{name}: the stored certificate does not cover it; ordering a new one",
                         name=name)
                return
            (log.debug if self._quiet_adopt else log.info)(
                "{name}: serving certificate {serial} from {issuer}, valid until {not_after}",
                name=name, serial=cert.serial_hex, issuer=cert.issuer,
                not_after=cert.not_after.isoformat(),
            )
            st.ari_check_at = self._first_ari_check()
        st.current = cert
        st.ari = ari
        st.wanted_since = None
        if st.point is None or st.point[0] != cert.serial_hex:
            st.point = (cert.serial_hex, draw_point(self._rng))
        st.renew_at = renewal_time(cert.not_before, cert.not_after, ari, st.point[1])
        if ari is not None and ari.next_check is not None:
            st.ari_check_at = max(ari.next_check, self._now() + ARI_MIN_RECHECK)

    def _first_ari_check(self) -> datetime.datetime:
        """When to first ask the CA's renewal information for a newly served certificate:
        soon, spread at random over ``ARI_START_PACE`` seconds per managed domain (at most
        ``ARI_DEFAULT_RECHECK``), so 10,000 certificates loaded at start are not 10,000
        requests at once, ahead of the orders."""
        spread = min(ARI_START_PACE * (len(self._state) - 1),
                     ARI_DEFAULT_RECHECK.total_seconds())
        return self._now() + datetime.timedelta(seconds=self._rng.random() * max(spread, 0.0))

    @inlineCallbacks
    def _refresh_ari(self, name: str) -> Generator[Deferred[Any], Any, None]:
        st = self._state[name]
        cert = st.current
        if cert is None:
            return
        st.ari_check_at = self._now() + ARI_DEFAULT_RECHECK
        try:
            ari: AriWindow | None = yield self._obtainer.renewal_info(name, cert.fullchain_pem())
        except Exception as e:  # ARI is advisory: the lifetime rule still applies
            log.info("{name}: renewal information unavailable ({error})", name=name, error=e)
            return
        if ari is None or ari == st.ari or st.current is not cert:
            return
        self._adopt(name, cert, ari, install=False)
        yield self._store.save_ari(name, cert.serial_hex, ari)
        if st.renew_at is not None:
            log.info("{name}: the CA suggests renewing at {when}", name=name,
                     when=st.renew_at.isoformat())

    # -- ordering -------------------------------------------------------------------------
    def ensure(self, name: str) -> Deferred[None]:
        """Order a certificate for ``name`` now, outside the queue and its pace, unless an
        order for it is already running."""
        self._queue.discard(name)
        return _quiet(self._begin(name))

    def _start_queued(self, name: str) -> Deferred[bool]:
        """The queue's start: fires with whether a CA order was placed."""
        if name not in self._state or name in self._inflight or not self.running:
            return succeed(False)
        return _placed(self._begin(name))

    def _begin(self, name: str) -> Deferred[bool]:
        running = self._inflight.get(name)
        if running is None:
            running = self._order(name)
            self._inflight[name] = running

            def finished(result: bool | Failure) -> bool:
                del self._inflight[name]
                if isinstance(result, Failure):
                    log.failure("{name}: unexpected error while ordering", result, name=name)
                    if name in self._state and isinstance(result.value, Exception):
                        self._failed(name, result.value)  # back off, never loop
                    result = True
                self._settle_now(name)  # the next retry, renewal or ARI time
                return result

            running.addBoth(finished)
        return running

    @inlineCallbacks
    def _order(self, name: str) -> Generator[Deferred[Any], Any, bool]:
        """Order under the lock; returns whether the CA was asked (else the queue's slot is
        given back)."""
        st = self._state[name]
        placed = False
        try:
            lock: Lock | None = yield self._store.acquire(name, self._lock_ttl)
        except StoreUnavailable:
            # No order without the lock. The store's state change is logged once (its health);
            # try again when it may be back.
            st.orders["store_down"] = st.orders.get("store_down", 0) + 1
            st.retry_at = self._now() + self._busy_retry
            return placed
        except Exception as e:  # a read-only or full state directory: back off like any failure
            self._failed(name, e)
            return placed
        if lock is None:
            log.info("{name}: another process is ordering it; checking again later", name=name)
            st.orders["busy"] = st.orders.get("busy", 0) + 1
            st.retry_at = self._now() + self._busy_retry
            return placed
        keeper = LockKeeper(self._clock, self._store, lock, self._lock_ttl)
        self._held[name] = keeper
        try:
            yield self._reload(name)  # someone may have renewed it meanwhile
            if st.current is None or st.renew_at is None or st.renew_at <= self._now():
                placed = True
                yield self._obtain_locked(name, keeper)
            else:
                st.retry_at = None
        except Exception as e:
            if keeper.abandoned:
                pass
            elif keeper.lost is not None or isinstance(e, LockLost):
                # Paused or partitioned past the lock's expiry: another replica owns the order
                # now, and whatever this one still had in flight failed or was refused.
                log.info("{name}: stopped ordering: the order lock passed to another replica "
                         "({error})", name=name, error=e)
                st.orders["lock_lost"] = st.orders.get("lock_lost", 0) + 1
                st.retry_at = self._now() + self._busy_retry
            else:
                self._failed(name, e)
        keeper.stop()
        if keeper.abandoned:  # stopService released the lock already
            return placed
        del self._held[name]
        # Not in a ``finally``: a generator abandoned at shutdown must not yield again.
        try:
            yield self._store.release(keeper.lock)
        except Exception as e:  # it expires by itself
            log.warn("{name}: cannot release the order lock ({error}); it expires by itself",
                     name=name, error=e)
        return placed

    @inlineCallbacks
    def _obtain_locked(
        self, name: str, keeper: LockKeeper
    ) -> Generator[Deferred[Any], Any, None]:
        st = self._state[name]
        pending: PendingOrder | None = yield self._store.load_order(name)
        key: PrivateKey | None = None
        if pending is not None:
            key = _load_key(pending.key_pem)
            if key is None:
                pending = None
        if key is None:
            key = self._key_generator()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        request = ObtainRequest(
            name=name,
            key=key,
            save_order=lambda order: self._store.save_order(keeper.lock, order),
            replaces=st.current.fullchain_pem() if st.current is not None else None,
            resume=pending,
        )
        fullchain: bytes = yield self._obtainer.obtain(request)
        if keeper.abandoned:
            log.info("{name}: an order abandoned at shutdown finished; its result is ignored",
                     name=name)
            return
        try:
            cert = parse_pem(fullchain, key_pem, f"{self._obtainer.description} for {name}")
        except ConfigError as e:
            raise ObtainFailed(f"{name}: the CA sent an unusable certificate: {e}") from None
        if not cert.covers(name):
            raise ObtainFailed(f"{name}: the CA sent a certificate for {', '.join(cert.names)}")
        yield self._store.save(keeper.lock, StoredCertificate(cert))
        st.failures = 0
        st.last_error = st.last_error_at = None
        st.orders["issued"] = st.orders.get("issued", 0) + 1
        st.retry_at = None
        self._adopt(name, cert, None, install=True)

    def _failed(self, name: str, error: Exception) -> None:
        st = self._state[name]
        now = self._now()
        if isinstance(error, LockLost):
            message = f"{name}: lost the order lock ({error}); another process took over"
            retry_after = None
        elif isinstance(error, ObtainFailed):
            message, retry_after = error.message, error.retry_after
        elif isinstance(error, StoreUnavailable):
            message = f"{name}: the order stopped: {error}"
            retry_after = None
        elif isinstance(error, OSError):
            where = f" ({error.filename})" if error.filename else ""
            message = (
                f"{name}: the state directory is unusable: {error.strerror or error}{where}; "
                "check that it is writable and has free space"
            )
            retry_after = None
        else:
            message, retry_after = f"{name}: {type(error).__name__}: {error}", None
        st.failures += 1
        st.last_error, st.last_error_at = message, now
        limited = isinstance(error, ObtainFailed) and (error.problem_type or "").endswith(
            "rateLimited"
        )
        outcome = "rate_limited" if limited else "failed"
        st.orders[outcome] = st.orders.get(outcome, 0) + 1
        st.retry_at = retry_at = next_attempt(
            st.failures, now, self._rng, retry_after, self._backoff_base
        )
        if limited:  # the account (or the CA) is limited, not only this name: every order waits
            self._queue.pause((retry_after or retry_at).timestamp(), message)
        log.error(
            "{problem} (failure {n}; next attempt at {when}{serving})",
            problem=message, n=st.failures, when=st.retry_at.isoformat(timespec="seconds"),
            serving="; the current certificate stays in use" if st.current else "",
        )
        self._store.record_error(name, message, now).addErrback(
            _record_failed, name, already_said=isinstance(error, OSError)
        )
        self._maybe_panic(name, message, now)

    def _maybe_panic(self, name: str, message: str, now: datetime.datetime) -> None:
        st = self._state[name]
        if st.current is not None and st.current.not_after - now > PANIC_WINDOW:
            return
        if st.last_panic is not None and now - st.last_panic < PANIC_REPEAT:
            return
        st.last_panic = now
        left = (
            "no certificate at all" if st.current is None
            else f"the certificate expires at {st.current.not_after.isoformat()}"
        )
        log.critical(
            "{name}: {left} and renewal keeps failing: {problem}",
            name=name, left=left, problem=message,
        )
        if self._panic is not None:
            try:
                self._panic(name, f"{left}; {message}")
            except Exception:
                log.failure("{name}: the panic callback failed", name=name)


def _load_key(pem: bytes) -> PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, PrivateKey) else None


def _record_failed(failure: Failure, name: str, already_said: bool) -> None:
    """Storing the last error failed: one line, none when the error was the store itself."""
    if not already_said:
        log.warn("{name}: cannot record the error in the state directory: {error}",
                 name=name, error=failure.getErrorMessage())


def _log_failure(failure: Failure, message: str, name: str) -> None:
    log.failure(message, failure, name=name)


def _placed(d: Deferred[bool]) -> Deferred[bool]:
    """A new Deferred that fires with ``d``'s result (leaving ``d``'s chain alone)."""
    waiter: Deferred[bool] = Deferred()

    def fire(result: object) -> object:
        waiter.callback(result if isinstance(result, bool) else True)
        return result

    d.addBoth(fire)
    return waiter


def _quiet(d: Deferred[Any]) -> Deferred[None]:
    """A new Deferred that fires with None when ``d`` fires (leaving ``d``'s chain alone)."""
    waiter: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter

