"""`trackingproxy check`: verify a tracking domain's setup without changing anything.

`settings` turns the proxy's own options (plus a few check-only ones) into a frozen
`CheckSettings`; `dnscheck` resolves each domain (twisted.names, never the blocking libc
resolver) and says where it points; `served` connects to ports 80/443 under the domain's name,
inspects the certificate served there and sends the `/f/` probe; `upstream` makes one verified
TLS connection to the upstream with the proxy's own connection pool and asks it the same probe
for each domain (the domain as Host, as the proxy forwards); `routing` judges both answers (does
the endpoint serve the domain, does the proxy pass its answer on); `runner` runs them all in
order and hands each `Finding` to a printer. Nothing here writes a file or talks ACME.
"""

from __future__ import annotations

from trackingproxy.checks.findings import Finding, Level, exit_status
from trackingproxy.checks.runner import Collaborators, run_checks
from trackingproxy.checks.settings import CheckSettings

__all__ = ["CheckSettings", "Collaborators", "Finding", "Level", "exit_status", "run_checks"]
