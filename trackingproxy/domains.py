# -*- test-case-name: tests.test_domains,tests.test_values -*-
"""Domain names: validation of configured names, Host header parsing, wildcard coverage.

``normalise_domain`` runs once per configured name at start and on reload (10,000 names and
more): a name that is already plain lower-case ASCII skips the IDNA library, which would
return it unchanged (a few microseconds a name instead of tens); anything else goes through
IDNA 2008 + UTS #46.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import idna

from trackingproxy.errors import ConfigError

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PLAIN = re.compile(r"[a-z0-9.-]+")


def _plain(name: str) -> bool:
    """True when IDNA would return ``name`` unchanged or refuse it for a reason the label
    checks of ``normalise_domain`` also refuse: only lower-case ASCII letters, digits,
    hyphens and dots, and no label with hyphens in its 3rd and 4th characters (IDNA 2008
    reserves those, ``xn--`` A-labels among them; such names take the IDNA path)."""
    return _PLAIN.fullmatch(name) is not None and all(
        label[2:4] != "--" for label in name.split(".")
    )


def normalise_domain(raw: str) -> str:
    """Return the canonical (lower-case, ASCII, no trailing dot) form of a configured domain.

    Raises ConfigError for anything that is not a plain DNS host name with at least two labels.
    A plain lower-case ASCII name is checked without the IDNA library (same answer, see
    ``_plain``); an internationalised or ``xn--`` name is checked by IDNA 2008 + UTS #46.
    """
    name = raw.strip().rstrip(".").lower()
    if not name:
        raise ConfigError(
            "--domain: an empty domain name was given; pass e.g. --domain click.example.com"
        )
    if _plain(name):
        maybe_ip = name[-1].isdigit()  # plain, only a dotted-quad IPv4 address: ends in a digit
    else:
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ConfigError(
                f"--domain {raw!r} is not a valid domain name ({e}); use e.g. click.example.com"
            ) from None
        maybe_ip = True
    if maybe_ip and is_ip_literal(name):
        raise ConfigError(
            f"--domain {raw!r} is an IP address; give the tracking domain's DNS name instead"
        )
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels) or len(name) > 253:
        raise ConfigError(
            f"--domain {raw!r} is not a valid domain name; use e.g. click.example.com"
        )
    return name


def is_ip_literal(name: str) -> bool:
    """True for an IPv4 or IPv6 address (brackets allowed), i.e. not a DNS name."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def host_from_header(value: bytes | None) -> str | None:
    """Parse a Host header (or :authority) into a lower-case host name without port.

    Returns None when the value is missing or malformed (userinfo, bad port, spaces, IP literal
    in brackets is kept as is so it never matches a configured domain).
    """
    if not value:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "@" in text or any(c in text for c in " \t/\\?#%"):
        return None
    host, sep, port = text.rpartition(":")
    if sep and "]" not in port:
        if not port.isdigit() or not 0 < int(port[:6]) <= 65535:
            return None
    else:
        host = text
    if host.endswith(".."):
        return None  # one trailing dot is the absolute form of the name; two are not a name
    host = host.removesuffix(".").lower()
    return host or None


def covers(pattern: str, name: str) -> bool:
    """True when a certificate name (possibly ``*.example.com``) covers the host ``name``."""
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def read_domains_file(path: Path) -> list[str]:
    """One domain per line; blank lines and ``#`` comments are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--domains-file {path}: cannot read it ({e}); check the path and its permissions"
        ) from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names
