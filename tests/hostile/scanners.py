"""The TLS scanners the hostile suite runs, installed on demand.

sslyze pins cryptography below what trackingproxy needs, so it lives in its own virtualenv,
``.venv-tools/sslyze`` at the top of the checkout (created once, reused; not committed).
testssl.sh comes from Debian (``apt-get install testssl.sh``) when it is missing.

A scanner that cannot be installed skips its test with the reason, except under ``CI=true``,
where it fails: CI must never pass without having scanned.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from twisted.trial.unittest import SkipTest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".venv-tools"
RESULTS = ROOT / "build" / "hostile-results"
SSLYZE = "sslyze==6.3.1"  # pinned: its Mozilla profile and JSON layout are what we assert on
INSTALL_TIMEOUT = 480


def unavailable(tool: str, why: str, environ: Mapping[str, str] = os.environ) -> NoReturn:
    """Fail under CI=true, skip (visibly, with the reason) otherwise."""
    message = f"{tool} is not available and could not be installed: {why}"
    if environ.get("CI", "").lower() == "true":
        raise AssertionError(message)
    raise SkipTest(message)


def sslyze_python() -> Path:
    """The interpreter of the sslyze virtualenv, created and filled on first use."""
    venv = TOOLS / "sslyze"
    python = venv / "bin" / "python"
    stamp = venv / (".installed-" + SSLYZE.replace("==", "-"))
    if stamp.exists() and python.exists():
        return python
    base = getattr(sys, "_base_executable", None) or sys.executable
    try:
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", SSLYZE],
            check=True,
            capture_output=True,
            timeout=INSTALL_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        unavailable("sslyze", f"{e} {detail.decode(errors='replace')[-500:]}")
    stamp.touch()
    return python


def find_testssl() -> str:
    """The testssl.sh executable; installed from Debian with apt-get if missing."""
    found = shutil.which("testssl") or shutil.which("testssl.sh")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", "-qq", "testssl.sh"]
    try:
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run([*sudo, "apt-get", "update", "-qq"], capture_output=True, env=env)
            subprocess.run(install, check=True, capture_output=True, env=env)
    except (OSError, subprocess.SubprocessError) as e:
        unavailable("testssl.sh", str(e))
    found = shutil.which("testssl") or shutil.which("testssl.sh")
    if not found:
        unavailable("testssl.sh", "apt-get installed nothing that is on PATH")
    return found


def save(name: str, data: bytes) -> Path:
    """Keep a scanner's output under build/hostile-results/ (for the README figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_bytes(data)
    return path


__all__ = ["RESULTS", "find_testssl", "save", "sslyze_python", "unavailable"]
