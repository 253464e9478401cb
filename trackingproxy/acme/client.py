"""The ACME obtainer: certbot's ``acme.client.ClientV2`` driven from the reactor.

Every blocking ACME call runs in ONE dedicated thread (``ClientNetwork`` is not thread-safe,
and its one-second poll sleeps must stay out of the reactor's default pool); the Deferred
chain that sequences the steps, the store and the challenge responder stay on the reactor
thread. Each step is retried a few times on ``badNonce`` before the attempt fails.
The thread is a daemon: a call abandoned at shutdown never keeps the process alive.
The account is loaded or registered under the store lock ``account-<hash>``, so processes
sharing the state directory and starting together register one account, not one each.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import math
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar, cast

import requests
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.json_util import field as jose_field
from josepy.jwa import ES256, RS256
from josepy.jwk import JWK, JWKEC
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from trackingproxy.acme.obtainer import ObtainFailed, ObtainRequest
from trackingproxy.acme.problems import RegistrationFailed, explain, problem_code
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.schedule import parse_retry_after
from trackingproxy.acme.store import (
    AccountRecord,
    AriWindow,
    CertificateStore,
    Lock,
    PendingOrder,
)

__all__ = ["AcmeObtainer", "ari_cert_id"]

log = Logger()
_T = TypeVar("_T")


class _DaemonThread(threading.Thread):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class _DaemonThreadPool(ThreadPool):
    threadFactory = _DaemonThread


class NewOrderWithReplaces(messages.NewOrder):
    """``newOrder`` with the ARI ``replaces`` field (RFC 9773), which ``acme`` lacks."""

    replaces: str | None = jose_field("replaces", omitempty=True)


class _Network(acme_client.ClientNetwork):
    """Keeps the ``Retry-After`` header of error responses on the raised problem."""

    @classmethod
    def _check_response(
        cls, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        try:
            return super()._check_response(response, content_type=content_type)
        except messages.Error as e:
            e.retry_after_header = response.headers.get("Retry-After")
            raise


def _profiles(directory: messages.Directory) -> dict[str, str]:
    """The profiles a directory advertises (its ``meta`` is optional)."""
    try:
        meta = directory.meta
    except AttributeError:
        return {}
    return getattr(meta, "profiles", None) or {}


def ari_cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    serial = cert.serial_number
    serial_bytes = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big", signed=True)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")

    return f"{b64(aki.key_identifier or b'')}.{b64(serial_bytes)}"


class AcmeObtainer:
    """An ``Obtainer`` talking ACME v2 to ``directory_url`` with HTTP-01 challenges."""

    def __init__(
        self,
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        directory_url: str,
        store: CertificateStore,
        responder: HTTP01Responder,
        email: str | None = None,
        ca_bundle: Path | None = None,
        eab_kid: str | None = None,
        eab_hmac_key: str | None = None,
        profile: str | None = None,
        nonce_retries: int = 5,
        poll_timeout: float = 90.0,
        network_timeout: int = 30,
        user_agent: str = "trackingproxy",
        account_lock_ttl: float = 300.0,
        account_lock_poll: float = 1.0,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.directory_url = directory_url
        self._store = store
        self._responder = responder
        self._email = email
        self._verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._eab = (eab_kid, eab_hmac_key) if eab_kid and eab_hmac_key else None
        self._profile = profile
        self._nonce_retries = nonce_retries
        self._poll_timeout = poll_timeout
        self._network_timeout = network_timeout
        self._user_agent = user_agent
        self._account_lock_ttl = account_lock_ttl
        self._account_lock_poll = account_lock_poll
        self._pool = _DaemonThreadPool(minthreads=1, maxthreads=1, name="trackingproxy-acme")
        self._client: acme_client.ClientV2 | None = None
        self._account_key: JWK | None = None
        self._account_waiters: list[Deferred[None]] = []
        self._profile_warned = False

    @property
    def description(self) -> str:
        return f"ACME directory {self.directory_url}"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._pool.start()

    def stop(self) -> Deferred[None]:
        """Stop the ACME thread once its current call returns (without blocking the reactor)."""
        done: Deferred[None] = Deferred()

        def join() -> None:
            self._pool.stop()
            self._reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name="trackingproxy-acme-stop", daemon=True).start()
        return done

    # -- thread plumbing --------------------------------------------------------------------
    def _call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run ``f(*args)`` in the ACME thread, retrying it on ``badNonce``."""

        def retrying() -> _T:
            for attempt in range(self._nonce_retries):
                try:
                    return f(*args)
                except messages.Error as e:
                    if problem_code(e) != "badNonce" or attempt == self._nonce_retries - 1:
                        raise
            raise AssertionError("unreachable")

        return deferToThreadPool(self._reactor, self._pool, retrying)

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def _deadline(self) -> datetime.datetime:
        # acme compares its polling deadlines with naive datetime.now(): give it a naive one.
        return datetime.datetime.now() + datetime.timedelta(seconds=self._poll_timeout)

    # -- account --------------------------------------------------------------------------
    def _ensure_account(self) -> Deferred[None]:
        """Load or register the account once; concurrent callers wait for the same set-up."""
        if self._client is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._account_waiters.append(waiter)
        if len(self._account_waiters) == 1:
            self._setup_account().addBoth(self._account_ready)
        return waiter

    def _account_ready(self, result: object) -> None:
        waiters, self._account_waiters = self._account_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    @property
    def account_lock_name(self) -> str:
        """The store lock held while loading or registering the account of this directory."""
        return "account-" + hashlib.sha256(self.directory_url.encode("utf-8")).hexdigest()[:16]

    @inlineCallbacks
    def _setup_account(self) -> Generator[Deferred[Any], Any, None]:
        url = self.directory_url
        record: AccountRecord | None = yield self._store.load_account(url)
        if record is not None and record.registration_json is not None:
            yield self._use_account(record)
            return
        # Load or register under a lock: another process may be registering right now.
        lock: Lock | None = yield self._store.acquire(self.account_lock_name,
                                                      self._account_lock_ttl)
        while lock is None:
            yield deferLater(self._clock, self._account_lock_poll)
            record = yield self._store.load_account(url)
            if record is not None and record.registration_json is not None:
                yield self._use_account(record)
                return
            lock = yield self._store.acquire(self.account_lock_name, self._account_lock_ttl)
        try:
            record = yield self._store.load_account(url)
            if record is None:
                new_key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
                record = AccountRecord(key_json=new_key.json_dumps())
                # The key is stored before registering: a crash never leads to a second account.
                yield self._store.save_account(url, record)
            yield self._use_account(record)
        except BaseException:
            self._store.release(lock).addErrback(
                lambda f: log.failure("Cannot release the account lock", f)
            )
            raise
        yield self._store.release(lock)

    @inlineCallbacks
    def _use_account(self, record: AccountRecord) -> Generator[Deferred[Any], Any, None]:
        """Build the client for ``record``, registering it first when it has no registration."""
        url = self.directory_url
        key = JWK.json_loads(record.key_json)
        alg = ES256 if isinstance(key, JWKEC) else RS256
        net = _Network(key=key, alg=alg, verify_ssl=cast(bool, self._verify),
                       user_agent=self._user_agent, timeout=self._network_timeout)
        directory = yield self._call(acme_client.ClientV2.get_directory, url, net)
        client = acme_client.ClientV2(directory, net)
        if record.registration_json is not None:
            net.account = messages.RegistrationResource.json_loads(record.registration_json)
        else:
            try:
                regr = yield self._call(self._register, client, key)
            except messages.Error as e:
                raise RegistrationFailed(e, eab=self._eab is not None) from e
            # The CA echoes the EAB JWS in the account object; it is not ours to keep (and
            # acme cannot serialize it back).
            regr = regr.update(body=regr.body.update(external_account_binding=None))
            net.account = regr
            yield self._store.save_account(
                url, AccountRecord(key_json=record.key_json, registration_json=regr.json_dumps())
            )
            log.info("Registered ACME account {uri} at {url}", uri=regr.uri, url=url)
        profiles = _profiles(directory)
        if self._profile and self._profile not in profiles and not self._profile_warned:
            self._profile_warned = True
            log.warn(
                "ACME directory {url} does not offer profile {profile!r} (it offers: {offered}); "
                "ordering without a profile",
                url=url, profile=self._profile, offered=", ".join(profiles) or "none",
            )
        self._account_key = key
        self._client = client

    def _register(
        self, client: acme_client.ClientV2, key: JWK
    ) -> messages.RegistrationResource:
        eab = None
        if self._eab is not None:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(), kid=self._eab[0], hmac_key=self._eab[1],
                directory=client.directory,
            )
        reg = messages.NewRegistration.from_data(
            email=self._email, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            return client.new_account(reg)
        except acme_errors.ConflictError as e:  # the key already has an account: reuse it
            existing = messages.RegistrationResource(body=messages.Registration(), uri=e.location)
            return client.query_registration(existing)

    @inlineCallbacks
    def _forget_registration(self) -> Generator[Deferred[Any], Any, None]:
        record: AccountRecord | None = yield self._store.load_account(self.directory_url)
        if record is not None:
            yield self._store.save_account(self.directory_url, AccountRecord(record.key_json))
        self._client = None

    # -- obtaining --------------------------------------------------------------------------
    def obtain(self, request: ObtainRequest) -> Deferred[bytes]:
        return self._obtain_explained(request)

    @inlineCallbacks
    def _obtain_explained(self, request: ObtainRequest) -> Generator[Deferred[Any], Any, bytes]:
        try:
            fullchain: bytes = yield self._obtain(request)
        except Exception as e:
            error = explain(e, request.name, self.directory_url, self._now())
            if error.problem_type == "accountDoesNotExist":
                yield self._forget_registration()
            raise error from e
        return fullchain

    @inlineCallbacks
    def _obtain(self, request: ObtainRequest) -> Generator[Deferred[Any], Any, bytes]:
        yield self._ensure_account()
        client = self._client
        assert client is not None
        key_pem = request.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr_pem = crypto_util.make_csr(key_pem, [request.name])
        orderr: messages.OrderResource | None = None
        resume = request.resume
        if resume is not None and resume.directory_url == self.directory_url:
            orderr = yield self._call(self._fetch_order, client, resume.order_url, csr_pem)
            if orderr is not None:
                log.info("{name}: resuming ACME order {url} ({status})", name=request.name,
                         url=resume.order_url, status=orderr.body.status.name)
        if orderr is None:
            replaces = None
            if request.replaces is not None and "renewalInfo" in client.directory.to_partial_json():
                replaces = ari_cert_id(x509.load_pem_x509_certificate(request.replaces))
            orderr = yield self._call(self._new_order, client, csr_pem, replaces)
            yield request.save_order(PendingOrder(orderr.uri, key_pem, self.directory_url))
        if orderr.body.status == messages.STATUS_PENDING:
            yield self._solve(client, request.name, orderr)
        orderr = yield self._call(self._finalize, client, orderr)
        return cast(str, orderr.fullchain_pem).encode("ascii")

    def _profile_to_use(self, client: acme_client.ClientV2) -> str | None:
        profiles = _profiles(client.directory)
        return self._profile if self._profile and self._profile in profiles else None

    def _new_order(
        self, client: acme_client.ClientV2, csr_pem: bytes, replaces: str | None
    ) -> messages.OrderResource:
        csr = x509.load_pem_x509_csr(csr_pem)
        names, _ = crypto_util.get_identifiers_from_x509(csr.subject, csr.extensions)
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names]
        order = NewOrderWithReplaces(
            identifiers=identifiers, profile=self._profile_to_use(client), replaces=replaces
        )
        try:
            response = client._post(client.directory["newOrder"], order)
        except (messages.Error, acme_errors.ConflictError) as e:
            # acme turns every 409 (alreadyReplaced, RFC 9773) into a bare ConflictError.
            code = problem_code(e) if isinstance(e, messages.Error) else "conflict"
            if replaces is None or code in ("badNonce", "rateLimited"):
                raise
            log.info("{names}: the CA refused to replace {cert_id} ({code}); ordering without "
                     "'replaces'", names=", ".join(names), cert_id=replaces, code=code)
            # The CA says the certificate was already replaced or is not ours: order plainly.
            return self._new_order(client, csr_pem, None)
        body = messages.Order.from_json(response.json())
        authzs = [
            client._authzr_from_response(client._post_as_get(url), uri=url)
            for url in body.authorizations
        ]
        return messages.OrderResource(
            body=body, uri=response.headers.get("Location"), authorizations=authzs,
            csr_pem=csr_pem,
        )

    def _fetch_order(
        self, client: acme_client.ClientV2, url: str, csr_pem: bytes
    ) -> messages.OrderResource | None:
        """The stored order, if it can still lead to a certificate; else None."""
        try:
            body = messages.Order.from_json(client._post_as_get(url).json())
        except messages.Error:
            return None
        if body.status not in (messages.STATUS_PENDING, messages.STATUS_READY,
                               messages.STATUS_PROCESSING, messages.STATUS_VALID):
            return None
        authzs = [
            client._authzr_from_response(client._post_as_get(u), uri=u)
            for u in body.authorizations
        ]
        return messages.OrderResource(body=body, uri=url, authorizations=authzs, csr_pem=csr_pem)

    @inlineCallbacks
    def _solve(
        self, client: acme_client.ClientV2, name: str, orderr: messages.OrderResource
    ) -> Generator[Deferred[Any], Any, None]:
        key = self._account_key
        assert key is not None
        answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
        published: list[str] = []
        try:
            for authzr in orderr.authorizations:
                if authzr.body.status != messages.STATUS_PENDING:
                    continue
                challb = next(
                    (c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                    None,
                )
                if challb is None:
                    raise ObtainFailed(
                        f"{name}: the CA offers no http-01 challenge; it cannot be validated "
                        "over port 80", problem_type="no-http-01",
                    )
                response, validation = challb.response_and_validation(key)
                token = challb.chall.encode("token")
                self._responder.add(name, token, validation.encode("ascii"))
                published.append(token)
                answers.append((challb, response))
            if published and self._responder.propagation_delay:
                yield deferLater(self._clock, self._responder.propagation_delay)
            for challb, response in answers:
                yield self._call(client.answer_challenge, challb, response)
            yield self._call(client.poll_authorizations, orderr, self._deadline())
        finally:
            for token in published:
                self._responder.remove(name, token)

    def _finalize(
        self, client: acme_client.ClientV2, orderr: messages.OrderResource
    ) -> messages.OrderResource:
        body = messages.Order.from_json(client._post_as_get(orderr.uri).json())
        if body.status == messages.STATUS_VALID and body.certificate is not None:
            cert = client._post_as_get(body.certificate)
            return cast(messages.OrderResource, orderr.update(body=body, fullchain_pem=cert.text))
        if body.status == messages.STATUS_PROCESSING:
            done = client.poll_finalization(orderr, self._deadline())
        else:
            done = client.finalize_order(orderr, self._deadline())
        return done

    # -- renewal information --------------------------------------------------------------
    def renewal_info(self, name: str, fullchain_pem: bytes) -> Deferred[AriWindow | None]:
        d = self._ensure_account()
        return d.addCallback(lambda _: self._call(self._fetch_ari, fullchain_pem))

    def _fetch_ari(self, fullchain_pem: bytes) -> AriWindow | None:
        client = self._client
        assert client is not None
        base = client.directory.to_partial_json().get("renewalInfo")
        if not base:
            return None
        cert = x509.load_pem_x509_certificate(fullchain_pem)
        response = client.net.get(f"{base.rstrip('/')}/{ari_cert_id(cert)}")
        info = messages.RenewalInfo.from_json(response.json())
        now = datetime.datetime.now(datetime.UTC)
        return AriWindow(
            start=info.suggested_window.start.astimezone(datetime.UTC),
            end=info.suggested_window.end.astimezone(datetime.UTC),
            next_check=parse_retry_after(response.headers.get("Retry-After"), now),
        )

