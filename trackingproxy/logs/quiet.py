"""What reaches the log: the project's own lines at ``--log-level`` and above, nothing of
Twisted's protocol and port bookkeeping.

Twisted announces every factory and datagram protocol it starts or stops ("Starting factory
<...HTTPListener object at 0x...>", "DNSDatagramProtocol starting on 60338", "(UDP Port 60338
Closed)"): eight lines per upstream DNS lookup, two per listener. They say nothing an operator
can act on and bury the lines that do. `QuietLogs` drops them (below warning level only:
warnings and errors always pass) and applies the level; ``install`` wraps the process's log
observers (twistd's file or JSON observer) in it once logging has begun.
"""

from __future__ import annotations

import re
from typing import Final

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from zope.interface import implementer

from trackingproxy.errors import ConfigError
from trackingproxy.internals.twisted_private import wrap_log_observers

__all__ = ["LEVELS", "BookkeepingFilter", "install", "parse_level", "quiet"]

LEVELS: Final = ("debug", "info", "warn", "error", "critical")

# Twisted's bookkeeping, as formatted (one pattern per kind of line).
_NOISE: Final = re.compile(
    r"^(?:Starting|Stopping) (?:factory|protocol) <"
    r"|^\S+(?: \(\w+\))? starting on \d+$"
    r"|^\((?:TCP|UDP|Unix) Port \S+ Closed\)$"
    r"|^b?'?\S+?'? changed, reparsing$"
    r"|^Resolver (?:added|removed) \("
)


def parse_level(raw: str) -> LogLevel:
    """``--log-level``: debug, info, warn (or warning), error or critical."""
    value = (raw or "info").strip().lower()
    value = "warn" if value == "warning" else value
    if value not in LEVELS:
        raise ConfigError(f"--log-level {raw!r}: choose one of {', '.join(LEVELS)}")
    level: LogLevel = LogLevel.levelWithName(value)
    return level


_MAYBE: PredicateResult = PredicateResult.maybe
_NO: PredicateResult = PredicateResult.no


@implementer(ILogFilterPredicate)
class BookkeepingFilter:
    """A log predicate: no for Twisted's bookkeeping lines below warning level."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        level = event.get("log_level", LogLevel.info)
        if level >= LogLevel.warn:
            return _MAYBE
        try:
            text = formatEvent(event)
        except Exception:  # a broken event is the observer's problem, not ours
            return _MAYBE
        return _NO if _NOISE.search(text) else _MAYBE


def quiet(observer: ILogObserver, level: LogLevel = LogLevel.info) -> ILogObserver:
    """``observer`` behind the level and the bookkeeping filter."""
    return FilteringLogObserver(
        observer, [LogLevelFilterPredicate(defaultLogLevel=level), BookkeepingFilter()]
    )


@implementer(ILogObserver)
class _Quiet:
    """Marks an observer as already filtered (``install`` twice wraps once)."""

    def __init__(self, inner: ILogObserver, level: LogLevel) -> None:
        self.inner = inner
        self._filtered = quiet(inner, level)

    def __call__(self, event: LogEvent) -> None:
        self._filtered(event)


def install(level: LogLevel = LogLevel.info) -> int:
    """Filter every observer of the global publisher (once); how many were wrapped."""

    def wrap(observer: ILogObserver) -> ILogObserver:
        return observer if isinstance(observer, _Quiet) else _Quiet(observer, level)

    return wrap_log_observers(wrap)
