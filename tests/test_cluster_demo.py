"""`make cluster-demo` end to end: demo/run_cluster_demo.py with real redis-server, HAProxy,
pebble, the spgo.io stand-in and three replicas.

Without one of those tools the test is skipped with a reason, except under CI=true where it
fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.demo_runner import require_tools, run_script

SCRIPT = Path(__file__).resolve().parent.parent / "demo" / "run_cluster_demo.py"
DOMAIN = "click.demo.test"
NODES = ("replica-1", "replica-2", "replica-3")
TOOLS = {"redis-server": "/usr/bin/redis-server", "haproxy": "/usr/sbin/haproxy",
         "pebble": None, "pebble-challtestsrv": None}




def _section(out: str, number: int) -> str:
    """The printed text of step ``number`` (up to the next step or the summary)."""
    found = re.search(rf"^\[{number}/5\] .*?(?=^\[{number + 1}/5\] |^Summary)", out, re.M | re.S)
    assert found, f"step {number} missing:\n{out}"
    return found.group(0)


@pytest.mark.timeout(270)
def test_cluster_demo_shows_every_step(tmp_path: Path) -> None:
    """The demo exits 0 after: one certificate served by all three replicas (pebble issued
    one); the order lock holder killed -9 and another replica resuming its order (pebble
    issued one for that name; the restarted replica serves the same serial); a renewal on
    every replica within 2 s; all requests answered while Redis was down, store_up false on
    each replica, then true again."""
    require_tools(TOOLS, "the cluster demo test")
    code, out = run_script(SCRIPT, tmp_path, timeout=240)
    assert code == 0, out

    two = _section(out, 2)
    serials = {node: re.search(rf"^    {node}: TLS handshake .*serial ([0-9a-f]+)$", two, re.M)
               for node in NODES}
    assert all(serials.values()), out
    assert len({m.group(1) for m in serials.values() if m}) == 1, out
    assert 'pebble "Issued certificate" lines: 1' in two, out

    three = _section(out, 3)
    killed = re.search(r"-> (replica-\d) holds the order\n    \$ kill -9 \d+", three)
    assert killed, out
    victim = killed.group(1)
    heir = re.search(r"^    (replica-\d) log: \S+: resuming ACME order", three, re.M)
    assert heir and heir.group(1) != victim, out
    served = re.search(r"served by (replica-\d) and (replica-\d) .* serial ([0-9a-f]+)$",
                       three, re.M)
    assert served and victim not in served.group(1, 2), out
    assert re.search(r"pebble issued 1 certificate for click\d\.demo\.test", three), out
    again = re.search(rf"^    {victim} serves \S+ .*: serial ([0-9a-f]+) \(the same serial\)",
                      three, re.M)
    assert again and again.group(1) == served.group(3), out

    four = _section(out, 4)
    old = re.search(r"all three serve serial ([0-9a-f]+) now", four)
    delays = re.findall(r"^    (replica-\d): \+(\d+\.\d+) s  serial ([0-9a-f]+)$", four, re.M)
    assert old and sorted(node for node, _, _ in delays) == list(NODES), out
    assert {serial for _, _, serial in delays} != {old.group(1)}, out
    assert len({serial for _, _, serial in delays}) == 1, out
    assert all(float(delay) <= 2.0 for _, delay, _ in delays), out

    five = _section(out, 5)
    answered = re.search(r"in \d+\.\d s: (\d+) x open -> 200, (\d+) x click -> 302$", five, re.M)
    assert answered and int(answered.group(1)) + int(answered.group(2)) == 50, out
    for node in NODES:
        assert re.search(rf"^    {node} /status: store_up false.*trackingproxy_store_up 0",
                         five, re.M), out
        assert re.search(rf"^    {node} /status: store_up true.*trackingproxy_store_up 1",
                         five, re.M), out

    assert re.search(r"^Summary \(", out, re.M), out
    assert "All steps worked" in out, out
    assert not list(tmp_path.glob("trackingproxy-cluster-demo-*")), "the demo left its files"


def test_missing_tool_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Without pebble on PATH the demo starts nothing and says in one line how to install
    what is missing (`make debs` / apt-get), exiting 1."""
    env = {**os.environ, "PATH": str(tmp_path), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )
    assert done.returncode == 1, done
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert "pebble" in lines[0] and "make debs" in lines[0] and "apt-get install" in lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing is started or written"
