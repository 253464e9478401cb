# -*- test-case-name: tests.tls.test_certificates -*-
"""Certificate values: parsing PEM (key + chain), checking them, and which names they cover.

Nothing here touches the network or keeps state; file reading is limited to the two ``load_*``
helpers used at start-up (and on reload), never per request or per handshake.

A certificate's names are read from its leaf once, when the value is made: exact names and
wildcard suffixes in two sets, so ``covers(name)`` is two set lookups. Checking N certificates
against M domains (``check_usable``, ``covered_domains``) is linear in N + M, never N x M:
10,000 of each is a start-up of a fraction of a second, not of hours.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from trackingproxy.errors import ConfigError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def leaf_names(leaf: x509.Certificate) -> tuple[str, ...]:
    """DNS names of a leaf certificate (subjectAltName, else the common name), lower case.

    A ``cryptography`` certificate keeps the extensions it parsed for its whole life (1.2 KiB
    each); ``LoadedCertificate`` keeps no such object, only the names read here."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(cn.value).lower() for cn in cns)
    return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))


_NONE: frozenset[str] = frozenset()


def _exact(names: Iterable[str]) -> frozenset[str]:
    """The names that are not wildcards, as ``trackingproxy.domains.covers`` reads them (lower
    case, no trailing dot)."""
    found = frozenset(p for p in (n.lower().rstrip(".") for n in names) if not p.startswith("*."))
    return found or _NONE  # one empty set for all: 200 bytes a certificate


def _suffixes(names: Iterable[str]) -> frozenset[str]:
    """For each wildcard name ``*.example.com``, ``example.com``: a wildcard stands for exactly
    one non-empty left-most label."""
    found = frozenset(p[2:] for p in (n.lower().rstrip(".") for n in names) if p.startswith("*."))
    return found or _NONE


def parent(name: str) -> str | None:
    """What a wildcard must end in to cover ``name`` (``a.example.com`` -> ``example.com``)."""
    head, _, rest = name.partition(".")
    return rest if head else None


_SHARED_CHAIN_LIMIT = 64


class _SharedChains:
    """The intermediate certificates seen so far, by DER: every leaf issued under one
    intermediate shares one parsed copy of it (10,000 Let's Encrypt certificates have two or
    three distinct intermediates, not 10,000; a parsed copy is 1.2 KiB). At most
    ``_SHARED_CHAIN_LIMIT`` are kept; beyond that a chain is simply not shared."""

    def __init__(self) -> None:
        self._by_der: dict[bytes, x509.Certificate] = {}

    def share(self, cert: x509.Certificate) -> x509.Certificate:
        der = cert.public_bytes(serialization.Encoding.DER)
        found = self._by_der.get(der)
        if found is not None:
            return found
        if len(self._by_der) < _SHARED_CHAIN_LIMIT:
            self._by_der[der] = cert
        return cert


_CHAINS = _SharedChains()


