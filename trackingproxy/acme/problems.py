"""Turning ACME failures into one log line: the problem document and the likely fix."""

from __future__ import annotations

import datetime

import requests
from acme import errors as acme_errors
from acme import messages

from trackingproxy.acme.obtainer import ObtainFailed
from trackingproxy.acme.schedule import parse_retry_after

__all__ = ["RegistrationFailed", "describe_problem", "explain", "problem_code"]

_PREFIX = "urn:ietf:params:acme:error:"


class RegistrationFailed(Exception):
    """The CA refused to register the account (``eab``: External Account Binding was sent)."""

    def __init__(self, error: messages.Error, eab: bool) -> None:
        super().__init__(f"account registration refused: {describe_problem(error)}")
        self.error = error
        self.eab = eab


def problem_code(error: messages.Error) -> str:
    """The short ACME error code (``badNonce``), or the full type for unknown types."""
    typ = str(error.typ)
    return typ[len(_PREFIX) :] if typ.startswith(_PREFIX) else typ


def describe_problem(error: messages.Error) -> str:
    """``type: detail [identifier: type: detail; ...]`` on one line."""
    text = f"{problem_code(error)}: {error.detail or error.title or error.description or ''}"
    if error.identifier is not None:
        text = f"{error.identifier.value}: {text}"
    subs = [describe_problem(sub) for sub in (error.subproblems or ())]
    if subs:
        text += " [" + "; ".join(subs) + "]"
    return " ".join(text.split())


_VALIDATION = ("connection", "dns", "unknownHost", "incorrectResponse", "unauthorized", "tls")


def _fix(code: str, name: str) -> str:
    if code in _VALIDATION:
        return (
            f"make sure DNS for {name} points to this host and that port 80 reaches "
            "trackingproxy (no redirect to HTTPS in front of it)"
        )
    if code == "caa":
        return f"a CAA record of {name} forbids this CA; add one that allows it"
    if code == "rateLimited":
        return "the CA rate-limits this account or domain; waiting as it asked"
    if code == "externalAccountRequired":
        return "this CA needs External Account Binding: pass --eab-kid and --eab-hmac-key"
    if code in ("rejectedIdentifier", "unsupportedIdentifier"):
        return f"the CA will not issue for {name}; check the name or use another CA"
    if code == "badNonce":
        return "the CA kept rejecting nonces; retrying later"
    if code in ("invalidContact", "unsupportedContact", "invalidEmail"):
        return "the CA refused --email; pass a valid address"
    if code == "accountDoesNotExist":
        return "the CA no longer knows the stored account; it will be registered again"
    if code == "serverInternal":
        return "the CA had an internal error; retrying later"
    return "retrying later"


def explain(
    failure: BaseException, name: str, directory_url: str, now: datetime.datetime
) -> ObtainFailed:
    """An ``ObtainFailed`` whose message names the problem and the likely fix."""
    if isinstance(failure, ObtainFailed):
        return failure
    if isinstance(failure, RegistrationFailed):
        code = problem_code(failure.error)
        if code == "externalAccountRequired":
            fix = _fix(code, name)
        elif failure.eab and code in ("unauthorized", "malformed", "badSignatureAlgorithm"):
            fix = (
                "the CA refused the External Account Binding: check --eab-kid and "
                "--eab-hmac-key (copy both from your CA's account page)"
            )
        else:
            fix = _fix(code, name) if code not in _VALIDATION else "retrying later"
        return ObtainFailed(
            f"{name}: registering an ACME account at {directory_url} failed: "
            f"{describe_problem(failure.error)}; {fix}",
            retry_after=parse_retry_after(getattr(failure.error, "retry_after_header", None), now),
            problem_type=code,
        )
    if isinstance(failure, messages.Error):
        code = problem_code(failure)
        retry_after = parse_retry_after(getattr(failure, "retry_after_header", None), now)
        return ObtainFailed(
            f"{name}: ACME error {describe_problem(failure)}; {_fix(code, name)}",
            retry_after=retry_after,
            problem_type=code,
        )
    if isinstance(failure, acme_errors.ValidationError):
        parts: list[str] = []
        code = "unauthorized"
        for authzr in failure.failed_authzrs:
            for chall in authzr.body.challenges:
                if chall.error is not None:
                    code = problem_code(chall.error)
                    parts.append(describe_problem(chall.error))
        return ObtainFailed(
            f"{name}: validation failed: {'; '.join(parts) or 'no detail'}; {_fix(code, name)}",
            problem_type=code,
        )
    if isinstance(failure, acme_errors.TimeoutError):
        return ObtainFailed(
            f"{name}: the CA did not finish the order in time; retrying later",
            problem_type="timeout",
        )
    if isinstance(failure, acme_errors.ClientError):
        response = failure.args[0] if failure.args else None
        if isinstance(response, tuple) and response:
            response = response[0]
        if isinstance(response, requests.Response):
            return ObtainFailed(
                f"{name}: the ACME server {directory_url} answered HTTP "
                f"{' '.join(filter(None, [str(response.status_code), response.reason]))} to "
                f"{response.request.method} {response.url} without an ACME problem document; "
                "retrying later",
                retry_after=parse_retry_after(response.headers.get("Retry-After"), now),
                problem_type=f"http-{response.status_code}",
            )
    if isinstance(failure, requests.exceptions.Timeout):
        return ObtainFailed(
            f"{name}: the ACME server {directory_url} did not answer in time "
            f"({type(failure).__name__}: {failure}); retrying later",
            problem_type="timeout",
        )
    if isinstance(failure, requests.exceptions.SSLError):
        return ObtainFailed(
            f"{name}: TLS to the ACME server {directory_url} failed ({failure}); for a private "
            "CA pass its root with --acme-ca-bundle",
            problem_type="tls-to-ca",
        )
    if isinstance(failure, requests.exceptions.RequestException):
        return ObtainFailed(
            f"{name}: cannot reach the ACME server {directory_url} "
            f"({type(failure).__name__}: {failure}); check the network, proxy settings and "
            "--acme-directory",
            problem_type="network",
        )
    return ObtainFailed(
        f"{name}: {type(failure).__name__}: {failure}; retrying later", problem_type="internal"
    )
