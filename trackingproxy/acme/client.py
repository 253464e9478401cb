"""The ACME obtainer: certbot's ``acme.client.ClientV2`` driven from the reactor.

Every blocking ACME call runs in ONE dedicated thread (``ClientNetwork`` is not thread-safe,
and its one-second poll sleeps must stay out of the reactor's default pool); the Deferred
chain that sequences the steps, the store and the challenge responder stay on the reactor
thread. Each step is retried a few times on ``badNonce`` before the attempt fails.
The thread is a daemon: a call abandoned at shutdown never keeps the process alive.
The account itself is ``trackingproxy.acme.account.AccountManager``'s business.
"""

from __future__ import annotations

import base64
import datetime
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
from josepy.json_util import field as jose_field
from josepy.jwa import ES256, RS256
from josepy.jwk import JWK, JWKEC
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from trackingproxy.acme.account import Account, AccountManager
from trackingproxy.acme.obtainer import ObtainFailed, ObtainRequest
from trackingproxy.acme.problems import explain, problem_code
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.schedule import parse_retry_after
from trackingproxy.store.contract import (
    AriWindow,
    CertificateStore,
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
        self._verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._profile = profile
        self._nonce_retries = nonce_retries
        self._poll_timeout = poll_timeout
        self._network_timeout = network_timeout
        self._user_agent = user_agent
        self._pool = _DaemonThreadPool(minthreads=1, maxthreads=1, name="trackingproxy-acme")
        self.accounts = AccountManager(
            clock=clock, store=store, directory_url=directory_url,
            call=lambda f, *args: self._call(f, *args), make_network=self._network,
            email=email, eab=(eab_kid, eab_hmac_key) if eab_kid and eab_hmac_key else None,
            lock_ttl=account_lock_ttl, lock_poll=account_lock_poll,
        )
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
    def _network(self, key: JWK) -> acme_client.ClientNetwork:
        alg = ES256 if isinstance(key, JWKEC) else RS256
        return _Network(key=key, alg=alg, verify_ssl=cast(bool, self._verify),
                        user_agent=self._user_agent, timeout=self._network_timeout)

    def _warn_profile_once(self, client: acme_client.ClientV2) -> None:
        profiles = _profiles(client.directory)
        if self._profile and self._profile not in profiles and not self._profile_warned:
            self._profile_warned = True
            log.warn(
                "ACME directory {url} does not offer profile {profile!r} (it offers: {offered}); "
                "ordering without a profile",
                url=self.directory_url, profile=self._profile,
                offered=", ".join(profiles) or "none",
            )

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
                yield self.accounts.forget()
            raise error from e
        return fullchain

    @inlineCallbacks
    def _obtain(self, request: ObtainRequest) -> Generator[Deferred[Any], Any, bytes]:
        account: Account = yield self.accounts.get()
        client = account.client
        self._warn_profile_once(client)
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
            yield self._solve(client, account.key, request.name, orderr)
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
        self, client: acme_client.ClientV2, key: JWK, name: str, orderr: messages.OrderResource
    ) -> Generator[Deferred[Any], Any, None]:
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
                published.append(token)
                # Written everywhere it must be (the shared store) before the CA is told.
                yield self._responder.add(name, token, validation.encode("ascii"))
                if challb.status == messages.STATUS_PENDING:
                    answers.append((challb, response))
                # else: a resumed order whose challenge was already answered (by a replica
                # that died or paused): the CA is validating it; answering again is refused.
            if published and self._responder.propagation_delay:
                yield deferLater(self._clock, self._responder.propagation_delay)
            for challb, response in answers:
                yield self._call(client.answer_challenge, challb, response)
            yield self._call(client.poll_authorizations, orderr, self._deadline())
        finally:
            for token in published:  # not waited for: a closed generator must not yield
                self._responder.remove(name, token).addErrback(_withdraw_failed, name, token)

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
        d = self.accounts.get()
        return d.addCallback(lambda account: self._call(self._fetch_ari, account.client,
                                                        fullchain_pem))

    def _fetch_ari(self, client: acme_client.ClientV2, fullchain_pem: bytes) -> AriWindow | None:
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


def _withdraw_failed(failure: Failure, name: str, token: str) -> None:
    """The answer stays in the shared store until its time to live ends; harmless."""
    log.info("{name}: cannot withdraw challenge {token}: {error}", name=name, token=token,
             error=failure.getErrorMessage())
