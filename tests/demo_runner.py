"""Running a demo script end to end from a test: its tools required (a skip with the reason,
a failure under CI=true), the script run with a timeout (stopped with SIGTERM, which makes it
stop its children, then killed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest


def require_tools(tools: Mapping[str, str | None], what: str) -> None:
    """Each tool on PATH, or at its Debian path (the value, when given)."""
    missing = [
        tool for tool, debian in tools.items()
        if shutil.which(tool) is None and not (debian and os.access(debian, os.X_OK))
    ]
    if missing:
        message = f"{', '.join(missing)} not installed (`make debs` installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + f" (CI=true: {what} must run)")
        pytest.skip(message)


def run_script(script: Path, tmp_path: Path, timeout: float) -> tuple[int, str]:
    """Run ``script`` (its working directory under ``tmp_path``): exit status and output."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the demo's working directory lands here
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops its children on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{script.name} took more than {timeout:.0f} s:\n{out}")
    return proc.returncode, out
