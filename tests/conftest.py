"""Test-wide set-up: the suite runs with the same TCP write path as the real process."""

from trackingproxy import fastwrite

fastwrite.install()
