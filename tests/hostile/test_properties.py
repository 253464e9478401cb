"""Property-based tests (hypothesis) over the header and host handling.

Four properties, each over generated hostile input:

- ``host_from_header``: whatever the bytes, a configured domain comes out only for that domain
  itself (any case, trailing dots, a numeric port), never for userinfo, paths, spaces or
  anything else around it.
- ``ForwardedFor.resolve``: the client address is the right-most untrusted address of the chain
  (only when the peer is trusted), and the header value passed on is a clean header value.
- Header forwarding through the real Site (``build_service`` on a memory reactor, requests fed
  as raw bytes): no CR, LF or NUL reaches the upstream, no client-sent hop-by-hop or
  ``X-Forwarded-*`` header survives, nothing named in ``Connection`` survives, nothing is
  invented, at most the one request the client sent is forwarded, and only for a configured
  domain.
- The Host + SNI decision over real (in-memory) TLS handshakes: forwarded exactly when the Host
  names a configured domain and the SNI is absent, equal, or served by the same certificate.

Bounded for the suite (a few seconds); ``TP_PROPERTY_SCALE=N`` multiplies the number of
examples (the soak command runs it with a large N). ``TP_PROPERTY_COUNTS=PATH`` appends how many
examples each property ran to PATH (JSON lines), for the soak report.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.memory import MemoryProxy, build_memory_proxy
from trackingproxy.domains import host_from_header
from trackingproxy.proxy.forwarded import ForwardedFor, parse_networks

SCALE = max(1, int(os.environ.get("TP_PROPERTY_SCALE", "1")))
COUNTS: Counter[str] = Counter()

WILD = ("x.wild.example.com", "y.wild.example.com")
DOMAINS = ("a.example.com", "b.example.com", *WILD)
CERTS = (("a.example.com",), ("b.example.com",), ("*.wild.example.com",))
OTHERS = (
    "evil.example",
    "z.wild.example.com",
    "example.com",
    "a.example.com.evil.example",
    "127.0.0.1",
    "[::1]",
    "xn--e1afmkfd.example.com",
)
PEER = "198.51.100.7"

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"http2-settings",
}
SET_BY_PROXY = {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
NEVER_FROM_CLIENT = HOP_BY_HOP | {b"x-real-ip", b"forwarded", b"content-length"}
CTL = re.compile(rb"[\r\n\x00]")


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _count(name: str) -> None:
    COUNTS[name] += 1


@atexit.register
def _write_counts() -> None:
    path = os.environ.get("TP_PROPERTY_COUNTS")
    if path and COUNTS:
        with open(path, "a") as f:
            f.write(json.dumps(dict(COUNTS)) + "\n")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> MemoryProxy:
    tmp: Path = tmp_path_factory.mktemp("properties")
    return build_memory_proxy(tmp, CERTS, DOMAINS)


# -- strategies -------------------------------------------------------------------------------
def _random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f and c.isascii() else c for c, f in zip(text, flips, strict=True))


@st.composite
def host_values(draw: st.DrawFn) -> bytes:
    """Host header values: configured and foreign names dressed up in many ways."""
    name = draw(st.sampled_from(DOMAINS + OTHERS))
    name = _random_case(draw, name)
    prefix = draw(st.sampled_from(["", "", "", "user@", "user:pw@", " ", "\t", "http://", "//"]))
    dots = draw(st.sampled_from(["", "", ".", ".."]))
    port = draw(
        st.sampled_from(
            ["", "", ":80", ":443", ":", ":0", ":99999", ":123456", ":8a", ": 80", ":\u0661", ":+1"]
        )
    )
    suffix = draw(
        st.sampled_from(
            [
                "",
                "",
                "",
                "/",
                "/x",
                "?",
                "#",
                "%00",
                "\\",
                " ",
                "\x00",
                "@evil.example",
                ",evil.example",
                ";x",
            ]
        )
    )
    text = prefix + name + dots + port + suffix
    return text.encode("utf-8")


header_values = st.one_of(host_values(), st.binary(max_size=64))


# -- host_from_header -------------------------------------------------------------------------
@_settings(1000)
@given(header_values)
def test_host_from_header_never_yields_a_domain_for_anything_but_that_domain(raw: bytes) -> None:
    """A configured domain is recognised only from ``domain[.]*[:digits]`` (any case): userinfo,
    spaces, paths, percent signs, extra names or odd port digits give None or a foreign name."""
    _count("host_from_header")
    host = host_from_header(raw)
    if host is None:
        return
    assert host == host.lower()
    assert not set(host) & set(" \t/\\?#%@")
    if host in DOMAINS:
        pattern = rb"(?i)" + re.escape(host.encode()) + rb"\.*(:[0-9]{1,5})?"
        assert re.fullmatch(pattern, raw), raw


@_settings(300)
@given(st.sampled_from(DOMAINS), st.data())
def test_host_from_header_accepts_plain_variants(domain: str, data: st.DataObject) -> None:
    """Case, one trailing dot and a port do not stop a configured domain from being served."""
    _count("host_from_header_variants")
    text = _random_case(data.draw, domain) + data.draw(st.sampled_from(["", "."]))
    text += data.draw(st.sampled_from(["", ":80", ":443", ":8443"]))
    assert host_from_header(text.encode()) == domain


# -- X-Forwarded-For --------------------------------------------------------------------------
TRUSTED = parse_networks(["10.0.0.0/8", "2001:db8::/32"])
ADDRESSES = [
    "10.1.2.3",
    "10.9.9.9",
    "203.0.113.5",
    "198.51.100.9",
    "2001:db8::1",
    "2001:db9::7",
    "::ffff:10.1.1.1",
    "::ffff:203.0.113.77",
    "[2001:db8::2]:443",
    "203.0.113.8:5555",
    "[::1]",
    "unknown",
    "",
    "1.2.3",
    "999.1.1.1",
    "_hidden",
    "<script>",
    "10.0.0.1\x00",
    "203.0.113.1\r\nX-Evil: 1",
    "\x7f",
    "10.0.0.0/8",
]


def _trusted(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in TRUSTED)


@st.composite
def xff_values(draw: st.DrawFn) -> list[bytes]:
    def entry() -> str:
        return draw(st.one_of(st.sampled_from(ADDRESSES), st.text(max_size=12)))

    values = []
    for _ in range(draw(st.integers(0, 3))):
        parts = [entry() for _ in range(draw(st.integers(0, 4)))]
        sep = draw(st.sampled_from([",", ", ", " ,", ",,"]))
        values.append(sep.join(parts).encode("utf-8", "replace"))
    return values


@_settings(1000)
@given(st.sampled_from([*ADDRESSES[:9], "::1", "127.0.0.1"]), xff_values())
def test_forwarded_for_resolution(peer: str, values: list[bytes]) -> None:
    """Untrusted peer: the client is the peer and nothing the client sent is passed on. Trusted
    peer: the client is the right-most address not in a trusted network (or the left-most of an
    all-trusted chain), every address right of it is trusted, and the value passed on ends with
    the peer and holds no CR, LF or NUL."""
    _count("forwarded_for")
    fwd = ForwardedFor(TRUSTED)
    result = fwd.resolve(peer, values)
    assert not CTL.search(result.forwarded_for), result.forwarded_for
    peer_norm = ForwardedFor(()).resolve(peer, None).client if peer.startswith("::ffff:") else peer
    peer_ip = _parse(peer)
    if peer_ip is None or not _trusted(peer_ip) or not values:
        assert result.client in (peer, peer_norm, peer_ip)
        assert result.forwarded_for == result.client.encode()
        return
    # trusted peer: walk the chain from the right like the README says
    chain = [p.strip() for v in values for p in v.decode("latin-1").split(",") if p.strip()]
    expected = peer_ip
    for entry in reversed(chain):
        addr = _parse(entry)
        if addr is None:
            break
        expected = addr
        if not _trusted(addr):
            break
    assert result.client == expected, (chain, result)
    assert result.forwarded_for.endswith(peer_ip.encode()), result.forwarded_for


def _parse(text: str) -> str | None:
    """An independent reading of one X-Forwarded-For entry: IP, [IPv6]:port or IPv4:port."""
    text = text.strip()
    m = re.fullmatch(
        r"\[([0-9a-fA-F:.]+)\](?::\d+)?|(\d+\.\d+\.\d+\.\d+)(?::\d+)?|([^\[\]]+)", text
    )
    if m is None:
        return None
    candidate = m.group(1) or m.group(2) or m.group(3)
    try:
        addr = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# -- header forwarding through the real Site --------------------------------------------------
NAMES = [
    *sorted(NEVER_FROM_CLIENT | SET_BY_PROXY),
    b"x-forwarded-port",
    b"x-forwarded-server",
    b"user-agent",
    b"accept",
    b"cookie",
    b"referer",
    b"x-custom",
    b"x-a",
    b"x-b",
    b"content-type",
    b"cache-control",
]


@st.composite
def header_lines(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(name, value) pairs with hostile names and values, and a Connection header value."""
    headers = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(
            st.one_of(
                st.sampled_from(NAMES),
                st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}\Z"),
                st.binary(min_size=1, max_size=8),
            )
        )
        name = _random_case(draw, name.decode("latin-1")).encode("latin-1")
        value = draw(
            st.one_of(
                st.sampled_from(
                    [
                        b"1",
                        b"chunked",
                        b"close",
                        b"keep-alive, x-a",
                        b"10.0.0.1",
                        b"a\x00b",
                        b"a\rb",
                        b"a\nb",
                        b"a\r\nX-Evil: 1",
                        b" x ",
                        b"\t",
                        b"upgrade, x-custom, user-agent",
                        b"\x80\xff",
                    ]
                ),
                st.binary(max_size=24),
            )
        )
        headers.append((name, value))
    connection = draw(
        st.sampled_from([b"", b"x-a", b"x-custom, user-agent", b"keep-alive", b"cookie,x-b"])
    )
    return headers, connection