@frozen(eq=False, init=False)
class LoadedCertificate:
    """A private key and its certificate chain (leaf first), as served to TLS clients.

    Held in the form a handshake uses (the leaf and key as OpenSSL objects, 7.4 KiB for ECDSA
    P-256), the intermediates shared with every certificate of the same chain, and the facts
    read from the leaf once (names, validity, serial, issuer): no second, ``cryptography``
    copy of the leaf and key is kept (3.7 KiB a domain). ``leaf``, ``key`` and ``chain`` make
    ``cryptography`` objects on demand, for the rare callers that need them (saving, ACME).
    Equality is identity.

    @ivar names: the DNS names of the leaf (subjectAltName, else the common name), read once.
    @ivar exact_names: the names that are not wildcards, lower case, no trailing dot.
    @ivar wildcard_suffixes: for each ``*.example.com`` name, ``example.com``.
    """

    openssl_leaf: crypto.X509 = field(repr=False)
    openssl_key: crypto.PKey = field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = field(repr=False)
    source: str
    names: tuple[str, ...] = field(repr=False)
    exact_names: frozenset[str] = field(repr=False)
    wildcard_suffixes: frozenset[str] = field(repr=False)
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial_hex: str
    issuer: str = field(repr=False)
    key_matches: bool = field(repr=False)  # the key is the leaf's (public keys compared)

    def __init__(
        self,
        key: PrivateKey,
        chain: Sequence[x509.Certificate],
        source: str,
        openssl: tuple[crypto.X509, crypto.PKey] | None = None,
    ) -> None:
        """``openssl``: the leaf and key as OpenSSL objects when the caller has them already
        (``parse_pem`` reads them from the PEM, faster than converting)."""
        leaf = chain[0]
        names = leaf_names(leaf)
        if openssl is None:
            openssl = (crypto.X509.from_cryptography(leaf), crypto.PKey.from_cryptography_key(key))
        self.__attrs_init__(
            openssl[0],
            openssl[1],
            tuple(_CHAINS.share(c) for c in chain[1:]),
            source,
            names,
            _exact(names),
            _suffixes(names),
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            format(leaf.serial_number, "x"),
            sys.intern(leaf.issuer.rfc4514_string()),
            _spki(key.public_key()) == _spki(leaf.public_key()),
        )

    @property
    def leaf(self) -> x509.Certificate:
        """The leaf as a ``cryptography`` object (made on each call)."""
        return self.openssl_leaf.to_cryptography()

    @property
    def key(self) -> PrivateKey:
        """The private key as a ``cryptography`` object (made on each call)."""
        return cast(PrivateKey, self.openssl_key.to_cryptography_key())  # as it was given

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf, *self.intermediates)

    def covers(self, name: str) -> bool:
        """Whether the certificate is valid for the host ``name`` (two set lookups)."""
        if name in self.exact_names:
            return True
        head, _, rest = name.partition(".")
        return bool(head) and rest in self.wildcard_suffixes

    def covered(self, domains: Iterable[str]) -> tuple[str, ...]:
        """The ``domains`` (in their order) the certificate covers."""
        return tuple(d for d in domains if self.covers(d))

    def covers_any(self, names: frozenset[str], parents: frozenset[str]) -> bool:
        """Whether the certificate covers at least one host of ``names``, whose ``parent()``s
        are ``parents`` (work in the certificate's own names, not in ``len(names)``)."""
        return not (
            self.exact_names.isdisjoint(names) and self.wildcard_suffixes.isdisjoint(parents)
        )

    def expired_at(self, now: datetime.datetime) -> bool:
        return now >= self.not_after

    def fullchain_pem(self) -> bytes:
        return crypto.dump_certificate(crypto.FILETYPE_PEM, self.openssl_leaf) + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.intermediates
        )

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ))


