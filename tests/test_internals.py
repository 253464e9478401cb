"""The private internals of Twisted and pyOpenSSL that the proxy relies on are all still there:
they are used only in trackingproxy/internals/ (one module for each package), and on a release
whose internals differ this fails first, naming what is missing and the module to adapt
(setup.cfg bounds both packages to the releases checked)."""

from __future__ import annotations

import ast
from pathlib import Path

import OpenSSL
from OpenSSL import SSL, crypto
from OpenSSL._util import lib

import twisted
from tests.tls.manycerts import make_hierarchy
from trackingproxy.internals import pyopenssl_private, twisted_private

PACKAGE = Path(__file__).resolve().parent.parent / "trackingproxy"


def _versions() -> str:
    return f"Twisted {twisted.__version__}, pyOpenSSL {OpenSSL.__version__}"


def test_twisted_internals_are_there() -> None:
    """Everything trackingproxy/internals/twisted_private.py reaches into exists."""
    missing = twisted_private.missing()
    assert missing == [], (
        f"{_versions()}: Twisted's internals changed ({missing}); adapt "
        "trackingproxy/internals/twisted_private.py, or keep twisted below this release"
    )


def test_pyopenssl_internals_are_there() -> None:
    """Everything trackingproxy/internals/pyopenssl_private.py reaches into exists."""
    missing = pyopenssl_private.missing()
    assert missing == [], (
        f"{_versions()}: pyOpenSSL's internals changed ({missing}); adapt "
        "trackingproxy/internals/pyopenssl_private.py, or keep pyopenssl below this release"
    )


def test_no_other_module_imports_their_private_modules() -> None:
    """Only trackingproxy/internals/ imports a private module of Twisted or pyOpenSSL
    (twisted.web._newclient, OpenSSL._util...)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "internals":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] in ("twisted", "OpenSSL") and any(p.startswith("_") for p in parts):
                    found.append(f"{path.relative_to(PACKAGE.parent)}: {module}")
    assert found == []


def test_use_leaf_refuses_a_key_of_another_certificate_without_raising() -> None:
    """pyopenssl_private.use_leaf (run in the servername callback) answers False for a key
    that is not the leaf's, leaves no OpenSSL error behind, and True for the right key."""
    issuer = make_hierarchy(1).intermediates[0]
    a, b = issuer.loaded("a.example.com"), issuer.loaded("b.example.com")
    leaf = crypto.X509.from_cryptography(a.leaf)
    connection = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
    wrong = crypto.PKey.from_cryptography_key(b.key)
    assert pyopenssl_private.use_leaf(connection, leaf, wrong) is False
    assert lib.ERR_peek_error() == 0
    right = crypto.PKey.from_cryptography_key(a.key)
    assert pyopenssl_private.use_leaf(connection, leaf, right) is True