@_settings(700)
@given(
    st.sampled_from(DOMAINS + OTHERS[:3]),
    st.sampled_from([b"/q/abc", b"/f/x?y=1&z=%00", b"/f/%2e%2e/x", b"/q/a;b", b"/"]),
    st.sampled_from([b"GET", b"HEAD", b"POST", b"OPTIONS"]),
    header_lines(),
)
def test_forwarded_headers_are_clean(
    proxy: MemoryProxy,
    host: str,
    target: bytes,
    method: bytes,
    generated: tuple[list[tuple[bytes, bytes]], bytes],
) -> None:
    """Whatever the client sends, what reaches the upstream has no CR/LF/NUL anywhere, none of
    the hop-by-hop, Connection-named or X-Forwarded-* headers the client sent, only headers the
    client sent (plus the four the proxy sets), and goes only to a configured domain."""
    _count("header_forwarding")
    headers, connection = generated
    raw = method + b" " + target + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
    for name, value in headers:
        raw += name + b": " + value + b"\r\n"
    if connection:
        raw += b"Connection: " + connection + b"\r\n"
    if method == b"POST":
        raw += b"Content-Length: 2\r\n\r\nhi"
    else:
        raw += b"\r\n"
    before = len(proxy.upstream.seen)
    proxy.http_exchange(raw, peer=PEER)
    forwarded = proxy.upstream.seen[before:]
    assert len(forwarded) <= 1, forwarded
    if not forwarded:
        return
    _count("header_forwarding_forwarded")
    seen = forwarded[0]
    assert host in DOMAINS
    assert seen.path == target and seen.method == method
    sent = _wire_headers(raw)
    connection_named = {
        t.strip().lower() for n, v in sent if n == b"connection" for t in v.split(b",")
    }
    for name, value in seen.headers:
        lname = name.lower()
        assert not CTL.search(name), name
        assert not CTL.search(value), (name, value)
        assert lname not in NEVER_FROM_CLIENT, name
        assert lname not in connection_named, name
        if lname not in SET_BY_PROXY:
            assert (lname, value.strip(b" \t")) in sent, (name, value)
    assert seen.values(b"host") == [host.encode()]
    assert seen.values(b"x-forwarded-for") == [PEER.encode()]
    assert seen.values(b"x-forwarded-proto") == [b"http"]
    assert seen.values(b"x-forwarded-host") == [host.encode()]


