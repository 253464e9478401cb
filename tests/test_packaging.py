"""Packaging: the wheel carries the twistd plugin, and a fresh virtualenv lists the subcommand."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_plugin_and_fresh_venv_lists_it(tmp_path: Path):
    """`pip wheel .` holds twisted/plugins/trackingproxy_plugin.py (and no twisted/__init__.py);
    installed into a fresh virtualenv, `twistd --help` lists trackingproxy from any directory."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("trackingproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/trackingproxy_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    for module in sorted((ROOT / "trackingproxy").rglob("*.py")):
        member = module.relative_to(ROOT).as_posix()
        assert member in names, f"{member} missing from the wheel: list its package in setup.cfg"

    # A fresh venv whose only extra path is the current environment's site-packages (for the
    # dependencies): a .pth path line does not run the .pth files there, so the checkout's own
    # editable install is NOT visible, and only the wheel can provide the plugin.
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    fresh_python = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(fresh_python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    twistd = "from twisted.scripts.twistd import run; run()"
    listing = subprocess.run(
        [str(fresh_python), "-c", twistd, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "trackingproxy" in listing.stdout, listing.stdout + listing.stderr
    origin = subprocess.run(
        [str(fresh_python), "-c", "import trackingproxy; print(trackingproxy.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert str(fresh_site) in origin.stdout, origin
    helptext = subprocess.run(
        [str(fresh_python), "-c", twistd, "trackingproxy", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "--upstream" in helptext.stdout and "TRACKINGPROXY_" in helptext.stdout
    assert "dropin.cache" not in helptext.stderr


def test_editable_compat_install_lists_the_plugin(tmp_path: Path):
    """The development install (`pip install -e . --config-settings editable_mode=compat`, what
    `make` does) lets `twistd --help` list trackingproxy from any directory, without PYTHONPATH."""
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "trackingproxy" in result.stdout, (
        "the test environment's install does not expose the plugin: install with "
        "--config-settings editable_mode=compat (setuptools' default editable mode hides it)"
    )
