# -*- test-case-name: tests.outage.test_policy -*-
"""The answers given without the upstream while SparkPost cannot be reached: the open pixel,
a remembered click redirect, and the 503 page of a click that is not remembered.

None of them is built from the request: the pixel is SparkPost's own bytes, a redirect's
``Location`` is one SparkPost sent earlier for the very same target (`links`), and the 503 page
is a constant. Nothing here can be turned into an open redirect.
"""

from __future__ import annotations

from typing import Final

from attrs import frozen

__all__ = ["OPEN", "PIXEL", "RETRY_AFTER", "UNAVAILABLE", "LocalAnswer", "redirect"]

# The 1x1 transparent GIF SparkPost serves for an open (44 bytes: its image data block is one
# byte longer than the minimal one); the same bytes as tests/standin.py and demo/standin.py.
PIXEL: Final = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00"
    b"\x02\x03\x44\x01\x00\x00;"
)
assert len(PIXEL) == 44

RETRY_AFTER: Final = 30  # seconds, in the 503 answer of a click that is not remembered
_NO_STORE: Final = (b"cache-control", b"no-store")


@frozen
class LocalAnswer:
    """A complete answer: status, header fields (lower-case names) and body; ``kind`` is its
    metric label (``open``, ``remembered_click``, ``unavailable``)."""

    code: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    kind: str


OPEN: Final = LocalAnswer(200, ((b"content-type", b"image/gif"), _NO_STORE), PIXEL, "open")

UNAVAILABLE: Final = LocalAnswer(
    503,
    (
        (b"content-type", b"text/html; charset=utf-8"),
        _NO_STORE,
        (b"retry-after", str(RETRY_AFTER).encode()),
    ),
    b"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Back shortly</title></head>"
    b"<body><p>This link will work again shortly. Please try again in a minute.</p></body>"
    b"</html>\n",
    "unavailable",
)


def redirect(code: int, location: bytes) -> LocalAnswer:
    """The redirect SparkPost answered for this target before (``code``, ``location`` as it
    sent them)."""
    return LocalAnswer(
        code,
        ((b"location", location), _NO_STORE, (b"content-type", b"text/plain; charset=utf-8")),
        b"",
        "remembered_click",
    )
