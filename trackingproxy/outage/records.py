# -*- test-case-name: tests.outage.test_journal -*-
"""The journal's file format: one record per line, each checked by a CRC, appended only.

A line is ``CRC SP JSON LF``: CRC is the CRC-32 of the JSON text as 8 lower-case hex digits,
the JSON is ASCII (bytes a client sent are decoded as Latin-1, so they come back unchanged).
Records:

- ``{"v":1}``: the format version, the first line of a written (compacted) file;
- ``{"a":ID,"t":TIME,"m":"GET","h":HOST,"p":TARGET,"c":CLIENT,"u":USER_AGENT,"s":SCHEME}``:
  a request journaled (``u`` is absent when the request had no User-Agent);
- ``{"s":ID}``: sending: written and fsynced before the request is sent;
- ``{"u":ID}``: not sent after all (it provably did not reach the upstream): pending again;
- ``{"d":ID}``: done: sent and answered, or given up.

Reading (`parse`) ends an entry at ``d``; an entry still marked sending was maybe sent, so it
is never sent again. A last line without its LF is a write cut by a crash and is ignored. Any
other damaged line may have been the ``s`` of an entry before it: every entry journaled before
a damaged line is given up (at most once, rather than twice).
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Final

from attrs import define, field, frozen

__all__ = [
    "HEADER",
    "JournaledRequest",
    "Parsed",
    "add_record",
    "decode_add",
    "mark_record",
    "parse",
]

VERSION: Final = 1


def _line(obj: dict[str, Any]) -> bytes:
    text = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(text), text)


HEADER: Final = _line({"v": VERSION})


@frozen
class JournaledRequest:
    """A request that never reached SparkPost, as it is re-sent later: method, Host, target
    (path and query), the client address (sent as X-Forwarded-For), User-Agent, scheme (sent as
    X-Forwarded-Proto) and when it arrived (epoch seconds)."""

    method: bytes
    host: str
    target: bytes
    client: str
    user_agent: bytes | None
    scheme: bytes
    time: float


def add_record(entry_id: int, request: JournaledRequest) -> bytes:
    obj: dict[str, Any] = {
        "a": entry_id,
        "t": round(request.time, 3),
        "m": request.method.decode("latin-1"),
        "h": request.host,
        "p": request.target.decode("latin-1"),
        "c": request.client,
        "s": request.scheme.decode("latin-1"),
    }
    if request.user_agent is not None:
        obj["u"] = request.user_agent.decode("latin-1")
    return _line(obj)


def mark_record(kind: str, entry_id: int) -> bytes:
    """An ``s`` (sending), ``u`` (not sent) or ``d`` (done) record."""
    return _line({kind: entry_id})


def _check(line: bytes) -> dict[str, Any] | None:
    """The record of one line (without its LF), None if damaged."""
    crc, sep, text = line.partition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(text):
            return None
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def decode_add(line: bytes) -> JournaledRequest:
    """The request of an ``a`` record line (as made by `add_record`)."""
    obj = _check(line.rstrip(b"\n"))
    if obj is None or "a" not in obj:
        raise ValueError("not a journal entry")
    user_agent = obj.get("u")
    return JournaledRequest(
        method=str(obj["m"]).encode("latin-1"),
        host=str(obj["h"]),
        target=str(obj["p"]).encode("latin-1"),
        client=str(obj["c"]),
        user_agent=None if user_agent is None else str(user_agent).encode("latin-1"),
        scheme=str(obj.get("s", "https")).encode("latin-1"),
        time=float(obj["t"]),
    )


@define
class Parsed:
    """What a journal file holds: ``entries`` id -> (time, the ``a`` line) in file order, still
    pending; ``given_up`` ids maybe sent (marked sending) or behind a damaged line; the largest
    id seen; whether the last line was cut; how many damaged lines."""

    entries: dict[int, tuple[float, bytes]] = field(factory=dict)
    given_up: set[int] = field(factory=set)
    last_id: int = 0
    torn_tail: bool = False
    damaged: int = 0


def parse(data: bytes) -> Parsed:
    """Read a journal file's bytes (see the module docstring)."""
    out = Parsed()
    entries = out.entries
    sending: set[int] = set()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with LF, else a line cut by a crash
    out.torn_tail = bool(tail)
    for line in lines:
        obj = _check(line)
        if obj is None or not _valid(obj):
            out.damaged += 1
            # This line may have been the "sending" mark of any entry before it.
            out.given_up.update(entries)
            sending.clear()
            entries.clear()
            continue
        if "a" in obj:
            entry_id = int(obj["a"])
            entries[entry_id] = (float(obj["t"]), line + b"\n")
            out.last_id = max(out.last_id, entry_id)
        elif "s" in obj:
            if int(obj["s"]) in entries:
                sending.add(int(obj["s"]))
        elif "u" in obj:
            sending.discard(int(obj["u"]))
        elif "d" in obj:
            entries.pop(int(obj["d"]), None)
            sending.discard(int(obj["d"]))
    for entry_id in sending:
        if entries.pop(entry_id, None) is not None:
            out.given_up.add(entry_id)
    return out


def _valid(obj: dict[str, Any]) -> bool:
    if "v" in obj:
        return bool(obj["v"] == VERSION)
    if "a" in obj:
        return (
            isinstance(obj["a"], int)
            and isinstance(obj.get("t"), int | float)
            and all(isinstance(obj.get(k), str) for k in ("m", "h", "p", "c"))
        )
    return len(obj) == 1 and any(isinstance(obj.get(k), int) for k in ("s", "u", "d"))
