"""`make demo` end to end: demo/run_demo.py with real pebble, the spgo.io stand-in and the proxy.

Without pebble (or curl) the test is skipped with a reason, except under CI=true where it fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.demo_runner import require_tools, run_script

SCRIPT = Path(__file__).resolve().parent.parent / "demo" / "run_demo.py"
DOMAINS = ("click.demo.test", "click2.demo.test")




@pytest.mark.timeout(200)
def test_demo_shows_open_click_and_renewal(tmp_path: Path) -> None:
    """The demo exits 0 after an open (200 + GIF), a click (302) and a renewal (new serials)."""
    require_tools({"pebble": None, "pebble-challtestsrv": None, "curl": None}, "the demo test")
    code, out = run_script(SCRIPT, tmp_path, timeout=170)
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
