"""Request handling: routing, ACME challenges, well-known files, forwarding upstream."""
