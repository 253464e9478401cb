"""Path traversal and odd encodings on ``/.well-known/`` files and the ACME challenge path.

The real service tree (``build_service`` on a memory reactor, requests as raw bytes through the
production parser) with a ``--well-known-dir`` that has a secret file next to it and a symlink
pointing out of it. For every hostile target: only a file that is in the directory, under
exactly its own path, is ever served; the secret never is; a request under the challenge path
is answered locally and never reaches the upstream; a valid token is answered only under its
exact path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hostile.memory import MemoryProxy, build_memory_proxy
from trackingproxy.errors import ConfigError
from trackingproxy.proxy.wellknown import load_well_known

DOMAIN = "click.example.com"
SECRET = b"TOP-SECRET-do-not-serve"
TOKEN = "tok_VALID-token-1234567"
ANSWER = b"tok_VALID-token-1234567.key-authorization-thumbprint"
FILES = {
    "apple-app-site-association": b'{"applinks": {"apps": []}}',
    "assetlinks.json": b'[{"relation": ["delegate_permission/common.handle_all_urls"]}]',
    "sub/file.txt": b"a file in a subdirectory",
}

TRAVERSAL = [
    "/.well-known/../secret.txt",
    "/.well-known/../../secret.txt",
    "/.well-known/%2e%2e/secret.txt",
    "/.well-known/%2E%2E/secret.txt",
    "/.well-known/.%2e/secret.txt",
    "/.well-known/..%2fsecret.txt",
    "/.well-known/..%2Fsecret.txt",
    "/.well-known/%2e%2e%2fsecret.txt",
    "/.well-known/..%5csecret.txt",
    "/.well-known/..\\secret.txt",
    "/.well-known\\..\\secret.txt",
    "/.well-known/%c0%ae%c0%ae/secret.txt",
    "/.well-known/%c0%ae%c0%ae%c0%afsecret.txt",
    "/.well-known/%e0%80%ae%e0%80%ae/secret.txt",
    "/.well-known/%25c0%25ae%25c0%25ae/secret.txt",
    "/.well-known/..%c0%afsecret.txt",
    "/.well-known/..%u2216secret.txt",
    "/.well-known/sub/../../secret.txt",
    "/.well-known//../secret.txt",
    "/.well-known/secret.txt",
    "/.well-known/outside",  # the symlink pointing out of the directory
    "/.well-known/.hidden",
    "/.well-known/%2ehidden",
    "/.well-known/assetlinks.json%00",
    "/.well-known/assetlinks.json%00.txt",
    "/.well-known/assetlinks.json/",
    "/.well-known/assetlinks.json;.txt",
    "/.well-known/ASSETLINKS.JSON",
    "/.well-known/assetlinks%2ejson",
    "/.well-known/./assetlinks.json",
    "/.well-known//assetlinks.json",
    "//.well-known/assetlinks.json",
    "/%2ewell-known/assetlinks.json",
    "/.well-known/sub/../assetlinks.json",
    "/.well-known/sub%2ffile.txt",
    "/.well-known/sub\\file.txt",
    "/.well-known/",
    "/.well-known",
    "/.well-known/%00",
    "/.well-known/\x00",
    "/.well-known/\xc0\xae\xc0\xae/secret.txt",
    "/.well-known/..;/secret.txt",
    "/.well-known/%252e%252e/secret.txt",
    "/.well-known/" + "../" * 50 + "etc/passwd",
    "/.well-known/" + "%2e%2e/" * 50 + "etc/passwd",
    "/.well-known/" + "a" * 4000,
]
EXACT = {"/.well-known/" + name: body for name, body in FILES.items()}
EXACT_WITH_QUERY = {path + "?x=1": body for path, body in EXACT.items()}

C = "/.well-known/acme-challenge/"
CHALLENGE = [
    C + TOKEN + "/",
    C + TOKEN + "%00",
    C + TOKEN + "\\",
    C + TOKEN + "/..",
    C + TOKEN + ".",
    C + TOKEN + ";x",
    C + "../acme-challenge/" + TOKEN,
    C + "%2e%2e/acme-challenge/" + TOKEN,
    C + "..%2f..%2fsecret.txt",
    C + "../../secret.txt",
    C + "%c0%ae%c0%ae/secret.txt",
    C + "..\\..\\secret.txt",
    C + "/" + TOKEN,
    C + "%74ok_VALID-token-1234567",
    C + TOKEN.upper(),
    C + "",
    C + "a" * 300,
    C + "unknown-token-12345678",
    C + TOKEN + "/../" + TOKEN,
    C + "\x00",
]
# Targets that are not under the challenge prefix byte for byte, but that a normalising server
# (merge slashes, resolve dot segments, decode %2e) would read as a challenge request.
CHALLENGE_EQUIVALENTS = [
    "//.well-known/acme-challenge/" + TOKEN,
    "/.well-known//acme-challenge/" + TOKEN,
    "/.well-known/./acme-challenge/" + TOKEN,
    "/.well-known/x/../acme-challenge/" + TOKEN,
    "/%2ewell-known/acme-challenge/" + TOKEN,
    "/.well-known/acme%2dchallenge/" + TOKEN,
    "/.well-known%2facme-challenge/" + TOKEN,
]


class _Responder:
    """A challenge responder with one pending token for DOMAIN; records every lookup."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def key_authorization(self, host: str, token: str) -> bytes | None:
        self.asked.append((host, token))
        return ANSWER if (host, token) == (DOMAIN, TOKEN) else None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemoryProxy, _Responder]:
    tmp: Path = tmp_path_factory.mktemp("paths")
    root = tmp / "site"
    wk = root / "well-known"
    (wk / "sub").mkdir(parents=True)
    for name, body in FILES.items():
        (wk / name).write_bytes(body)
    (wk / ".hidden").write_bytes(SECRET)
    (root / "secret.txt").write_bytes(SECRET)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_bytes(SECRET)
    responder = _Responder()
    proxy = build_memory_proxy(
        tmp, [(DOMAIN,)], [DOMAIN], "--well-known-dir", str(wk), challenges=responder
    )
    return proxy, responder