def _wire_headers(raw: bytes) -> set[tuple[bytes, bytes]]:
    """The (lower-case name, trimmed value) pairs of the header block as lines on the wire (an
    injected CRLF makes a line of its own: that is what any parser sees)."""
    block = raw.partition(b"\r\n\r\n")[0]
    pairs = set()
    for line in block.split(b"\n")[1:]:
        name, _, value = line.removesuffix(b"\r").partition(b":")
        pairs.add((name.lower(), value.strip(b" \t")))
    return pairs


# -- Host + SNI over real TLS handshakes ------------------------------------------------------
@_settings(400)
@given(
    st.one_of(st.none(), st.sampled_from((*DOMAINS, "z.wild.example.com", "evil.example"))),
    host_values(),
)
def test_host_and_sni_decision(proxy: MemoryProxy, sni: str | None, host: bytes) -> None:
    """Over TLS a request is forwarded exactly when its Host names a configured domain and the
    connection's server name is absent, the same name, or served by the same certificate (the
    wildcard pair); the upstream always gets the Host's domain, never the SNI's."""
    _count("host_sni")
    before = len(proxy.upstream.seen)
    raw = b"GET /q/p HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    answer = proxy.tls_exchange(sni, raw)
    forwarded = proxy.upstream.seen[before:]
    name = host_from_header(host.strip(b" \t"))  # the parser drops OWS around a value
    handshake_ok = sni is None or sni in DOMAINS
    expected = (
        handshake_ok
        and name in DOMAINS
        and (sni is None or sni == name or (sni in WILD and name in WILD))
    )
    assert len(forwarded) <= (1 if expected else 0), (sni, host, answer[:60], forwarded)
    if expected and host == host.strip(b" \t"):
        # (trailing white space around the Host value may be refused: safe, if not RFC 9112)
        assert len(forwarded) == 1, (sni, host, answer[:60])
    if forwarded:
        _count("host_sni_forwarded")
        assert forwarded[0].values(b"host") == [str(name).encode()]
        assert forwarded[0].values(b"x-forwarded-proto") == [b"https"]
    elif handshake_ok and not expected:
        assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), answer[:80]
