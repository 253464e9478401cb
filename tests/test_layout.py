"""The layout rules `make lint`'s import contracts (pyproject.toml) cannot state: no module
imports another module's underscore names, and the top of the package holds only the entry
points, options, config, errors, domain names and the wiring (at most ten modules)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trackingproxy"


def test_no_module_imports_another_modules_private_names() -> None:
    """`from trackingproxy.x import _name` appears nowhere in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trackingproxy"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    found.append(f"{path.relative_to(PACKAGE.parent)}: {node.module} {private}")
    assert found == []


def test_the_top_of_the_package_is_small() -> None:
    """At most ten modules sit at the top of trackingproxy/; the rest live in the packages of
    the data flow (server, tls, proxy, upstream, acme, store, ops, logs, admin, checks)."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
