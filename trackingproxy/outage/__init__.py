# -*- test-case-name: tests.outage.test_integration,tests.outage.test_service -*-
"""Outage mode (``--outage-mode replay``): when SparkPost cannot be reached, opens keep
working, known links keep redirecting, and what never arrived is sent once later.

The parts: `policy` (what happens to one request: local answers, journaling, learning links),
`answers` (the pixel, remembered redirects, the 503 page), `links` (remembered redirects),
`journal` with `records` and `writer` (the requests to re-send, on disk), `replay` (noticing
recovery, re-sending once), `counters` and `metrics` (what it did). `build` makes them from
`OutageSettings` (`build_outage`); the proxy's handler gets `Outage.policy`, the service tree
`Outage.service`, the admin registry `Outage.collector`.
"""

from __future__ import annotations

from trackingproxy.outage.answers import PIXEL, LocalAnswer
from trackingproxy.outage.build import (
    JOURNAL_SUBDIR,
    Outage,
    OutageService,
    OutageSettings,
    build_outage,
    journal_directory,
)
from trackingproxy.outage.counters import OutageCounters
from trackingproxy.outage.policy import OutagePolicy, OutageRequest

__all__ = [
    "JOURNAL_SUBDIR",
    "PIXEL",
    "LocalAnswer",
    "Outage",
    "OutageCounters",
    "OutagePolicy",
    "OutageRequest",
    "OutageService",
    "OutageSettings",
    "build_outage",
    "journal_directory",
]
