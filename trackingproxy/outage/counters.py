# -*- test-case-name: tests.outage.test_policy,tests.outage.test_journal -*-
"""What outage mode did, counted: local answers by kind, requests journaled, replayed, dropped
(by reason) and ambiguous. Plain integers written on the reactor thread; `metrics` exports them.
No label ever holds anything a client sent."""

from __future__ import annotations

from typing import Final

from attrs import define, field

__all__ = ["ANSWER_KINDS", "DROP_REASONS", "OutageCounters"]

ANSWER_KINDS: Final = ("open", "remembered_click", "unavailable")
# ttl: older than --journal-ttl; size: over --journal-max-bytes; crash: marked "sending" when
# the process stopped (maybe sent: never sent again) or behind a damaged journal record.
DROP_REASONS: Final = ("ttl", "size", "crash")


@define
class OutageCounters:
    """Counts since the process started.

    @ivar local_answers: answers given without the upstream, by kind (`ANSWER_KINDS`).
    @ivar journaled: requests journaled (they provably never reached SparkPost).
    @ivar repeats: requests not journaled because the same one was journaled less than 10 s
        before (link scanners, reloads).
    @ivar replayed: journaled requests re-sent that got an answer.
    @ivar dropped: journaled requests given up, by reason (`DROP_REASONS`).
    @ivar ambiguous: requests that may have reached SparkPost but got no answer (fully sent,
        then timed out or reset): answered locally (or given up, for a replay), never re-sent.
    @ivar write_errors: failed writes of the journal file.
    """

    local_answers: dict[str, int] = field(factory=lambda: dict.fromkeys(ANSWER_KINDS, 0))
    journaled: int = 0
    repeats: int = 0
    replayed: int = 0
    dropped: dict[str, int] = field(factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    ambiguous: int = 0
    write_errors: int = 0