def _get(proxy: MemoryProxy, target: str, method: str = "GET") -> tuple[bytes, bytes, int]:
    """(status, body, requests forwarded upstream) for one request over plain HTTP."""
    before = len(proxy.upstream.seen)
    raw = f"{method} {target} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
    answer = proxy.http_exchange(raw.encode("latin-1"))
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head[9:12]
    return status, body, len(proxy.upstream.seen) - before


def test_intended_files_are_served(site: tuple[MemoryProxy, _Responder]) -> None:
    """Each file of the directory is served under its own path (and with a query string)."""
    proxy, _ = site
    for target, body in {**EXACT, **EXACT_WITH_QUERY}.items():
        status, got, forwarded = _get(proxy, target)
        assert (status, got, forwarded) == (b"200", body, 0), target


@pytest.mark.parametrize("target", TRAVERSAL)
def test_traversal_never_serves_anything_but_the_intended_file(
    site: tuple[MemoryProxy, _Responder], target: str
) -> None:
    """A hostile target gets a 4xx, or goes to the upstream unchanged (other /.well-known/ paths
    are forwarded by design); it is never answered from disk with anything but the file whose
    path it is byte for byte, and the secret next to the directory never comes back."""
    proxy, _ = site
    for method in ("GET", "HEAD"):
        status, body, forwarded = _get(proxy, target, method)
        assert SECRET not in body, (target, status)
        if forwarded:
            assert proxy.upstream.seen[-1].path == target.encode("latin-1")
            continue
        assert status == b"200" or status.startswith(b"4"), (target, status, body[:80])
        if status == b"200":
            assert method == "HEAD" or body in EXACT.values(), (target, body[:80])
            assert target.partition("?")[0] in EXACT, (target, status, body[:80])


@pytest.mark.parametrize("target", CHALLENGE)
def test_challenge_path_is_never_forwarded_and_needs_the_exact_token(
    site: tuple[MemoryProxy, _Responder], target: str
) -> None:
    """Anything under ``/.well-known/acme-challenge/`` is answered here (404 unless it is a
    pending token under its exact path), never forwarded, and never reads a file."""
    proxy, responder = site
    for method in ("GET", "HEAD", "POST"):
        status, body, forwarded = _get(proxy, target, method)
        assert forwarded == 0, target
        assert SECRET not in body
        assert status.startswith(b"4"), (target, method, status)
    asked_tokens = {token for _, token in responder.asked}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,256}", t) for t in asked_tokens), asked_tokens


def test_pending_token_is_answered_only_for_get_and_head(
    site: tuple[MemoryProxy, _Responder],
) -> None:
    """The pending token's exact path answers its key authorization (GET, and HEAD without a
    body); POST gets 404 and nothing is forwarded."""
    proxy, _ = site
    assert _get(proxy, C + TOKEN) == (b"200", ANSWER, 0)
    assert _get(proxy, C + TOKEN + "?x=1") == (b"200", ANSWER, 0)
    assert _get(proxy, C + TOKEN, "HEAD")[0::2] == (b"200", 0)
    status, _, forwarded = _get(proxy, C + TOKEN, "POST")
    assert (status[:1], forwarded) == (b"4", 0)


@pytest.mark.parametrize("target", CHALLENGE_EQUIVALENTS)
def test_challenge_equivalents_never_answer_the_token(
    site: tuple[MemoryProxy, _Responder], target: str
) -> None:
    """A target that only a normalising server reads as the challenge path never gets the key
    authorization from us (it is not our challenge path) and never reads a file."""
    proxy, _ = site
    status, body, forwarded = _get(proxy, target)
    assert ANSWER not in body
    assert SECRET not in body


def test_challenge_equivalents_are_not_forwarded(site: tuple[MemoryProxy, _Responder]) -> None:
    """No spelling of the challenge path that a normalising upstream would read as
    ``/.well-known/acme-challenge/...`` is forwarded (answered here, or refused)."""
    proxy, _ = site
    forwarded = [t for t in CHALLENGE_EQUIVALENTS if _get(proxy, t)[2]]
    assert forwarded == []


def test_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    """A symlink in the well-known directory pointing outside it stops start-up with a clear
    message instead of publishing whatever it points to."""
    wk = tmp_path / "wk"
    wk.mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (wk / "assetlinks.json").write_bytes(b"[]")
    (wk / "outside").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ConfigError, match="outside"):
        load_well_known(wk)


def test_symlink_inside_the_directory_is_served(tmp_path: Path) -> None:
    """A symlink to another file of the same directory keeps working (an alias)."""
    wk = tmp_path / "wk"
    wk.mkdir()
    (wk / "assetlinks.json").write_bytes(b"[]")
    (wk / "alias.json").symlink_to(wk / "assetlinks.json")
    files = load_well_known(wk)
    assert files[b"/.well-known/alias.json"].body == b"[]"
