"""``--log-format json``: one JSON object per line on stdout for every event and access line.

Installed as the twistd application's log observer (twistd uses an ``ILogObserver`` component
of the application when it has one), so no twistd ``--logger`` flag is needed.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from zope.interface import implementer


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes ``{"time", "level", "namespace", "message"}`` per event; access-log events are
    written as their own fields (``"type": "access"``)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        when = event.get("log_time") or time.time()
        record: dict[str, Any]
        access = event.get("access")
        level = event.get("log_level")
        if isinstance(access, dict):
            record = {"type": "access", **access}
        else:
            record = {
                "type": "event",
                "time": _iso(when),
                "level": getattr(level, "name", "info"),
                "namespace": event.get("log_namespace", "-"),
                "message": formatEvent(event),
            }
            failure = event.get("log_failure")
            if failure is not None:
                record["error"] = failure.getErrorMessage()
                record["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._stream.flush()


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"
