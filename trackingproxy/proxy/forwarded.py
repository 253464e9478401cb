"""Who the client is: X-Forwarded-For handling with trusted proxies.

A client-sent X-Forwarded-For is ignored unless the TCP (or PROXY-protocol) peer is a trusted
proxy; then the client is the right-most untrusted address of the chain and the chain is passed on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from attrs import frozen

from trackingproxy.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse ``--trusted-proxy`` values (CIDR or single address)."""
    nets: list[IPNetwork] = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"--trusted-proxy {value!r} is not an IP network; use e.g. 10.0.0.0/8 or 192.0.2.7"
            ) from None
    return tuple(nets)


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _has_control(text: str) -> bool:
    return any(c < " " or c == "\x7f" for c in text)


def normalise_peer(host: str) -> str:
    """The peer address as it should appear in logs and headers (IPv4-mapped v6 unwrapped)."""
    addr = _parse_ip(host)
    return str(addr) if addr is not None else host


@frozen
class ClientAddress:
    """The client IP for logs and the X-Forwarded-For value to send upstream."""

    client: str
    forwarded_for: bytes


class ForwardedFor:
    """Computes the client address from the peer and the request's X-Forwarded-For values."""

    def __init__(self, trusted: Sequence[IPNetwork]) -> None:
        self._trusted = tuple(trusted)

    def _is_trusted(self, addr: IPAddress) -> bool:
        return any(addr.version == net.version and addr in net for net in self._trusted)

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` is a trusted proxy (whose client-address fields are believed)."""
        if not self._trusted:
            return False
        addr = _parse_ip(normalise_peer(peer))
        return addr is not None and self._is_trusted(addr)

    def resolve(self, peer: str, header_values: Sequence[bytes] | None) -> ClientAddress:
        if not self._trusted:  # the common case: no parsing at all
            if peer.startswith("::ffff:"):
                peer = normalise_peer(peer)
            return ClientAddress(peer, peer.encode("ascii", "replace"))
        peer = normalise_peer(peer)
        peer_ip = _parse_ip(peer)
        if (
            not self._trusted
            or peer_ip is None
            or not self._is_trusted(peer_ip)
            or not header_values
        ):
            return ClientAddress(peer, peer.encode("ascii", "replace"))
        chain: list[str] = []
        for value in header_values:
            chain.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
        client = peer
        for entry in reversed(chain):
            addr = _parse_ip(entry)
            if addr is None:
                break  # garbage: do not believe anything left of it
            client = str(addr)
            if not self._is_trusted(addr):
                break
        # Entries are passed on as sent, but never control characters (a NUL or CR arriving
        # through a laxer hop must not reach the upstream's header block).
        passed_on = ", ".join([*(e for e in chain if not _has_control(e)), peer])
        return ClientAddress(client, passed_on.encode("latin-1", "replace"))
