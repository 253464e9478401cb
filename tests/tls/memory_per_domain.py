"""What serving one more domain costs in memory: ``PYTHONMALLOC=malloc python -m
tests.tls.memory_per_domain [N]`` prints JSON (tests/tls/test_memory.py runs it).

N domains, each with its own certificate and its own ECDSA P-256 key, under two intermediates
(as with Let's Encrypt), given as PEM. Measured in the heap, as glibc counts bytes in use
(``mallinfo2``: no fragmentation or page effects; with ``PYTHONMALLOC=malloc`` Python's objects
are in it too), after a collection, at three points:

- ``pem``: the PEM bytes of a domain's full chain and key (what it costs on disk);
- ``values``: what parsing them costs (``LoadedCertificate``: the leaf and key as OpenSSL
  objects, the shared intermediates, the names and facts read from the leaf);
- ``served``: what installing them in the SNI map adds (the chains' contexts, the map's
  entries);
- ``openssl_leaf_and_key``: what the leaf and key as OpenSSL objects cost alone (made again,
  apart): the certificate and key themselves, in the form a handshake needs;
  ``values + served`` minus this is what a domain costs beyond them (the 8 KiB budget).

``rss_*`` are the same steps as the process's resident size grew (after ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence

from OpenSSL import crypto

from tests.tls.manycerts import domain_names, make_hierarchy
from trackingproxy.tls.certificates import LoadedCertificate, parse_pem
from trackingproxy.tls.sni import SNIContextMap


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    gc.collect()
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def resident() -> int:
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve_in_sni_map(names: Sequence[str], certs: Sequence[LoadedCertificate]) -> object:
    """What the proxy does at start-up: one SNI map, every certificate installed."""
    sni = SNIContextMap(names)
    for cert in certs:
        sni.install(cert)
    return sni


def measure(
    count: int,
    serve: Callable[[Sequence[str], Sequence[LoadedCertificate]], object] = serve_in_sni_map,
) -> dict[str, float]:
    """Bytes per domain at each step (see the module docstring)."""
    hierarchy = make_hierarchy(2)
    names = domain_names(count)
    pems = [hierarchy.intermediates[i % 2].issue(n) for i, n in enumerate(names)]
    heap, rss = heap_in_use(), resident()
    certs = [parse_pem(chain, key, f"cert {i}") for i, (chain, key) in enumerate(pems)]
    heap_values, rss_values = heap_in_use(), resident()
    served = serve(names, certs)
    heap_served, rss_served = heap_in_use(), resident()
    assert served is not None
    objects = [
        (crypto.X509.from_cryptography(c.leaf), crypto.PKey.from_cryptography_key(c.key))
        for c in certs
    ]
    heap_objects = heap_in_use()
    assert len(objects) == count
    return {
        "domains": count,
        "pem": sum(len(chain) + len(key) for chain, key in pems) / count,
        "values": (heap_values - heap) / count,
        "served": (heap_served - heap_values) / count,
        "openssl_leaf_and_key": (heap_objects - heap_served) / count,
        "rss_values": (rss_values - rss) / count,
        "rss_served": (rss_served - rss_values) / count,
    }


def main(argv: list[str]) -> None:
    count = int(argv[1]) if len(argv) > 1 else 2000
    print(json.dumps(measure(count)))


if __name__ == "__main__":
    main(sys.argv)