def parse_pem(cert_pem: bytes, key_pem: bytes, source: str) -> LoadedCertificate:
    """Build a LoadedCertificate from PEM data; raise ConfigError naming ``source`` on problems."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError:
        raise ConfigError(
            f"{source}: no PEM certificate found; give the full chain file (e.g. fullchain.pem)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: no unencrypted PEM private key found; give the key file (e.g. privkey.pem)"
        ) from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ConfigError(f"{source}: unsupported key type; use an ECDSA or RSA key")
    cert = LoadedCertificate(key, chain, source, _openssl_objects(cert_pem, key_pem, chain[0]))
    if not cert.key_matches:
        raise ConfigError(
            f"{source}: the private key does not match the certificate; pass the key that was "
            "issued with this certificate"
        )
    return cert


def _openssl_objects(
    cert_pem: bytes, key_pem: bytes, leaf: x509.Certificate
) -> tuple[crypto.X509, crypto.PKey] | None:
    """The leaf and key read by OpenSSL from the PEM already checked (half the time of
    converting the ``cryptography`` objects); None if it reads something else."""
    try:
        openssl_leaf = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
        # An empty passphrase, never None: OpenSSL would ask for one on the terminal.
        openssl_key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem, b"")
    except crypto.Error:
        return None
    if openssl_leaf.get_serial_number() != leaf.serial_number:
        return None
    return openssl_leaf, openssl_key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{what} {path}: cannot read it ({e.strerror}); check the path and its permissions"
        ) from None


def load_pair(cert_path: Path, key_path: Path) -> LoadedCertificate:
    """Load ``--cert`` and ``--key`` files."""
    cert_pem = _read(cert_path, "--cert")
    key_pem = _read(key_path, "--key")
    return parse_pem(cert_pem, key_pem, f"--cert {cert_path}")


def load_combined(path: Path) -> LoadedCertificate:
    """Load one ``--certs-dir`` file that holds both the key and the chain."""
    data = _read(path, "--certs-dir file")
    return parse_pem(data, data, f"--certs-dir file {path}")


class CertsDirFiles:
    """The ``--certs-dir`` files as last loaded: a file whose inode, size and modification
    time are unchanged is not read or parsed again, so a SIGHUP that adds one file to 10,000
    parses one file (a stat per file remains). Files replaced atomically (a new inode) or
    rewritten (a new mtime) are read again; files gone are forgotten."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[tuple[int, int, int], LoadedCertificate]] = {}

    def load(self, directory: Path) -> list[LoadedCertificate]:
        """Every ``*.pem`` file of ``directory``, sorted by name (a stable order)."""
        try:
            entries = sorted(
                (e for e in os.scandir(directory) if e.name.endswith(".pem") and e.is_file()),
                key=lambda e: e.name,
            )
        except OSError as e:
            raise ConfigError(
                f"--certs-dir {directory}: cannot list it ({e.strerror}); check path and "
                "permissions"
            ) from None
        kept: dict[Path, tuple[tuple[int, int, int], LoadedCertificate]] = {}
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat()
            except OSError as e:
                raise ConfigError(
                    f"--certs-dir file {path}: cannot read it ({e.strerror}); check the path "
                    "and its permissions"
                ) from None
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._files.get(path)
            cert = known[1] if known is not None and known[0] == stamp else load_combined(path)
            kept[path] = (stamp, cert)
        self._files = kept
        return [cert for _, cert in kept.values()]


def load_certs_dir(directory: Path, files: CertsDirFiles | None = None) -> list[LoadedCertificate]:
    """Load every ``*.pem`` file of a ``--certs-dir`` (sorted by name, for a stable order),
    reusing what ``files`` loaded before when given."""
    return (files or CertsDirFiles()).load(directory)


def covered_domains(certs: Iterable[LoadedCertificate], domains: Iterable[str]) -> tuple[str, ...]:
    """The ``domains`` (in their order) that at least one of ``certs`` covers.

    Linear: the certificates' names go into two sets first, then each domain is looked up."""
    exact: set[str] = set()
    suffixes: set[str] = set()
    for cert in certs:
        exact.update(cert.exact_names)
        suffixes.update(cert.wildcard_suffixes)
    return tuple(d for d in domains if d in exact or parent(d) in suffixes)


def _some(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def check_usable(
    certs: Sequence[LoadedCertificate], domains: Sequence[str], now: datetime.datetime
) -> None:
    """Refuse expired certificates and certificates that cover none of the configured domains.

    Linear in certificates + domains: the domains and their parents go into two sets once."""
    names = frozenset(domains)
    parents = frozenset(p for p in map(parent, names) if p is not None)
    for cert in certs:
        if cert.expired_at(now):
            raise ConfigError(
                f"{cert.source}: the certificate expired on {cert.not_after:%Y-%m-%d %H:%M} UTC; "
                "renew it, or drop it and let ACME obtain one"
            )
        if not cert.covers_any(names, parents):
            raise ConfigError(
                f"{cert.source}: the certificate is for {_some(cert.names) or 'no DNS name'}, "
                f"which covers none of the configured domains ({_some(domains)}); add the "
                "matching --domain or pass the right certificate"
            )
