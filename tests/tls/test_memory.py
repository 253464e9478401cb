"""Memory per served domain: installing 2,000 certificates (each with its own key, under two
intermediates) in the SNI map costs the leaf and key as OpenSSL objects and a few hundred
bytes of map, not an SSL.Context per certificate.

Measured by tests/tls/memory_per_domain.py in a child process with ``PYTHONMALLOC=malloc``:
glibc's bytes in use (``mallinfo2``) before and after, so Python's objects and OpenSSL's are
both counted, without fragmentation or page effects. With one SSL.Context per certificate (the
design before) the same measurement gave 27 KiB per domain for ``served``, 19 KiB of it the
contexts; with a context per chain and a ``cryptography`` copy of each leaf and key beside
the OpenSSL objects, 14.8 KiB for parsing and serving; now (one copy, intermediates shared)
8.6 KiB, 7.4 KiB of it the leaf and key themselves (OpenSSL 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_installing_2000_certificates_costs_under_8_kib_per_domain() -> None:
    """Parsing and serving a domain costs under 8 KiB beyond its leaf and key as OpenSSL
    objects (the issue's budget), and under 3 KiB in fact: no second copy of the leaf and key
    (3.7 KiB) and no context per certificate (19 KiB) fit in that."""
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.tls.memory_per_domain", "2000"],
        cwd=ROOT, env=env, capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    per_domain = json.loads(out)
    beyond = per_domain["values"] + per_domain["served"] - per_domain["openssl_leaf_and_key"]
    assert beyond < 8192, per_domain
    assert beyond < 3072, per_domain
