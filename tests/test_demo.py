"""`make demo` end to end: demo/run_demo.py with real pebble, the spgo.io stand-in and the proxy.

Without pebble (or curl) the test is skipped with a reason, except under CI=true where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "demo" / "run_demo.py"
DOMAINS = ("click.demo.test", "click2.demo.test")


def _require_tools() -> None:
    missing = [t for t in ("pebble", "pebble-challtestsrv", "curl") if shutil.which(t) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (`make debs` installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the demo test must run)")
        pytest.skip(message)


def _run_demo(tmp_path: Path, timeout: float) -> tuple[int, str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the demo's working directory lands here
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops its children on SIGTERM
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the demo took more than {timeout:.0f} s:\n{out}")
    return proc.returncode, out


@pytest.mark.timeout(200)
def test_demo_shows_open_click_and_renewal(tmp_path: Path) -> None:
    """The demo exits 0 after an open (200 + GIF), a click (302) and a renewal (new serials)."""
    _require_tools()
    code, out = _run_demo(tmp_path, timeout=170)
    assert code == 0, out
    assert "HTTP 200, image/gif, 44 bytes" in out, out
    assert re.search(r"HTTP 302, Location: https://\S+", out), out
    for domain in DOMAINS:
        first = re.search(rf"^    {re.escape(domain)}: serial ([0-9a-f]+),", out, re.M)
        renewed = re.search(
            rf"^    {re.escape(domain)}: new connection gets serial ([0-9a-f]+),", out, re.M
        )
        assert first and renewed, out
        assert first.group(1) != renewed.group(1), out
    assert "All steps worked" in out, out
    assert not list(tmp_path.glob("trackingproxy-demo-*")), "the demo left its files behind"
