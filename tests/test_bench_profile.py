"""bench --profile --syscalls: strace's summary turned into calls per request."""

from __future__ import annotations

from bench.profile import per_request

# What `strace -c -f -p PID` printed for 800 new TLS connections (one request each).
STRACE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 29.19    0.065240           9      7122           getpid
 26.17    0.058491          14      4007           sendto
  3.47    0.007748           9       816        16 accept4
  2.96    0.006625           8       800       800 shutdown
------ ----------- ----------- --------- --------- ----------------
100.00    0.223512          10     21740       822 total
"""


def test_calls_are_divided_by_the_requests() -> None:
    lines = per_request(STRACE, 800).splitlines()
    assert lines[0].split() == ["calls/request", "calls", "syscall"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["8.90", "7122", "getpid"],
        ["5.01", "4007", "sendto"],
        ["1.02", "816", "accept4"],
        ["1.00", "800", "shutdown"],
    ]
